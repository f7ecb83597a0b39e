"""Model stages on the real diffusers/transformers classes (tiny configs, built locally)."""

from __future__ import annotations

import collections
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from stagepool.common.client import BrokerClient
from stagepool.common.config import TransferConfig
from stagepool.common.jobstore import JobStore
from stagepool.common.transfer import Exchange, PullStatus
from stagepool.stages import families

from .conftest import DEVICE, wait_ended
from .reference import monolithic

CASES = {
    # family, model directory, params
    "tiny": ("tiny", "tiny", {"prompt": "a red fox in the snow", "seed": 7}),
    # The real families on the tiny directories, sized down by params.
    "wan2.1": ("wan2.1", "tiny", {"prompt": "a cat at sunset", "seed": 3, "num_frames": 5,
                                  "height": 32, "width": 32, "infer_steps": 4,
                                  "max_sequence_length": 32}),
    "qwen-image": ("qwen-image", "qwen-image",
                   {"prompt": "a bowl of fruit", "negative_prompt": "blurry", "seed": 11,
                    "height": 32, "width": 32, "infer_steps": 4, "max_sequence_length": 64}),
    "tiny-qwen-image": ("tiny-qwen-image", "qwen-image", {"prompt": "a pear", "seed": 5}),
    # Image-to-video: the encode stage sees the conditioning frame (a PIL image by then).
    "tiny-i2v": ("tiny-i2v", "tiny-i2v", {"prompt": "a fox turns its head", "seed": 9,
                                          "width": 48, "image": "gradient"}),
    # Image-to-image: the edit's output takes the image's size unless height/width say.
    "tiny-qwen-image-edit": ("tiny-qwen-image-edit", "qwen-image-edit",
                             {"prompt": "make it red", "seed": 4, "image": "gradient"}),
    "qwen-image-edit": ("qwen-image-edit", "qwen-image-edit",
                        {"prompt": "make it blue", "negative_prompt": "blurry", "seed": 6,
                         "infer_steps": 4, "image": "gradient"}),
    # Qwen-Image-Edit-2509's pipeline: several images (Picture 1, 2) or one.
    "tiny-qwen-image-edit-plus": ("tiny-qwen-image-edit-plus", "qwen-image-edit",
                                  {"prompt": "the cat of Picture 1 on the sofa of Picture 2",
                                   "negative_prompt": " ", "seed": 8,
                                   "image": ["gradient", "gradient-tall"]}),
    "qwen-image-edit-plus": ("qwen-image-edit-plus", "qwen-image-edit",
                             {"prompt": "make it green", "seed": 2, "infer_steps": 4,
                              "image": "gradient"}),
}


def with_images(params: dict) -> dict:
    """The case's params with its named test images made ("gradient", "gradient-tall")."""
    made = {"gradient": lambda: conditioning_image(),
            "gradient-tall": lambda: conditioning_image(width=24, height=40, shift=3)}
    image = params.get("image")
    if isinstance(image, list):
        return {**params, "image": [made[name]() for name in image]}
    return {**params, "image": made[image]()} if image in made else params


def conditioning_image(width: int = 48, height: int = 32, shift: int = 0):
    """A deterministic RGB image (a colour gradient; `shift` moves it)."""
    from PIL import Image

    x = np.linspace(0, 1, width)[None, :, None]
    y = np.linspace(0, 1, height)[:, None, None]
    rgb = np.concatenate([x + 0 * y, y + 0 * x, ((x + y + shift / 10) % 1)], axis=2)
    return Image.fromarray((rgb * 255).astype("uint8"))


def _hand_over(producer: Exchange, consumer: Exchange, key: str, tensors: dict) -> dict:
    """Move stage outputs the way workers do: held in one pool, pulled from the other."""
    descs = producer.put(key, tensors)
    pull = consumer.pull(producer.endpoint, descs)
    assert pull.wait(30) is PullStatus.DONE, pull.failure
    return pull.tensors


def _split(family: str, path: str, params: dict, dtype: str = "float32", steps=None):
    """The job through encode, denoise and decode instances, handed over as workers do: the
    decoded frames, and the encode stage's family."""
    encode, denoise, decode = (families.create(family, path, DEVICE, dtype) for _ in range(3))
    encode.load("encode")
    denoise.load("denoise")
    decode.load("decode")
    a, b = (Exchange(TransferConfig(backend="local", pool_mb=16)) for _ in range(2))
    progress = (lambda i, n: steps.append((i, n))) if steps is not None else (lambda i, n: None)
    try:
        embeds = _hand_over(a, b, "job/encode", encode.encode(params))
        latents = _hand_over(b, a, "job/denoise", denoise.denoise(params, embeds, progress))
        return decode.decode(params, latents).cpu().numpy(), encode
    finally:
        a.close()
        b.close()


# The edit pipelines encode their images at about 1 MP whatever the weights' size (seconds
# each on a CPU): one of them in the fast tier, the others beside the clusters.
_AT_1MP = {"qwen-image-edit", "qwen-image-edit-plus", "tiny-qwen-image-edit-plus"}


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.cluster) if c in _AT_1MP
                                  else c for c in sorted(CASES)])
