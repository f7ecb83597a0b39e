"""Jobs found, retried and cleaned up from the outside, against a real cluster: the client
library (`stagepool.Client`, `stagepool.AsyncClient`, through the gateway with its token) and
the CLI (`stagepool env`, `jobs`, `retry`, `purge`, `result`) as a user runs them."""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import subprocess
import sys
import time
import uuid

import pytest

from stagepool import AsyncClient, Client, RemoteError

from .conftest import Cluster, RedisServer, gateway_client

pytestmark = pytest.mark.cluster

TOKEN = "client-token-" + uuid.uuid4().hex[:8]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("client")
    redis_server = RedisServer(tmp / "redis")
    cluster = Cluster(tmp, redis_server.url, f"c{uuid.uuid4().hex[:8]}", workers=1,
                      sleep_ms=150, token=TOKEN)
    yield cluster
    cluster.stop()
    redis_server.stop()


@pytest.fixture(scope="module")
def client(cluster):
    gateway_client(cluster.gateway, TOKEN, timeout_s=30).close()  # every stage has its worker
    with Client(cluster.gateway, token=TOKEN) as client:
        yield client


def _cli(cluster, *args, env=None) -> str:
    out = subprocess.run([sys.executable, "-m", "stagepool.broker.cli", *args], check=True,
                         capture_output=True, text=True, timeout=60,
                         env=env or dict(os.environ, STAGEPOOL_STATE_DIR=str(cluster.state_dir)))
    return out.stdout


def test_the_client_submits_waits_and_reads_the_result(client):
    submitted = client.submit({"prompt": "a red fox"}, job_id="ok-1")
    assert submitted.created and submitted.job_id == "ok-1"
    started = time.monotonic()
    job = client.wait("ok-1", timeout_s=60)
    assert job.state == "succeeded" and job.progress == 1.0
    assert time.monotonic() - started < 10  # woken by the job's end, not a slow poll
    assert json.loads(client.result("ok-1")) == job.result  # no file: the result JSON
    with pytest.raises(RemoteError) as refused:
        client.retry("ok-1")
    assert refused.value.code == "conflict"
    with pytest.raises(RemoteError) as missing:
        client.status("nobody")
    assert missing.value.code == "not_found"
    events = [e.event for e in client.events("ok-1").events]
    assert events[0] == "submitted" and events[-1] == "succeeded"


def test_a_failed_job_is_found_and_runs_again_from_the_stage_it_failed_in(client):
    client.submit({"prompt": "p", "reject_stage": "decode"}, job_id="bad-1")
    job = client.wait("bad-1", timeout_s=60)
    assert (job.state, job.stage) == ("failed", "decode")
    assert "asked to refuse" in job.error
    assert [j.job_id for j in client.jobs(state="failed", stage="decode")] == ["bad-1"]
    assert client.jobs(state="failed", stage="encode") == []
    retried = client.retry("bad-1")
    assert retried.retried and retried.state == "queued:decode"
    job = client.wait("bad-1", timeout_s=60)
    assert job.state == "failed"  # the same params fail again, in the same stage
    assert job.stages["encode"]["attempt"] == 1 and job.stages["denoise"]["attempt"] == 1
    assert job.stages["decode"]["attempt"] == 2  # decode ran again; encode and denoise did not
    events = [(e.event, e.stage) for e in client.events("bad-1").events]
    assert events.count(("failed", "decode")) == 2 and ("revived", "decode") in events


def test_a_cancelled_job_retried_completes(client):
    client.submit({"prompt": "p"}, job_id="cx-1")
    deadline = time.monotonic() + 30
    while client.status("cx-1").state == "queued:encode":
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert client.cancel("cx-1").cancelled
    assert client.wait("cx-1", 30).state == "cancelled"
    client.retry("cx-1")
    assert client.wait("cx-1", 60).state == "succeeded"


def test_the_async_client_does_the_same(cluster):
    async def main():
        async with AsyncClient(cluster.gateway, token=TOKEN) as client:
            await client.submit({"prompt": "async"}, job_id="as-1")
            job = await client.wait("as-1", timeout_s=60)
            listed = await client.jobs(state="succeeded", limit=500)
            return job, [j.job_id for j in listed]

    job, listed = asyncio.run(main())
    assert job.state == "succeeded" and "as-1" in listed


def test_a_bad_filter_is_refused_naming_the_choices(client):
    with pytest.raises(RemoteError) as refused:
        client.jobs(state="finished")
    assert refused.value.code == "bad_request" and "queued:denoise" in refused.value.message


def test_the_cli_finds_the_cluster_lists_retries_and_purges(cluster, client):
    env_lines = _cli(cluster, "env")
    assert "STAGEPOOL_GATEWAY_URL=" in env_lines and "STAGEPOOL_REDIS_URL=" in env_lines
    # As a user would: eval the exports, then every command finds the cluster.
    script = (f'eval "$({shlex.quote(sys.executable)} -m stagepool.broker.cli env)" && '
              f'{shlex.quote(sys.executable)} -m stagepool.broker.cli jobs --state failed --json')
    out = subprocess.run(["bash", "-c", script], check=True, capture_output=True, text=True,
                         env=dict(os.environ, STAGEPOOL_STATE_DIR=str(cluster.state_dir)),
                         timeout=60).stdout
    failed = json.loads(out)
    assert [j["job_id"] for j in failed] == ["bad-1"] and "rid" not in failed[0]
    status = json.loads(_cli(cluster, "status", "ok-1", "--json"))
    assert status["state"] == "succeeded" and "rid" not in status and "type" not in status
    table = _cli(cluster, "jobs", "--since", "1h")
    assert "ok-1" in table and "bad-1" in table
    assert _cli(cluster, "purge", "--state", "failed", "--older-than", "0").strip() == \
        "purged 1 jobs"
    assert json.loads(_cli(cluster, "jobs", "--state", "failed", "--json")) == []
    with pytest.raises(RemoteError):
        client.status("bad-1")
    assert client.status("ok-1").state == "succeeded"  # other states untouched
    result = subprocess.run([sys.executable, "-m", "stagepool.broker.cli", "retry", "ok-1"],
                            capture_output=True, text=True, timeout=60,
                            env=dict(os.environ, STAGEPOOL_STATE_DIR=str(cluster.state_dir)))
    assert result.returncode == 1 and "succeeded job is not run again" in result.stderr
