"""End to end: `stagepool up` on the noop pipeline, real Redis, real processes, faults."""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import time

import pytest

from stagepool.common.client import BrokerClient
from stagepool.common.jobstore import JobStore

pytestmark = pytest.mark.slow


def _xadd_with_redis_cli(port: int, namespace: str, jobs: list[dict]) -> None:
    lines = "".join(
        f"XADD {{{namespace}}}:ingress * job '{json.dumps(job)}'\n" for job in jobs
    )
    out = subprocess.run(["redis-cli", "-p", str(port)], input=lines.encode(),
                         capture_output=True, timeout=60, check=True)
    assert out.stdout.count(b"-") >= len(jobs), out.stdout[-500:]


def _wait_all_terminal(store: JobStore, job_ids: list[str], timeout_s: float) -> list[str]:
    deadline = time.monotonic() + timeout_s
    while True:
        states = store.states(job_ids)
        if all(s in ("succeeded", "failed", "dead", "cancelled") for s in states):
            return states
        if time.monotonic() > deadline:
            return states
        time.sleep(0.2)


def _succeeded_events(store: JobStore) -> collections.Counter:
    counts = collections.Counter()
    last = "0"
    while True:
        chunk = store.redis.xrange(store.keys.events, min=f"({last}" if last != "0" else "-",
                                   count=5000)
        if not chunk:
            return counts
        for entry_id, fields in chunk:
            if fields[b"event"] == b"succeeded":
                counts[fields[b"job"].decode()] += 1
        last = chunk[-1][0].decode()


def test_a_thousand_jobs_by_zmq_and_redis_cli_survive_a_killed_worker(
        cluster_factory, redis_server, namespace):
    cluster = cluster_factory(workers=2, sleep_ms=2)
    store = JobStore(redis_server.url, namespace)
    zmq_ids = [f"z-{i}" for i in range(500)]
    cli_ids = [f"r-{i}" for i in range(500)]
    with BrokerClient(cluster.broker) as client:
        cluster.wait_ready(client, 2)
        for job_id in zmq_ids:
            client.submit({"prompt": job_id}, job_id=job_id)
        _xadd_with_redis_cli(redis_server.port, namespace,
                             [{"job_id": j, "params": {"prompt": j}} for j in cli_ids])
        # Kill one denoise worker while jobs are flowing through it.
        deadline = time.monotonic() + 60
        while store.redis.zcard(store.keys.results) < 100:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        os.kill(cluster.pids()["denoise-0"], signal.SIGKILL)
        states = _wait_all_terminal(store, zmq_ids + cli_ids, timeout_s=240)
    counts = collections.Counter(states)
    assert counts == {"succeeded": 1000}, counts
    events = _succeeded_events(store)
    assert set(events) == set(zmq_ids + cli_ids)
    assert max(events.values()) == 1, "a result was committed twice"
    commits = [store.get(j)["commits"] for j in zmq_ids[:50] + cli_ids[:50]]
    assert set(commits) == {"1"}


def test_jobs_survive_a_broker_killed_and_restarted_mid_run(cluster_factory, redis_server,
                                                            namespace):
    cluster = cluster_factory(workers=1, sleep_ms=5)
    store = JobStore(redis_server.url, namespace)
    job_ids = [f"b-{i}" for i in range(200)]
    with BrokerClient(cluster.broker) as client:
        cluster.wait_ready(client, 1)
        for job_id in job_ids:
            client.submit({}, job_id=job_id)
    os.kill(cluster.pids()["broker"], signal.SIGKILL)  # `up` restarts it; it rebuilds
    states = _wait_all_terminal(store, job_ids, timeout_s=180)
    assert collections.Counter(states) == {"succeeded": 200}
    assert max(_succeeded_events(store).values()) == 1


def test_a_failing_stage_is_retried_then_the_job_fails_with_its_error(cluster_factory,
                                                                     redis_server, namespace):
    cluster = cluster_factory(workers=1)
    with BrokerClient(cluster.broker) as client:
        cluster.wait_ready(client, 1)
        client.submit({"fail_stage": "denoise"}, job_id="doomed")
        client.submit({}, job_id="fine")
        deadline = time.monotonic() + 60
        while client.status("doomed").state != "failed":
            assert time.monotonic() < deadline
            time.sleep(0.1)
        status = client.status("doomed")
        assert "asked to fail in denoise" in status.error
        assert status.stages["denoise"]["retries"] == 5
        while client.status("fine").state != "succeeded":
            assert time.monotonic() < deadline
            time.sleep(0.1)


def test_cancel_stops_a_queued_job(cluster_factory):
    cluster = cluster_factory(workers=1, sleep_ms=200)
    with BrokerClient(cluster.broker) as client:
        cluster.wait_ready(client, 1)
        for i in range(5):
            client.submit({}, job_id=f"c-{i}")
        result = client.cancel("c-4")
        assert result.cancelled and result.state == "cancelled"
        assert client.status("c-4").state == "cancelled"
