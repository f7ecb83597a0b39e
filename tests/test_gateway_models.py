"""The gateway over the tiny model stages: LightX2V-compatible routes with real result files,
transfer metrics, and the dashboard in headless Chromium (Debian's, driven by Playwright).
"""

from __future__ import annotations

import shutil
import time
import uuid

import pytest
from prometheus_client.parser import text_string_to_metric_families

from stagepool.common.client import BrokerClient
from stagepool.common.errors import RemoteError
from stagepool.common.jobstore import JobStore

from .conftest import Cluster, RedisServer, gateway_client, wait_ended

CHROMIUM = shutil.which("chromium")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tiny_models):
    tmp = tmp_path_factory.mktemp("gateway-models")
    redis_server = RedisServer(tmp / "redis")
    cluster = Cluster(tmp, redis_server.url, f"m{uuid.uuid4().hex[:8]}", workers=1,
                      models=tiny_models["tiny"], lease_ms=30000, max_attempts=2)
    yield cluster
    cluster.stop()
    redis_server.stop()


@pytest.fixture(scope="module")
def http(cluster):
    client = gateway_client(cluster.gateway)
    yield client
    client.close()


def task_status(http, task_id, until=("completed", "failed", "cancelled"), timeout_s=180.0):
    seen = []
    deadline = time.monotonic() + timeout_s
    while True:
        status = http.get(f"/v1/tasks/{task_id}/status").json()
        if not seen or seen[-1] != status["status"]:
            seen.append(status["status"])
        if status["status"] in until:
            return status, seen
        assert time.monotonic() < deadline, f"task {task_id}: {seen}"
        time.sleep(0.05)


def test_lightx2v_image_and_video_tasks_end_with_their_files(http):
    image = http.post("/v1/tasks/image/", json={
        "prompt": "a red fox", "negative_prompt": "blurry", "seed": 7, "infer_steps": 3,
        "target_shape": [32, 48], "use_prompt_enhancer": False, "some_new_field": 1})
    assert image.status_code == 200, image.text
    body = image.json()
    assert body["task_status"] == "pending" and body["save_result_path"] == body["task_id"]
    video = http.post("/v1/tasks/video/", json={"prompt": "waves", "seed": 3, "infer_steps": 2,
                                                "target_video_length": 5}).json()
    wide = http.post("/v1/tasks/image/", json={"prompt": "wide", "aspect_ratio": "16:9"}).json()
    bad = http.post("/v1/tasks/image/", json={"prompt": "x", "aspect_ratio": "wide"})
    assert bad.status_code == 422 and "aspect_ratio" in bad.json()["message"]

    status, seen = task_status(http, body["task_id"])
    assert status["status"] == "completed", status
    assert seen[0] in ("pending", "processing") and seen[-1] == "completed"
    # LightX2V's shapes: a relative result name, ISO times, no error
    image_name = status["save_result_path"]
    assert image_name == f"{body['task_id']}.png"
    assert status["end_time"] >= status["start_time"] > "2026"
    assert status["error"] is None and status["error_type"] == ""
    png = http.get(f"/v1/tasks/{body['task_id']}/result")
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert png.content[:8] == b"\x89PNG\r\n\x1a\n"
    job = http.get(f"/v1/jobs/{body['task_id']}").json()
    assert job["params"]["height"] == 32 and job["params"]["width"] == 48
    assert job["params"]["num_frames"] == 1 and job["params"]["infer_steps"] == 3
    assert job["result"]["height"] == 32 and job["result"]["width"] == 48
    # It was processing in between, stage after stage (a 50 ms poll may miss that state).
    starts = [job["stages"][s]["started_ms"] for s in ("encode", "denoise", "decode")]
    assert starts == sorted(starts) and job["stages"]["decode"]["finished_ms"] >= starts[-1]
    assert http.get(f"/v1/jobs/{body['task_id']}/result?file=image").content == png.content
    assert http.get(f"/v1/jobs/{body['task_id']}/result?file=video").status_code == 404

    status, _ = task_status(http, video["task_id"])
    assert status["status"] == "completed", status
    mp4 = http.get(f"/v1/tasks/{video['task_id']}/result")
    assert mp4.headers["content-type"] == "video/mp4" and mp4.content[4:8] == b"ftyp"

    assert task_status(http, wide["task_id"])[0]["status"] == "completed"
    result = http.get(f"/v1/jobs/{wide['task_id']}").json()["result"]
    assert (result["height"], result["width"]) == (32, 48)  # 16:9 at the tiny default 32x32 area

    listed = http.get("/v1/tasks/").json()  # an object keyed by task id, as theirs
    assert listed[body["task_id"]]["status"] == listed[video["task_id"]]["status"] == "completed"
    download = http.get(f"/v1/files/download/{image_name}")
    assert download.status_code == 200 and download.content == png.content
    assert http.get("/v1/files/download/../../etc/passwd").status_code in (403, 404)
    done = http.delete(f"/v1/tasks/{body['task_id']}").json()
    assert done["stop_status"] == "do_nothing"
    assert http.get("/v1/tasks/nope/status").status_code == 404
    assert http.get("/v1/tasks/nope/result").status_code == 404


