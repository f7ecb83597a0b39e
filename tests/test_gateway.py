"""The HTTP gateway against a real cluster: routes, auth, bad input, metrics, schemathesis.

One `stagepool up` (no-op stages, one worker each, 100 ms per stage, so queues build up)
with a bearer token serves every test in the module.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from .conftest import Cluster, RedisServer, gateway_client

TOKEN = "test-token-" + uuid.uuid4().hex[:8]
STAGES = ("encode", "denoise", "decode")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gateway")
    redis_server = RedisServer(tmp / "redis")
    cluster = Cluster(tmp, redis_server.url, f"g{uuid.uuid4().hex[:8]}", workers=1,
                      sleep_ms=100, token=TOKEN)
    yield cluster
    cluster.stop()
    redis_server.stop()


@pytest.fixture(scope="module")
def http(cluster):
    client = gateway_client(cluster.gateway, TOKEN, timeout_s=30, http_timeout_s=10)
    yield client
    client.close()


def wait_state(http, job_id, states=("succeeded", "failed", "cancelled", "dead"),
               timeout_s=60.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        response = http.get(f"/v1/jobs/{job_id}")
        job = response.json()
        if response.status_code == 200 and job["state"] in states:
            return job
        # 404 only while a job accepted through the ingress stream awaits the broker
        assert response.status_code in (200, 404), response.text
        assert time.monotonic() < deadline, f"job {job_id} still {job.get('state', job)}"
        time.sleep(0.05)


def drained(http, timeout_s=120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while http.get("/v1/queues").json()["totals"]["active"]:
        assert time.monotonic() < deadline, "jobs never drained"
        time.sleep(0.1)


# -- auth ------------------------------------------------------------------------------


def test_only_health_dashboard_and_spec_are_served_without_the_token(cluster, http):
    bare = httpx.Client(base_url=cluster.gateway, timeout=10)
    for path in ("/v1/jobs", "/v1/queues", "/metrics", "/v1/tasks/queue/status"):
        response = bare.get(path)
        assert response.status_code == 401, path
        assert response.headers["www-authenticate"] == "Bearer"
        assert "Bearer" in response.json()["message"]
    wrong = bare.get("/v1/queues", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    assert bare.post("/v1/jobs", json={}).status_code == 401
    assert bare.get("/healthz").json() == {"ok": True}
    assert bare.get("/").status_code == 200 and "<canvas id=\"chart\"" in bare.get("/").text
    assert bare.get("/static/dashboard.js").status_code == 200
    spec = bare.get("/openapi.json").json()
    assert spec["paths"]["/v1/jobs"]["post"]["security"] == [{"bearer": []}]
    bare.close()


# -- the native API --------------------------------------------------------------------


def test_jobs_api_submits_reads_lists_cancels_and_serves_results(http):
    job_id = f"api-{uuid.uuid4().hex[:8]}"
    created = http.post("/v1/jobs", json={"params": {"prompt": "a"}, "job_id": job_id})
    assert created.status_code == 201, created.text
    assert created.json() == {"job_id": job_id, "created": True, "via": "broker"}
    assert created.headers["location"] == f"/v1/jobs/{job_id}"
    again = http.post("/v1/jobs", json={"params": {"prompt": "b"}, "job_id": job_id})
    assert again.status_code == 200 and again.json()["created"] is False

    early = http.get(f"/v1/jobs/{job_id}/result")  # 300 ms of work: not yet
    assert early.status_code == 409 and job_id in early.json()["message"]

    job = wait_state(http, job_id)
    assert job["state"] == "succeeded" and job["params"] == {"prompt": "a"}
    assert set(job["stages"]) == set(STAGES)
    assert all("finished_ms" in job["stages"][s] for s in STAGES)
    result = http.get(f"/v1/jobs/{job_id}/result")
    assert result.status_code == 200 and result.json()["job_id"] == job_id  # noop: JSON result

    cancel_done = http.delete(f"/v1/jobs/{job_id}").json()
    assert cancel_done == {"job_id": job_id, "cancelled": False, "state": "succeeded"}

    # Cancel one that waits behind a burst; it ends cancelled and never runs its stages.
    burst = [http.post("/v1/jobs", json={"params": {}}).json()["job_id"] for _ in range(5)]
    victim = burst[-1]
    cancelled = http.delete(f"/v1/jobs/{victim}").json()
    assert cancelled["cancelled"] is True and cancelled["state"] == "cancelled"
    assert wait_state(http, victim)["state"] == "cancelled"
    assert http.get(f"/v1/jobs/{victim}/result").status_code == 409

    # Listing: newest first, paged by next_before_ms.
    page = http.get("/v1/jobs", params={"limit": 2}).json()
    assert [j["job_id"] for j in page["jobs"]] == [burst[-1], burst[-2]]
    rest = http.get("/v1/jobs", params={"limit": 2, "before_ms": page["next_before_ms"]}).json()
    assert all(j["created_ms"] < page["next_before_ms"] for j in rest["jobs"])
    assert http.get("/v1/jobs/no-such-job").status_code == 404
    drained(http)


def test_queues_report_depth_and_workers_per_stage(http):
    queues = http.get("/v1/queues").json()
    assert [q["stage"] for q in queues["stages"]] == list(STAGES)
    assert all(q["workers"] == 1 and q["ring_capacity"] == 256 for q in queues["stages"])
    assert queues["broker_up"] is True


# -- bad input -------------------------------------------------------------------------


def test_pipeline_and_workers_are_served(cluster, http):
    from stagepool.broker.pipeline import describe
    from stagepool.common import config as config_mod

    assert http.get("/v1/pipeline").json() == describe(config_mod.load(cluster.config_path))
    workers = http.get("/v1/workers").json()["workers"]
    assert sorted(w["stage"] for w in workers) == ["decode", "denoise", "encode"]


def test_bad_requests_get_4xx_with_a_clear_message_and_the_gateway_lives(cluster, http):
    def check(response, status, words):
        assert response.status_code == status, response.text
        body = response.json()
        assert words in body["message"] and body["detail"] == body["message"]

    check(http.post("/v1/jobs", json={"params": {}, "bogus": 1}), 422, "unknown field `bogus`")
    check(http.post("/v1/jobs", json={"params": []}), 422, "Expected `object`")
    check(http.post("/v1/jobs", json={"priority": 2**40}), 422, "priority")
    check(http.post("/v1/jobs", content=b'{"params": '), 400, "not JSON")
    check(http.post("/v1/jobs", content=b'{"params": {"prompt": "\xff"}}'), 400, "not JSON")
    check(http.post("/v1/jobs", content=b"[" * 5000 + b"]" * 5000), 400, "not JSON")
    check(http.post("/v1/jobs", json={"job_id": "a b"}), 422, "job_id")
    check(http.post("/v1/jobs", json={"params": {"x": "y" * (300 << 10)}}), 413, "limit")
    check(http.post("/v1/jobs", json={"params": {"x": "y" * (100 << 10)}}), 400,
          "params of")  # under the body limit, over the 64 KiB params limit
    check(http.get("/v1/jobs", params={"limit": "lots"}), 400, "limit must be an integer")
    check(http.get("/v1/jobs", params={"limit": 0}), 400, "limit must be in")
    check(http.get("/v1/jobs/a%20b"), 400, "job id must match")
    check(http.post("/v1/tasks/image/", json={"infer_steps": 0}), 422, "infer_steps")
    check(http.get("/v1/nothing-here"), 404, "no route")
    not_allowed = http.put("/v1/jobs")
    check(not_allowed, 405, "PUT is not allowed")
    assert set(not_allowed.headers["allow"].split(", ")) == {"GET", "HEAD", "POST"}
    # Big integers, which msgpack cannot carry, still make a job (sent to the broker as JSON).
    big = http.post("/v1/jobs", json={"params": {"n": 2**70}})
    assert big.status_code == 201
    assert wait_state(http, big.json()["job_id"])["params"] == {"n": 2**70}
    # None of it hurt anyone: a job submitted after it all still succeeds.
    ok = http.post("/v1/jobs", json={"params": {"prompt": "after"}}).json()["job_id"]
    assert wait_state(http, ok)["state"] == "succeeded"
    assert "ERROR" not in (cluster.state_dir / "logs" / "gateway.log").read_text()


# -- metrics ---------------------------------------------------------------------------


def scrape(http) -> dict[tuple[str, tuple], float]:
    response = http.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        assert family.name.startswith("stagepool_"), family.name
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def depth(samples, stage):
    return samples[("stagepool_queue_depth", (("stage", stage),))]


def test_metrics_parse_and_the_depth_gauge_moves_with_the_queue(http):
    drained(http)
    before = scrape(http)
    assert all(depth(before, s) == 0 for s in STAGES)
    for stage in STAGES:
        assert before[("stagepool_workers", (("stage", stage),))] == 1
        assert before[("stagepool_ring_capacity", (("stage", stage),))] == 256
    assert before[("stagepool_broker_up", ())] == 1

    jobs = 20
    ids = [http.post("/v1/jobs", json={"params": {}}).json()["job_id"] for _ in range(jobs)]
    loaded = scrape(http)
    assert depth(loaded, "encode") >= jobs - 3  # one worker at 100 ms a stage: most still wait
    assert loaded[("stagepool_queue_oldest_age_seconds", (("stage", "encode"),))] > 0
    assert loaded[("stagepool_jobs_active", ())] >= jobs - 1

    seen_downstream = False
    deadline = time.monotonic() + 120
    while True:
        samples = scrape(http)
        seen_downstream |= depth(samples, "denoise") + depth(samples, "decode") > 0 or \
            samples[("stagepool_in_flight", (("stage", "denoise"),))] > 0
        if samples[("stagepool_jobs_active", ())] == 0:
            break
        assert time.monotonic() < deadline, "the queue never drained"
        time.sleep(0.2)
    assert seen_downstream
    after = samples
    assert all(depth(after, s) == 0 for s in STAGES)
    for stage in STAGES:
        key = (("stage", stage),)
        counted = after[("stagepool_stage_duration_seconds_count", key)] - \
            before[("stagepool_stage_duration_seconds_count", key)]
        assert counted == jobs, stage
        waited = after[("stagepool_queue_wait_seconds_count", key)] - \
            before[("stagepool_queue_wait_seconds_count", key)]
        assert waited == jobs, stage
        # 100 ms of work a stage, measured between Redis commits.
        ran_s = after[("stagepool_stage_duration_seconds_sum", key)] - \
            before[("stagepool_stage_duration_seconds_sum", key)]
        assert 0.09 * jobs <= ran_s <= 10 * jobs
    ended = after[("stagepool_jobs_ended_total", (("state", "succeeded"),))] - \
        before[("stagepool_jobs_ended_total", (("state", "succeeded"),))]
    assert ended == jobs
    assert all(http.get(f"/v1/jobs/{i}").json()["state"] == "succeeded" for i in ids)


# -- the broker out of reach -------------------------------------------------------------


def test_a_submit_while_the_broker_is_frozen_is_queued_in_redis_and_runs(cluster, http):
    broker_pid = cluster.pids()["broker"]
    os.kill(broker_pid, signal.SIGSTOP)
    try:
        response = http.post("/v1/jobs", json={"params": {"prompt": "later"}})
        assert response.status_code == 202, response.text
        assert response.json()["via"] == "ingress"
        queues = http.get("/v1/queues").json()
        assert queues["broker_up"] is False
        assert queues["stages"][0]["workers"] is None  # unknown, not zero
    finally:
        os.kill(broker_pid, signal.SIGCONT)
    job = wait_state(http, response.json()["job_id"])
    assert job["state"] == "succeeded" and job["params"] == {"prompt": "later"}


# -- property-based ------------------------------------------------------------------------


def test_schemathesis_finds_no_server_error_and_no_spec_violation(cluster, http, tmp_path):
    """Every operation of /openapi.json, fuzzed: no 5xx, statuses and bodies as documented,
    bad bodies refused, good ones accepted. `use_after_free` is left out: DELETE cancels a
    job, and a cancelled job can still be read, by design."""
    run = subprocess.run(
        [sys.executable, "-m", "schemathesis.cli", "run", f"{cluster.gateway}/openapi.json",
         "-H", f"Authorization: Bearer {TOKEN}", "--checks", "all",
         "--exclude-checks", "use_after_free", "--max-examples", "40", "--workers", "1",
         "--seed", "1"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    log = (cluster.state_dir / "logs" / "gateway.log").read_text()
    assert "Traceback" not in log


def test_top_prints_the_stages_workers_and_recent_jobs(cluster, http):
    job_id = http.post("/v1/jobs", json={"params": {}}).json()["job_id"]
    wait_state(http, job_id)
    run = subprocess.run(
        [sys.executable, "-m", "stagepool.broker.cli", "top", "--once", "--config",
         str(cluster.config_path), "--state-dir", str(cluster.state_dir)],
        capture_output=True, text=True, timeout=60, env={**os.environ, "COLUMNS": "120"})
    assert run.returncode == 0, run.stderr
    assert "broker up" in run.stdout
    for stage in STAGES:
        assert stage in run.stdout
    assert job_id[:16] in run.stdout and "succeeded" in run.stdout
