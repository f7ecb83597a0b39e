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
from stagepool.common.errors import RemoteError, TransportError
from stagepool.common.jobstore import JobStore

from .conftest import wait_ended

pytestmark = pytest.mark.cluster


def _xadd_with_redis_cli(port: int, namespace: str, jobs: list[dict]) -> None:
    lines = "".join(
        f"XADD {{{namespace}}}:ingress * job '{json.dumps(job)}'\n" for job in jobs
    )
    out = subprocess.run(["redis-cli", "-p", str(port)], input=lines.encode(),
                         capture_output=True, timeout=60, check=True)
    assert out.stdout.count(b"-") >= len(jobs), out.stdout[-500:]


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
        states = wait_ended(store, zmq_ids + cli_ids, timeout_s=240)
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
    with BrokerClient(cluster.broker, timeout_s=2) as client:
        cluster.wait_ready(client, 1)
        for job_id in job_ids:
            client.submit({}, job_id=job_id)
        os.kill(cluster.pids()["broker"], signal.SIGKILL)  # `up` restarts it; it rebuilds
        states = wait_ended(store, job_ids, timeout_s=180)
        deadline = time.monotonic() + 30
        while True:  # the same client greets the new broker by itself
            try:
                assert client.status("b-0").state == "succeeded"
                break
            except TransportError:
                assert time.monotonic() < deadline, "the restarted broker never answered"
    assert collections.Counter(states) == {"succeeded": 200}
    assert max(_succeeded_events(store).values()) == 1


def test_a_failing_stage_is_retried_then_the_job_fails_with_its_error(cluster_factory,
                                                                     redis_server, namespace):
    cluster = cluster_factory(workers=1)
    store = JobStore(redis_server.url, namespace)
    with BrokerClient(cluster.broker) as client:
        cluster.wait_ready(client, 1)
        client.submit({"fail_stage": "denoise"}, job_id="doomed")
        client.submit({}, job_id="fine")
        assert wait_ended(store, ["doomed", "fine"], 60) == ["failed", "succeeded"]
        status = client.status("doomed")
        assert "asked to fail in denoise" in status.error
        assert status.stages["denoise"]["retries"] == 5
        assert "decode" not in status.stages


def test_a_permanent_error_fails_the_job_at_once(cluster_factory, redis_server, namespace):
    cluster = cluster_factory(workers=1)
    store = JobStore(redis_server.url, namespace)
    with BrokerClient(cluster.broker) as client:
        cluster.wait_ready(client, 1)
        client.submit({"reject_stage": "denoise"}, job_id="bad")
        assert wait_ended(store, ["bad"], 30) == ["failed"]
        status = client.status("bad")
    assert status.error.startswith("ValueError: asked to refuse the params in denoise")
    assert status.stages["denoise"]["retries"] == 1 and status.stages["denoise"]["attempt"] == 1


def test_cancel_stops_a_queued_job(cluster_factory):
    cluster = cluster_factory(workers=1, sleep_ms=200)
    with BrokerClient(cluster.broker) as client:
        cluster.wait_ready(client, 1)
        for i in range(5):
            client.submit({}, job_id=f"c-{i}")
        result = client.cancel("c-4")
        assert result.cancelled and result.state == "cancelled"
        assert client.status("c-4").state == "cancelled"
        assert "started_ms" not in client.status("c-4").stages.get("encode", {})


def test_a_job_cancelled_while_a_stage_runs_is_not_handed_on(cluster_factory, redis_server,
                                                             namespace):
    """The running stage's commit is refused (the job ended): nothing starts after it."""
    cluster = cluster_factory(workers=1, sleep_ms=300)
    store = JobStore(redis_server.url, namespace)
    with BrokerClient(cluster.broker) as client:
        cluster.wait_ready(client, 1)
        feed_from = store.redis.xadd(store.keys.events, {"event": "mark"})
        client.submit({}, job_id="mid")
        while True:  # until encode has started
            events = store.read_events(feed_from, 100, 5000)
            assert events, "encode never started"
            feed_from = events[-1][0]
            if any(f[b"event"] == b"started" for _, f in events):
                break
        assert client.cancel("mid").cancelled
        client.submit({}, job_id="after")  # runs once encode's worker is free again
        assert wait_ended(store, ["after"], 30) == ["succeeded"]
    record = store.get("mid")
    assert record["state"] == "cancelled"
    assert "encode.done" not in record and "denoise.started" not in record


def test_batched_stages_survive_killed_workers_and_commit_each_result_once(
        cluster_factory, redis_server, namespace):
    """max_batch 8 (a batch starts and commits in one round trip each): two thousand jobs
    submitted pipelined, a worker of each of two stages SIGKILLed mid-batch."""
    cluster = cluster_factory(workers=2, max_batch=8)
    store = JobStore(redis_server.url, namespace)
    job_ids = [f"p-{i}" for i in range(2000)]
    with BrokerClient(cluster.broker) as client:
        cluster.wait_ready(client, 2)
        answers = client.submit_many([{"job_id": j, "params": {"n": i}}
                                      for i, j in enumerate(job_ids)])
        assert all(a.created for a in answers)
        deadline = time.monotonic() + 60
        while store.redis.zcard(store.keys.results) < 200:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        pids = cluster.pids()
        os.kill(pids["denoise-0"], signal.SIGKILL)
        os.kill(pids["encode-1"], signal.SIGKILL)
        states = wait_ended(store, job_ids, timeout_s=240)
    assert collections.Counter(states) == {"succeeded": 2000}
    events = _succeeded_events(store)
    assert set(events) == set(job_ids) and max(events.values()) == 1
    records = [store.get(j) for j in job_ids[::50]]
    assert {r["commits"] for r in records} == {"1"}
    for record in records:  # each stage's start and finish recorded, the last one's result
        assert all(record[f"{s}.done"] for s in ("encode", "denoise", "decode"))
        assert json.loads(record["result"])["job_id"] == record["id"]
        assert int(record["decode.finished_ms"]) >= int(record["decode.started_ms"])


def test_submit_many_answers_each_job_and_refuses_only_the_bad_ones(cluster_factory):
    cluster = cluster_factory(workers=1, max_batch=4)
    with BrokerClient(cluster.broker) as client:
        cluster.wait_ready(client, 1)
        answers = client.submit_many([
            {"job_id": "m-1"}, {"job_id": "bad id!"}, {"job_id": "m-1"},
            {"job_id": "m-2", "pipeline": "other"}, {"job_id": "m-3", "params": {"big": 2**70}},
            # Params never ride in the ring: however big, the workers read them at start.
            {"job_id": "m-4", "params": {"prompt": "x" * 4000}},
        ])
        assert [type(a).__name__ for a in answers] == [
            "Submitted", "RemoteError", "Submitted", "RemoteError", "Submitted", "Submitted"]
        assert answers[0].created and not answers[2].created
        assert answers[1].code == "bad_request" and "job id" in str(answers[1])
        assert "unknown pipeline" in str(answers[3])
        deadline = time.monotonic() + 30
        for job_id in ("m-1", "m-3", "m-4"):
            while client.status(job_id).state != "succeeded":
                assert time.monotonic() < deadline
                time.sleep(0.05)
        # A reply msgpack cannot carry (an int beyond 64 bits) comes back as JSON.
        assert client.status("m-3").params == {"big": 2**70}
        assert len(client.status("m-4").params["prompt"]) == 4000
        with pytest.raises(RemoteError):
            client.status("m-2")