def test_lightx2v_service_sync_legacy_and_stop_all_routes_answer_as_theirs(cluster, http):
    """The request bodies LightX2V's scripts send, the shapes its server answers."""
    assert http.get("/health").json() == {"status": "healthy"}
    meta = http.get("/v1/service/metadata").json()
    assert meta["model_cls"] == "tiny" and meta["nproc_per_node"] >= 3
    # Its multi-server scripts wait for `idle` between tasks.
    deadline = time.monotonic() + 60
    while http.get("/v1/service/status").json()["service_status"] != "idle":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    status = http.get("/v1/service/status").json()
    assert set(status) >= {"service_status", "current_task", "active_tasks", "pending_tasks",
                           "queue_size", "total_tasks", "completed_tasks", "failed_tasks"}
    # The sync route answers the PNG itself.
    sync = http.post("/v1/tasks/image/sync", params={"timeout_seconds": 120},
                     json={"prompt": "a pear", "seed": 2, "infer_steps": 2})
    assert sync.status_code == 200 and sync.content[:8] == b"\x89PNG\r\n\x1a\n"
    # The legacy route takes the pipeline's type (the tiny one makes images).
    legacy = http.post("/v1/tasks/", json={"prompt": "a plum", "infer_steps": 2}).json()
    assert legacy["task_status"] == "pending"
    status, _ = task_status(http, legacy["task_id"])
    assert status["status"] == "completed" and status["save_result_path"].endswith(".png")
    # Stop every running task at once.
    slow = [http.post("/v1/tasks/image/", json={"prompt": f"s{i}", "infer_steps": 400}).json()
            for i in range(3)]
    stopped = http.delete("/v1/tasks/all/running").json()
    assert stopped["stop_status"] == "success"
    for task in slow:
        assert task_status(http, task["task_id"])[0]["status"] == "cancelled"


