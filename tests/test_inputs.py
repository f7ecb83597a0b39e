"""Image-conditioned jobs through the three stages (the tiny Wan2.1 image-to-video model): the
image reaches the encode stage from every way in, changes the output, and every bad input is
refused at the door with its reason and nothing queued."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from stagepool.common.jobstore import JobStore

from .conftest import Cluster, RedisServer, gateway_client
from .test_models import conditioning_image

pytestmark = pytest.mark.cluster

INPUTS = """
[inputs]
max_pixels = 1000000
max_bytes = 2000000
"""


def png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tiny_models):
    tmp = tmp_path_factory.mktemp("inputs")
    redis_server = RedisServer(tmp / "redis")
    cluster = Cluster(tmp, redis_server.url, f"i{uuid.uuid4().hex[:8]}", workers=1,
                      models=tiny_models["tiny-i2v"], family="tiny-i2v", lease_ms=30000,
                      extra=INPUTS)
    cluster.redis_url = redis_server.url
    yield cluster
    cluster.stop()
    redis_server.stop()


@contextlib.contextmanager
def cluster_http(tmp_path, model_dir, family: str):
    """A cluster of `family` on a tiny model directory (one worker per stage, [inputs] as
    above), and an HTTP client of its gateway once its workers are up."""
    redis_server = RedisServer(tmp_path / "redis")
    cluster = Cluster(tmp_path, redis_server.url, f"c{uuid.uuid4().hex[:8]}", workers=1,
                      models=model_dir, family=family, lease_ms=30000, extra=INPUTS)
    try:
        http = gateway_client(cluster.gateway, http_timeout_s=150)
        try:
            yield http
        finally:
            http.close()
    finally:
        cluster.stop()
        redis_server.stop()


@pytest.fixture(scope="module")
def http(cluster):
    client = gateway_client(cluster.gateway, http_timeout_s=150)
    yield client
    client.close()


def _frames(http, job_id: str) -> np.ndarray:
    job = http.get(f"/v1/jobs/{job_id}/wait", params={"timeout_s": 120}).json()
    assert job["state"] == "succeeded", job
    return np.load(job["result"]["files"]["frames"])


def test_an_image_reaches_encode_from_json_multipart_and_the_ingress_stream(cluster, http):
    a, b = png(conditioning_image()), png(conditioning_image(shift=5))
    params = {"prompt": "a fox turns its head", "seed": 4, "width": 48, "save_npy": True}
    # JSON, base64 as a data URL
    body = {"params": {**params, "image": "data:image/png;base64," + base64.b64encode(a).decode()},
            "job_id": "json-a"}
    assert http.post("/v1/jobs", json=body).status_code == 201
    # The same seed, another image
    body = {"params": {**params, "image": base64.b64encode(b).decode()}, "job_id": "json-b"}
    assert http.post("/v1/jobs", json=body).status_code == 201
    # LightX2V's multipart route, the image uploaded as image_file
    form = {"prompt": params["prompt"], "seed": "4", "task_id": "form-a", "infer_steps": "4",
            "target_shape": "32,48", "target_video_length": "5"}
    created = http.post("/v1/tasks/video/form", data=form,
                        files={"image_file": ("a.png", a, "image/png")})
    assert created.status_code == 200, created.text
    # Any language: store the image (SET with an expiry), then XADD the job naming it.
    store = JobStore(cluster.redis_url, cluster.info["namespace"])
    digest = hashlib.sha256(a).hexdigest()
    store.redis.set(f"{store.keys.prefix}blob:{digest}", a, ex=3600)
    store.redis.xadd(store.keys.ingress, {"job": json.dumps(
        {"job_id": "xadd-a", "params": {**params, "image": f"blob:{digest}"}})})
    frames = {job_id: _frames(http, job_id) for job_id in ("json-a", "json-b", "xadd-a")}
    task = http.get("/v1/tasks/form-a/status").json()
    deadline = time.monotonic() + 120
    while task["status"] not in ("completed", "failed"):
        assert time.monotonic() < deadline, task
        time.sleep(0.1)
        task = http.get("/v1/tasks/form-a/status").json()
    assert task["status"] == "completed", task
    assert frames["json-a"].shape == (5, 32, 48, 3)
    assert np.array_equal(frames["json-a"], frames["xadd-a"])  # same image, same seed
    assert not np.array_equal(frames["json-a"], frames["json-b"])  # the image was used
    store.close()


def test_bad_inputs_are_refused_at_the_door_with_their_reason_and_nothing_queued(cluster, http):
    jobs_before = http.get("/v1/queues").json()["totals"]["jobs"]
    params = {"prompt": "p", "width": 48}
    huge = png(conditioning_image(width=1200, height=1000))  # 1.2 M pixels > 1 M
    cases = {
        "not an image": {"params": {**params, "image": base64.b64encode(b"%PDF-1.4 " * 20).decode()}},
        "over the pixel limit": {"params": {**params, "image": base64.b64encode(huge).decode()}},
        "a path outside the input dir": {"params": {**params, "image": "/etc/passwd"}},
        "a URL while URLs are off": {"params": {**params, "image": "http://127.0.0.1:1/x.png"}},
        "no image at all": {"params": params},
        "an unstored blob": {"params": {**params, "image": "blob:" + "0" * 64}},
        "an unknown LoRA": {"params": {**params, "lora_name": "anime", "image":
                                       base64.b64encode(png(conditioning_image())).decode()}},
    }
    reasons = {}
    for name, body in cases.items():
        response = http.post("/v1/jobs", json=body)
        assert response.status_code == 422, (name, response.text)
        reasons[name] = response.json()["message"]
    assert "not an image" in reasons["not an image"]
    assert "pixels > the limit" in reasons["over the pixel limit"]
    assert "server paths are off" in reasons["a path outside the input dir"]
    assert "URLs are off" in reasons["a URL while URLs are off"]
    assert "missing required field `image`" in reasons["no image at all"]
    assert "no such input" in reasons["an unstored blob"]
    assert "no LoRA is configured" in reasons["an unknown LoRA"]
    for field, value in (("audio_path", "a.wav"), ("lora_name", "anime")):
        response = http.post("/v1/tasks/video/", json={"prompt": "p", field: value})
        assert response.status_code == 422 and field in response.json()["message"]
    assert http.get("/v1/queues").json()["totals"]["jobs"] == jobs_before


def test_a_photo_sized_image_fits_a_submit_and_a_body_over_the_input_limit_gets_413(cluster,
                                                                                   http):
    """The JSON body limit (gateway.max_body_kb, 256 KiB) grows by a base64 image of
    inputs.max_bytes on an image pipeline; past that, JSON and multipart alike get 413 before
    the body is read further (a file part is never spooled to disk unbounded)."""
    noise = np.random.default_rng(0).integers(0, 256, (560, 600, 3), dtype=np.uint8)
    from PIL import Image

    photo = png(Image.fromarray(noise))
    assert 800_000 < len(photo) < 2_000_000  # incompressible: a photo's size, over 256 KiB
    body = {"params": {"prompt": "p", "width": 48, "seed": 1,
                       "image": base64.b64encode(photo).decode()}, "job_id": "photo-1"}
    assert http.post("/v1/jobs", json=body).status_code == 201
    jobs_before = http.get("/v1/queues").json()["totals"]["jobs"]
    too_big = photo * 3  # ~3 MB > inputs.max_bytes, and its base64 > the body limit
    body = {"params": {"prompt": "p", "image": base64.b64encode(too_big).decode()}}
    assert http.post("/v1/jobs", json=body).status_code == 413
    task = {"prompt": "p", "image_path": base64.b64encode(too_big).decode()}
    assert http.post("/v1/tasks/image/", json=task).status_code == 413
    form = http.post("/v1/tasks/video/form", data={"prompt": "p"},
                     files={"image_file": ("big.png", too_big * 2, "image/png")})
    assert form.status_code == 413, form.text
    assert http.get("/v1/queues").json()["totals"]["jobs"] == jobs_before
    job = http.get("/v1/jobs/photo-1/wait", params={"timeout_s": 120}).json()
    assert job["state"] == "succeeded", job


def test_a_text_only_pipeline_refuses_an_image_instead_of_ignoring_it(tmp_path, tiny_models):
    with cluster_http(tmp_path, tiny_models["tiny"], "tiny") as http:
        image = base64.b64encode(png(conditioning_image())).decode()
        refused = http.post("/v1/tasks/image/", json={"prompt": "p", "image_path": image})
        assert refused.status_code == 422
        assert "takes no image" in refused.json()["message"]
        native = http.post("/v1/jobs", json={"params": {"prompt": "p", "image": image}})
        assert native.status_code == 422 and "takes no image" in native.json()["message"]
        assert http.get("/v1/queues").json()["totals"]["jobs"] == 0


def test_an_image_edit_runs_from_lightx2v_and_native_requests_and_uses_its_image(
        tmp_path, tiny_models):
    """Qwen-Image-Edit (tiny): LightX2V's i2i request (image_path as base64, target_shape, its
    guidance_scale the family's true_cfg_scale) and the native one give the same image for the
    same input and seed; another input, another image. Several images at once (the 2509
    model's multi-image edit) are refused."""
    with cluster_http(tmp_path, tiny_models["qwen-image-edit"], "tiny-qwen-image-edit") as http:
        a, b = (base64.b64encode(png(conditioning_image(shift=s))).decode() for s in (0, 5))
        task = {"prompt": "make it red", "negative_prompt": " ", "guidance_scale": 2.5,
                "seed": 3, "infer_steps": 4, "target_shape": [32, 48], "image_path": a}
        synced = http.post("/v1/tasks/image/sync", json=task)
        assert synced.status_code == 200, synced.text
        assert synced.headers["content-type"] == "image/png"
        params = {"prompt": "make it red", "negative_prompt": " ", "true_cfg_scale": 2.5,
                  "seed": 3, "height": 32, "width": 48}
        for job_id, image in (("edit-a", a), ("edit-b", b)):
            created = http.post("/v1/jobs", json={"params": {**params, "image": image},
                                                  "job_id": job_id})
            assert created.status_code == 201, created.text
        files = {}
        for job_id in ("edit-a", "edit-b"):
            job = http.get(f"/v1/jobs/{job_id}/wait", params={"timeout_s": 120}).json()
            assert job["state"] == "succeeded", job
            files[job_id] = Path(job["result"]["files"]["image"]).read_bytes()
        assert files["edit-a"] == synced.content  # the same input, seed and size
        assert files["edit-a"] != files["edit-b"]  # the image was used
        several = http.post("/v1/tasks/image/", json={**task, "image_path": "1.png,2.png"})
        assert several.status_code == 422 and "one image" in several.json()["message"]


def test_a_multi_image_edit_takes_a_list_or_lightx2vs_comma_separated_images(tmp_path,
                                                                             tiny_models):
    """Qwen-Image-Edit-2509's pipeline (tiny): two images as a JSON list and as LightX2V's
    comma-separated image_path give the same image; one image alone, another; four are
    refused before anything is queued."""
    with cluster_http(tmp_path, tiny_models["qwen-image-edit"],
                      "tiny-qwen-image-edit-plus") as http:
        a, b = (base64.b64encode(png(conditioning_image(shift=s))).decode() for s in (0, 5))
        prompt = {"prompt": "the fox of Picture 1 in the snow of Picture 2", "seed": 3}
        task = {**prompt, "infer_steps": 4, "target_shape": [32, 48], "image_path": f"{a},{b}",
                "task_id": "plus-lightx2v"}
        assert http.post("/v1/tasks/image/", json=task).status_code == 200
        params = {**prompt, "height": 32, "width": 48}
        for job_id, image in (("plus-list", [a, b]), ("plus-one", [a])):
            created = http.post("/v1/jobs", json={"params": {**params, "image": image},
                                                  "job_id": job_id})
            assert created.status_code == 201, created.text
        files = {}
        for job_id in ("plus-lightx2v", "plus-list", "plus-one"):
            job = http.get(f"/v1/jobs/{job_id}/wait", params={"timeout_s": 120}).json()
            assert job["state"] == "succeeded", job
            files[job_id] = Path(job["result"]["files"]["image"]).read_bytes()
        assert files["plus-lightx2v"] == files["plus-list"]
        assert files["plus-list"] != files["plus-one"]  # the second image was used
        jobs_before = http.get("/v1/queues").json()["totals"]["jobs"]
        four = http.post("/v1/jobs", json={"params": {**params, "image": [a, b, a, b]}})
        assert four.status_code == 422 and "a job takes 1 to 3" in four.json()["message"]
        assert http.get("/v1/queues").json()["totals"]["jobs"] == jobs_before
