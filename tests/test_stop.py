"""Stopping a running stage: cancel, a superseded attempt and the time limit reach it at its
next step; a run that reaches no step makes its worker exit. Real clusters, real Redis."""

from __future__ import annotations

import re
import time

import pytest

from stagepool.common.client import BrokerClient
from stagepool.common.errors import Code, RemoteError
from stagepool.common.jobstore import JobStore

from .conftest import wait_ended

pytestmark = pytest.mark.cluster

STEPS = 'kind = "tests.plugins:Steps"\n'


def _events(store: JobStore, job_id: str) -> list[dict[str, str]]:
    return [{k.decode(): v.decode() for k, v in fields.items()}
            for _, fields in store.redis.xrange(store.keys.events)
            if fields.get(b"job") == job_id.encode()]


def _step(store: JobStore, job_id: str, stage: str) -> int:
    return int(((store.get(job_id) or {}).get(f"{stage}.step") or "0/0").split("/")[0])


def _wait_for_step(store: JobStore, job_id: str, stage: str, step: int, timeout_s: float):
    """Wait until `stage` of `job_id` has recorded `step` (its record's `<stage>.step`)."""
    deadline = time.monotonic() + timeout_s
    while _step(store, job_id, stage) < step:
        assert time.monotonic() < deadline, f"{job_id} never reached step {step} of {stage}"
        time.sleep(0.01)


def _hold_denoise(client, store: JobStore, job_id: str, steps: int, step_ms: int,
                  step: int = 1) -> None:
    """Submit a job that keeps the denoise worker busy, and wait until it reached `step`."""
    client.submit({"slow_stage": "denoise", "steps": steps, "step_ms": step_ms}, job_id=job_id)
    _wait_for_step(store, job_id, "denoise", step, 30)


def test_a_cancelled_job_stops_its_running_denoise_at_the_next_step(
        cluster_factory, redis_server, namespace, tiny_models):
    """The diffusers loop itself is interrupted: the step counter stops, the GPU (here a
    CPU) is free for the next job at once."""
    cluster = cluster_factory(workers=1, models=tiny_models["tiny"], lease_ms=10_000)
    store = JobStore(redis_server.url, namespace)
    with BrokerClient(cluster.broker, timeout_s=30) as client:
        cluster.wait_ready(client, 1, timeout_s=120)
        client.submit({"prompt": "long", "seed": 1, "infer_steps": 1000}, job_id="long")
        _wait_for_step(store, "long", "denoise", 3, 120)
        assert client.cancel("long").cancelled
        cancelled = time.monotonic()
        client.submit({"prompt": "next", "seed": 2}, job_id="next")
        assert wait_ended(store, ["next"], 120) == ["succeeded"]
        freed_s = time.monotonic() - cancelled
    # The worker's one line for the attempt says it stopped at a step, far short of 1000.
    log = (cluster.state_dir / "logs" / "denoise-0.log").read_text()
    stopped = re.search(r"attempt job=long stage=denoise attempt=1 .*outcome=stopped: .* at "
                        r"step (\d+)/1000", log)
    assert stopped and int(stopped.group(1)) < 1000, log[-2000:]
    assert freed_s < 60  # the next job ran on the freed worker, not after 1000 steps
    assert _step(store, "long", "denoise") < 1000
    assert "denoise.done" not in store.get("long") and "decode.started" not in store.get("long")


def test_a_superseded_attempt_stops_at_its_next_step(cluster_factory, redis_server, namespace):
    cluster = cluster_factory(workers=1, stage_extra=STEPS, lease_ms=5000)
    store = JobStore(redis_server.url, namespace)
    with BrokerClient(cluster.broker) as client:
        cluster.wait_ready(client, 1)
        _hold_denoise(client, store, "old", 3000, 5, step=2)
        # What a retry by the reaper does to the running attempt's fence.
        store.redis.hincrby(store.keys.job("old"), "denoise.attempt", 1)
        client.submit({}, job_id="behind")  # runs once the denoise worker is free again
        assert wait_ended(store, ["behind"], 30) == ["succeeded"]
        record = store.get("old")
        assert record["state"] == "denoising" and "denoise.done" not in record
        assert int(record["denoise.step"].split("/")[0]) < 3000
        client.cancel("old")
    assert "the attempt is stale" in (cluster.state_dir / "logs" / "denoise-0.log").read_text()


def test_a_run_past_its_time_limit_stops_and_is_retried_until_the_job_fails(
        cluster_factory, redis_server, namespace):
    cluster = cluster_factory(workers=1, max_attempts=2, lease_ms=5000,
                              stage_extra=STEPS + "time_limit_s = 0.3\n")
    store = JobStore(redis_server.url, namespace)
    with BrokerClient(cluster.broker) as client:
        cluster.wait_ready(client, 1)
        started = time.monotonic()
        client.submit({"slow_stage": "denoise", "steps": 1000, "step_ms": 20}, job_id="slow")
        client.submit({"slow_stage": "denoise", "steps": 5, "step_ms": 20}, job_id="quick")
        assert wait_ended(store, ["slow", "quick"], 60) == ["failed", "succeeded"]
        assert time.monotonic() - started < 15  # two attempts of 0.3 s, not 2 x 20 s
        status = client.status("slow")
    assert "time limit of 0.3 s passed" in status.error
    assert status.stages["denoise"]["retries"] == 2