def test_the_three_stage_split_equals_the_monolithic_pipeline(case, tiny_models):
    family, model_dir, params = CASES[case]
    params = with_images(params)
    steps = []
    split, encode = _split(family, str(tiny_models[model_dir]), params, steps=steps)
    whole = np.asarray(monolithic(encode, params))
    assert steps == [(i, 4) for i in range(1, 5)]
    assert split.shape == whole.shape
    assert float(np.abs(split - whole).max()) == 0.0


@pytest.mark.parametrize("case", ["tiny", "tiny-qwen-image", "tiny-i2v"])
def test_the_split_equals_the_monolithic_pipeline_in_bfloat16_too(case, tiny_models):
    """As the GPU configs run them: encoders and transformer in bfloat16, the VAE in float32."""
    family, model_dir, params = CASES[case]
    params = with_images(params)
    split, encode = _split(family, str(tiny_models[model_dir]), params, "bfloat16")
    assert float(np.abs(split - np.asarray(monolithic(encode, params))).max()) == 0.0


@pytest.mark.cluster
def test_an_edit_runs_with_bfloat16_encoders_beside_a_float32_vae(tiny_models):
    """diffusers' edit pipeline cannot: it casts the image to the encoder's dtype before its
    VAE. The encode stage hands the VAE its own dtype; the image stays near float32's (about
    1e-4 mean abs on the CPU, 9e-3 on an H100, where noise would be about 0.3)."""
    family, model_dir, params = CASES["tiny-qwen-image-edit"]
    params = with_images(params)
    path = str(tiny_models[model_dir])
    half, _ = _split(family, path, params, "bfloat16")
    full, _ = _split(family, path, params)
    assert half.shape == full.shape and np.isfinite(half).all()
    assert 0 < float(np.abs(half - full).mean()) < 0.05


def test_pixels_made_from_a_tensor_are_the_bytes_made_from_its_array(tmp_path):
    """The decode stage makes pixels where its frames are (on the GPU); the monolithic path
    makes them from the float array on the host: the same bytes."""
    from stagepool.stages.model import write_frames

    torch.manual_seed(0)
    frames = torch.rand(1, 48, 64, 3)
    frames[0, 0, :4, 0] = torch.tensor([0.5 / 255, 1.5 / 255, 254.5 / 255, 1.0])  # ties, edge
    frames = frames.to(DEVICE)
    from_tensor = write_frames(frames, tmp_path / "t", save_npy=True)
    from_array = write_frames(frames.cpu().numpy(), tmp_path / "a")
    assert Path(from_tensor["image"]).read_bytes() == Path(from_array["image"]).read_bytes()
    assert np.array_equal(np.load(from_tensor["frames"]), frames.cpu().numpy())


def _starts(store: JobStore, stage: str) -> collections.Counter:
    counts = collections.Counter()
    for _, fields in store.redis.xrange(store.keys.events, count=100_000):
        if fields[b"event"] == b"started" and fields[b"stage"] == stage.encode():
            counts[fields[b"job"].decode()] += 1
    return counts