def test_bad_params_are_refused_at_every_door_and_reach_no_worker(cluster, http):
    store = JobStore(cluster.info["redis_url"], cluster.info["namespace"])
    # HTTP: 422 naming the field; no job is created.
    for i, bad in enumerate([{"height": "64"}, {"width": 100}, {"num_frames": 4},
                             {"colour": "red"}, {"prompt": "x" * 5000}]):
        response = http.post("/v1/jobs", json={"job_id": f"h{i}", "params": {"prompt": "p",
                                                                             **bad}})
        assert response.status_code == 422, response.text
        body = response.json()
        assert body["code"] == "invalid_params" and "invalid params" in body["message"]
        assert store.get(f"h{i}") is None
    assert "$.height" in http.post("/v1/jobs", json={"params": {"height": "64"}}).json()["message"]
    lightx2v = http.post("/v1/tasks/image/", json={"prompt": "x", "target_shape": [40, 40]})
    assert lightx2v.status_code == 422 and "$.height" in lightx2v.json()["message"]
    # ZMQ: an error to the sender alone.
    with BrokerClient(cluster.broker) as client:
        with pytest.raises(RemoteError) as refused:
            client.submit({"infer_steps": 0}, job_id="z")
    assert refused.value.code == "invalid_params" and "$.infer_steps" in refused.value.message
    # Ingress: a rejected entry, recorded as a failed job its sender can read.
    store.redis.xadd(store.keys.ingress, {"job": '{"job_id": "x", "params": {"seed": -1}}'})
    assert wait_ended(store, ["x"], 30) == ["failed"]
    assert "invalid params" in store.get("x")["error"] and "$.seed" in store.get("x")["error"]
    # No worker saw any of them.
    started = {f[b"job"] for _, f in store.redis.xrange(store.keys.events)
               if f[b"event"] == b"started"}
    assert not started & {b"h0", b"h1", b"h2", b"h3", b"h4", b"z", b"x"}
    store.close()


def test_lightx2v_stop_and_queue_status(http):
    ids = [http.post("/v1/tasks/image/", json={"prompt": f"p{i}", "infer_steps": 4}).json()
           ["task_id"] for i in range(4)]
    queue = http.get("/v1/tasks/queue/status").json()
    assert queue["active_count"] >= 1 and queue["pending_count"] <= queue["active_count"]
    assert queue["is_processing"] is (queue["active_count"] > queue["pending_count"])
    assert queue["queue_size"] == 256 and queue["queue_available"] <= 256 - queue["active_count"]
    stopped = http.delete(f"/v1/tasks/{ids[-1]}").json()
    assert stopped["stop_status"] == "success"
    status, _ = task_status(http, ids[-1])
    assert status["status"] == "cancelled"
    assert http.get(f"/v1/tasks/{ids[-1]}/result").status_code == 404
    for task_id in ids[:-1]:
        assert task_status(http, task_id)[0]["status"] == "completed"
    queue = http.get("/v1/tasks/queue/status").json()
    assert queue == {"is_processing": False, "current_task": None, "pending_count": 0,
                     "active_count": 0, "queue_size": 256, "queue_available": 256}


def test_transfer_counters_reach_the_metrics(http):
    job_id = http.post("/v1/jobs", json={"params": {"prompt": "x"}}).json()["job_id"]
    task_status(http, job_id)
    deadline = time.monotonic() + 10  # workers flush their counters with each heartbeat
    while True:
        samples = {}
        for family in text_string_to_metric_families(http.get("/metrics").text):
            for s in family.samples:
                samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
        put = samples.get(("stagepool_transfer_bytes_total",
                           (("backend", "pool"), ("phase", "put"), ("stage", "encode"))), 0)
        pulled = samples.get(("stagepool_transfer_bytes_total",
                              (("backend", "local"), ("phase", "pull"), ("stage", "denoise"))), 0)
        if put > 0 and pulled > 0:
            break
        assert time.monotonic() < deadline, {k: v for k, v in samples.items()
                                             if "transfer" in k[0]}
        time.sleep(0.2)
    seconds = samples[("stagepool_transfer_seconds_total",
                       (("backend", "local"), ("phase", "pull"), ("stage", "denoise")))]
    ops = samples[("stagepool_transfer_ops_total",
                   (("backend", "local"), ("phase", "pull"), ("stage", "denoise")))]
    assert seconds > 0 and ops >= 1 and pulled % ops == 0  # same-size embeddings per job


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed "
                                             "(make setup installs it as root)")