def test_a_job_may_tighten_the_time_limit_but_not_exceed_the_deployments(
        cluster_factory, redis_server, namespace):
    cluster = cluster_factory(workers=1, max_attempts=1, lease_ms=5000,
                              stage_extra=STEPS + "time_limit_s = 60\n")
    store = JobStore(redis_server.url, namespace)
    slow = {"slow_stage": "denoise", "steps": 1000, "step_ms": 20}
    with BrokerClient(cluster.broker) as client:
        cluster.wait_ready(client, 1)
        started = time.monotonic()
        client.submit({**slow, "time_limit_s": 0.3}, job_id="tight")
        assert wait_ended(store, ["tight"], 30) == ["failed"]
        assert time.monotonic() - started < 10  # 0.3 s, not the stage's 60 s or 20 s of steps
        assert "time limit of 0.3 s passed" in client.status("tight").error
        for bad in (120, 0, -1, "5", True):
            with pytest.raises(RemoteError, match="time_limit_s") as refused:
                client.submit({**slow, "time_limit_s": bad}, job_id="refused")
            assert refused.value.code == Code.INVALID_PARAMS
    assert store.get("refused") is None


def test_a_job_whose_deadline_passes_while_it_waits_expires_instead_of_running(
        cluster_factory, redis_server, namespace):
    cluster = cluster_factory(workers=1, stage_extra=STEPS, lease_ms=5000)
    store = JobStore(redis_server.url, namespace)
    with BrokerClient(cluster.broker) as client:
        cluster.wait_ready(client, 1)
        _hold_denoise(client, store, "blocker", 100, 20)
        now_ms = int(time.time() * 1000)
        client.submit({}, job_id="late", deadline_ms=now_ms + 300)
        client.submit({}, job_id="patient", deadline_ms=now_ms + 120_000)
        client.submit({}, job_id="past", deadline_ms=now_ms - 1)
        assert wait_ended(store, ["blocker", "late", "patient", "past"], 60) == [
            "succeeded", "expired", "succeeded", "expired"]
        with pytest.raises(RemoteError, match="deadline_ms") as refused:
            client.submit({}, job_id="negative", deadline_ms=-1)
        assert refused.value.code == Code.BAD_REQUEST
    late = store.get("late")
    assert "encode.done" in late and "denoise.started" not in late  # no GPU time past encode
    assert late["error"].startswith("deadline passed") and "before denoise could start" in late["error"]
    assert "encode.started" not in store.get("past")
    assert store.get("negative") is None


def test_a_transient_failure_is_retried_after_a_growing_backoff(
        cluster_factory, redis_server, namespace):
    cluster = cluster_factory(workers=1, lease_ms=5000, stage_extra=(
        'kind = "tests.plugins:Flaky"\nretry_backoff_s = 0.4\nretry_backoff_max_s = 0.6\n'))
    store = JobStore(redis_server.url, namespace)
    with BrokerClient(cluster.broker) as client:
        cluster.wait_ready(client, 1)
        client.submit({"flaky_stage": "denoise", "fail_attempts": 2}, job_id="flaky")
        assert wait_ended(store, ["flaky"], 30) == ["succeeded"]
    events = [e for e in _events(store, "flaky") if e["stage"] == "denoise"]
    retried = [int(e["ts_ms"]) for e in events if e["event"] == "retried"]
    started = [int(e["ts_ms"]) for e in events if e["event"] == "started"]
    assert len(retried) == 2 and len(started) == 3
    waits = [started[1] - retried[0], started[2] - retried[1]]
    assert 400 <= waits[0] < 1400 and 600 <= waits[1] < 1600, waits  # 0.4 s, then 0.6 (cap)
    assert [e["ms"] for e in events if e["event"] == "retried"] == ["400", "600"]
    assert store.redis.zcard(store.keys.delayed) == 0


def test_a_run_that_reaches_no_step_makes_its_worker_exit_and_the_job_is_recovered(
        cluster_factory, redis_server, namespace):
    cluster = cluster_factory(workers=1, max_attempts=2, lease_ms=1000,
                              stage_extra='kind = "tests.plugins:Hang"\ntime_limit_s = 0.3\n',
                              worker_extra="stop_grace_s = 0.5")
    store = JobStore(redis_server.url, namespace)
    with BrokerClient(cluster.broker) as client:
        cluster.wait_ready(client, 1)
        client.submit({"slow_stage": "denoise"}, job_id="hung")
        assert wait_ended(store, ["hung"], 60) == ["dead"]
        client.submit({}, job_id="after")
        assert wait_ended(store, ["after"], 60) == ["succeeded"]
    log = (cluster.state_dir / "logs" / "denoise-0.log").read_text()
    assert log.count("did not stop") == 2  # one exit per attempt, each replaced


def test_cancel_reaches_the_running_stage_through_its_lease_cell_without_redis(
        cluster_factory, redis_server, namespace):
    """With progress written to Redis once a minute, the broker's stop word in the lease cell
    alone stops the run at its next step."""
    cluster = cluster_factory(workers=1, stage_extra=STEPS, lease_ms=5000,
                              worker_extra="progress_interval_ms = 60000")
    store = JobStore(redis_server.url, namespace)
    with BrokerClient(cluster.broker) as client:
        cluster.wait_ready(client, 1)
        client.submit({"slow_stage": "denoise", "steps": 100_000, "step_ms": 2}, job_id="c")
        deadline = time.monotonic() + 30
        while store.get("c").get("denoise.started") is None:  # its first step is written
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert client.cancel("c").cancelled
        started = time.monotonic()
        client.submit({}, job_id="then")
        assert wait_ended(store, ["then"], 30) == ["succeeded"]
        assert time.monotonic() - started < 5  # not the 200 s the run would have taken
    log = (cluster.state_dir / "logs" / "denoise-0.log").read_text()
    assert "the broker stopped the attempt" in log