@pytest.mark.cluster
def test_a_job_through_the_cluster_writes_the_monolithic_image(cluster_factory, redis_server,
                                                                namespace, tiny_models, tmp_path):
    cluster = cluster_factory(workers=1, models=tiny_models["tiny"], lease_ms=10_000)
    store = JobStore(redis_server.url, namespace)
    params = {"prompt": "a lighthouse at dawn", "seed": 5, "save_npy": True}
    with BrokerClient(cluster.broker, timeout_s=30) as client:
        cluster.wait_ready(client, 1, timeout_s=120)
        job_id = client.submit(params, job_id="one").job_id
        wait_ended(store, [job_id], 120)
        status = client.status(job_id)
    assert status.state == "succeeded", status.error
    files = status.result["files"]
    assert Path(files["image"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert status.stages["denoise"]["step"] == "4/4"
    frames = np.load(files["frames"])
    torch.set_num_threads(1)  # as the workers run: the same reduction order
    whole = monolithic(families.create("tiny", str(tiny_models["tiny"]), DEVICE), params)
    assert float(np.abs(frames - np.asarray(whole)).max()) == 0.0


@pytest.mark.cluster
def test_fifty_jobs_survive_a_killed_denoise_worker_without_reencoding(
        cluster_factory, redis_server, namespace, tiny_models):
    cluster = cluster_factory(workers=2, models=tiny_models["tiny"], lease_ms=2000)
    store = JobStore(redis_server.url, namespace)
    job_ids = [f"m-{i}" for i in range(50)]
    with BrokerClient(cluster.broker, timeout_s=30) as client:
        cluster.wait_ready(client, 2, timeout_s=120)
        for job_id in job_ids:
            client.submit({"prompt": f"prompt {job_id}", "seed": 1, "infer_steps": 40},
                          job_id=job_id)
        # Kill the first denoise worker in the middle of one of its jobs: in its first half
        # of steps, so that the kill lands before that attempt can commit.
        pid = cluster.pids()["denoise-0"]
        deadline = time.monotonic() + 120
        victim = None
        while victim is None:
            assert time.monotonic() < deadline, "denoise-0 never ran a job"
            for job_id in job_ids:
                record = store.get(job_id) or {}
                done, _, total = record.get("denoise.step", "").partition("/")
                if (record.get("state") == "denoising" and f"-{pid}-" in
                        record.get("denoise.worker", "") and done
                        and int(done) <= int(total) // 2):
                    victim = job_id
                    break
            time.sleep(0.01)
        os.kill(pid, signal.SIGKILL)
        states = wait_ended(store, job_ids, 240)
    assert collections.Counter(states) == {"succeeded": 50}
    assert int(store.get(victim)["denoise.attempt"]) >= 2  # the killed attempt was replayed
    encodes = _starts(store, "encode")
    assert set(encodes) == set(job_ids)
    assert max(encodes.values()) == 1, "a job was encoded again after the kill"


@pytest.mark.cluster
@pytest.mark.parametrize("transfer", ["local", "mooncake"])
def test_a_killed_encode_worker_sends_its_held_jobs_back_to_encode(
        transfer, cluster_factory, redis_server, namespace, tiny_models):
    cluster = cluster_factory(workers=1, models=tiny_models["tiny"], lease_ms=5000,
                              transfer=transfer)
    store = JobStore(redis_server.url, namespace)
    job_ids = [f"e-{i}" for i in range(12)]
    with BrokerClient(cluster.broker, timeout_s=30) as client:
        cluster.wait_ready(client, 1, timeout_s=120)
        # Slow denoising: encode runs ahead, holding embeddings for queued jobs.
        for job_id in job_ids:
            client.submit({"prompt": job_id, "seed": 2, "infer_steps": 25}, job_id=job_id)
        deadline = time.monotonic() + 120
        while sum(s == "denoising" or s == "decoding" or s == "succeeded"
                  for s in store.states(job_ids)) < 1 or _held_waiting(store, job_ids) < 3:
            assert time.monotonic() < deadline, "encode never ran ahead"
            time.sleep(0.02)
        os.kill(cluster.pids()["encode-0"], signal.SIGKILL)  # the supervisor restarts it
        states = wait_ended(store, job_ids, 240)
    assert collections.Counter(states) == {"succeeded": len(job_ids)}
    rewound = [j for j in job_ids if int(store.get(j).get("denoise.rewinds", 0)) > 0]
    assert rewound, "no job lost its embeddings with the encode worker"
    encodes = _starts(store, "encode")
    assert all(encodes[j] == 2 for j in rewound)


def _held_waiting(store: JobStore, job_ids: list[str]) -> int:
    """Jobs encoded and waiting in the denoise queue (their embeddings held by encode)."""
    count = 0
    for job_id in job_ids:
        record = store.get(job_id) or {}
        if "encode.done" in record and "denoise.started" not in record:
            count += 1
    return count


@pytest.fixture(scope="module")
def tiny_lora(tiny_models, tmp_path_factory):
    """A LoRA for the tiny Wan transformer (random, non-zero), saved as diffusers saves one."""
    from diffusers import WanPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = WanPipeline.from_pretrained(str(tiny_models["tiny"]))
    torch.manual_seed(3)
    pipe.transformer.add_adapter(LoraConfig(
        r=4, lora_alpha=4, init_lora_weights=False,
        target_modules=["to_q", "to_k", "to_v", "to_out.0"]), adapter_name="ink")
    directory = tmp_path_factory.mktemp("loras")
    WanPipeline.save_lora_weights(
        directory, transformer_lora_layers=get_peft_model_state_dict(pipe.transformer,
                                                         adapter_name="ink"),
        weight_name="ink.safetensors")
    return directory


def test_a_jobs_lora_is_loaded_on_first_use_and_the_split_equals_the_monolithic(
        tiny_models, tiny_lora):
    path = str(tiny_models["tiny"])
    encode, denoise, decode = (families.create("tiny", path, DEVICE) for _ in range(3))
    for family, stage in ((encode, "encode"), (denoise, "denoise"), (decode, "decode")):
        family.lora_dir = str(tiny_lora)
        family.load(stage)
    plain = {"prompt": "a heron", "seed": 8}
    inked = {**plain, "lora_name": "ink"}

    def split(params):
        embeds = encode.encode(params)
        return decode.decode(params, denoise.denoise(params, embeds, lambda i, n: None)).cpu().numpy()

    with_lora = split(inked)
    without = split(plain)  # the adapter is turned off for a job without one
    again = split(inked)  # and on again, from the worker's cache
    assert float(np.abs(with_lora - np.asarray(monolithic(encode, inked))).max()) == 0.0
    assert float(np.abs(without - np.asarray(monolithic(encode, plain))).max()) == 0.0
    assert not np.array_equal(with_lora, without)  # the LoRA was applied
    assert np.array_equal(with_lora, again)