def test_dashboard_in_chromium_filters_opens_job_pages_cancels_and_retries(
        cluster, http, tmp_path):
    """Driven as an operator would: running jobs first with their steps, the workers panel,
    throughput per stage, a failed job found by its filter with its error's text, its page
    (timeline, events, params), cancel and retry buttons, search by id to a result preview,
    and charts that survive a reload. Screenshots are left in the test's tmp dir."""
    from playwright.sync_api import sync_playwright

    def submit(params, job_id=None):
        body = {"params": {"prompt": "dash", **params}, **({"job_id": job_id} if job_id else {})}
        return http.post("/v1/jobs", json=body).json()["job_id"]

    failed = submit({"time_limit_s": 0.001, "infer_steps": 3}, "dash-failed")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 1100})
        errors = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(cluster.gateway + "/")
        page.wait_for_selector("#stages tbody tr[data-stage='denoise']")
        page.wait_for_selector("#workers tbody tr[data-stage='decode']")
        assert page.locator("#workers tbody tr").count() == 3

        ids = [submit({"seed": i, "infer_steps": 40}) for i in range(8)]
        # Running jobs come first, with their step progress.
        page.wait_for_function(
            "(() => { const row = document.querySelector('#jobs tbody tr');"
            " return row && ['encoding', 'denoising', 'decoding'].includes(row.dataset.state); })()",
            timeout=60_000)
        page.wait_for_selector("#workers tbody tr[data-busy='1']", timeout=30_000)
        page.screenshot(path=str(tmp_path / "overview.png"), full_page=True)

        # Cancel the last one from its row, find it by the filter, retry it from there.
        victim = ids[-1]
        page.locator(f"#jobs tbody tr[data-job='{victim}'] button[data-action='cancel']").click()
        page.select_option("#filter-state", "cancelled")
        page.wait_for_selector(f"#jobs tbody tr[data-job='{victim}'][data-state='cancelled']")
        page.locator(f"#jobs tbody tr[data-job='{victim}'] button[data-action='retry']").click()
        deadline = time.monotonic() + 120
        while http.get(f"/v1/jobs/{victim}").json()["state"] != "succeeded":
            assert time.monotonic() < deadline, "the retried job never succeeded"
            time.sleep(0.2)

        # The failed job: its filter, its error's text in the row, then its page.
        page.select_option("#filter-state", "failed")
        row = page.locator(f"#jobs tbody tr[data-job='{failed}']")
        row.wait_for(timeout=60_000)
        assert "time limit" in row.inner_text()
        row.locator("a").click()
        page.wait_for_selector(f"#job-title[data-state='failed'][data-job='{failed}']")
        assert "time limit" in page.locator("#job-error").inner_text()
        page.wait_for_selector("#job-events tr[data-event='retried']")
        assert "time limit" in page.locator("#job-events tr[data-event='failed'] td.detail").inner_text()
        assert page.locator("#timeline .lane[data-stage='denoise'] .run").count() == 1
        assert '"time_limit_s": 0.001' in page.locator("#job-params").inner_text()
        page.screenshot(path=str(tmp_path / "job-failed.png"), full_page=True)

        # Search by id: a succeeded job's page previews its image.
        page.fill("#search-id", ids[0])
        page.press("#search-id", "Enter")
        page.wait_for_selector(f"#job-title[data-state='succeeded'][data-job='{ids[0]}']",
                               timeout=120_000)
        page.wait_for_function(
            "(() => { const img = document.querySelector('#job-result img');"
            " return img && img.complete && img.naturalWidth > 0; })()", timeout=30_000)
        page.screenshot(path=str(tmp_path / "job-succeeded.png"), full_page=True)

        # Back to the overview after a reload: the history is the gateway's, not the page's.
        page.goto(cluster.gateway + "/")
        page.reload()
        page.wait_for_function("Number(document.getElementById('chart').dataset.points) >= 2",
                               timeout=15_000)
        page.wait_for_function(
            "Number(document.querySelector(\"#stages tr[data-stage='denoise']\")"
            ".dataset.donePerMin) > 0", timeout=15_000)
        assert page.locator("#broker").inner_text() == "broker up"
        browser.close()
    for name in ("overview.png", "job-failed.png", "job-succeeded.png"):
        assert (tmp_path / name).stat().st_size > 10_000, name
    assert errors == []
