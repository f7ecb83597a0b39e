"""Model stages: encode, denoise and decode over a model family (stages/families).

Config (`[[pipeline.stages]]`): `kind = "encode" | "denoise" | "decode"` and options
  family      "tiny" (default) | "wan2.1" | "qwen-image" | "tiny-qwen-image" | an entry point in the
              `stagepool.families` group | "module:Class" (a stages.families.Family)
  model_path  a local Diffusers directory; nothing is downloaded
  device      "auto" (the default: cuda if present, else cpu) | "cpu" | "cuda" | "cuda:N";
              with `devices` (or `stagepool worker --gpu`) each worker sees its GPU as cuda
  dtype       "float32" | "bfloat16" | "float16"
  results_dir where decode writes its files (default: config.DEFAULT_RESULTS_DIR)
  lora_dir, loras  denoise: the LoRAs a job may pick by `lora_name` (<lora_dir>/<name>.safetensors,
              loaded on first use, a few kept at once)

Per job:
  encode   params -> prompt embeddings (held in the worker's pool for denoise to pull)
  denoise  embeddings -> latents; reports step i/N to Redis as it goes
  decode   latents -> PNG (one frame) or MP4 (several), plus the frames as .npy when the job
           asks (`params.save_npy = true`); the result names the files
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from ..common.config import DEFAULT_RESULTS_DIR
from ..common.errors import StageStopped
from .base import JobContext, Stage, StageOutput
from .families.params import image_refs

log = logging.getLogger(__name__)


class ModelOptions(msgspec.Struct, forbid_unknown_fields=True):
    """A model stage's `options` (see the module's docstring)."""

    family: str = "tiny"
    model_path: str = ""
    device: str = "auto"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    threads: Annotated[int, msgspec.Meta(ge=1)] | None = None
    results_dir: str = DEFAULT_RESULTS_DIR
    # The denoise stage's LoRAs: `lora_dir/<name>.safetensors` for each name in `loras`; a
    # job picks one by `lora_name` (the broker refuses any other).
    lora_dir: str = ""
    loras: list[str] = []


class ModelStage(Stage):
    uses_tensors = True
    role = ""
    Options = ModelOptions

    def load(self) -> None:
        import torch

        from . import families

        opts = self.config.options
        device = opts.get("device", "auto")
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if "threads" in opts:
            torch.set_num_threads(int(opts["threads"]))
        self.family = families.create(opts.get("family", "tiny"), opts.get("model_path") or "",
                                      device, opts.get("dtype", "float32"))
        self.family.lora_dir = opts.get("lora_dir", "")
        self.family.load(self.role)
        self.device = str(self.family.device)

    def run(self, job: JobContext) -> StageOutput:
        """The stage's part of the job, then one log line: its time and, on a GPU, the peak
        memory this process has reserved (what it keeps from the stages beside it)."""
        started = time.perf_counter()
        out = self.call(job)
        gpu = ""
        if self.family.device.type == "cuda":
            import torch

            gpu = f", peak GPU memory {torch.cuda.max_memory_reserved() / 2**20:.0f} MiB reserved"
        log.info("%s %s: %.0f ms%s", self.role, job.job_id,
                 (time.perf_counter() - started) * 1e3, gpu)
        return out

    def call(self, job: JobContext) -> StageOutput:
        raise NotImplementedError


class EncodeStage(ModelStage):
    role = "encode"

    def call(self, job: JobContext) -> StageOutput:
        params = job.params
        refs = image_refs(params)  # the stored inputs, checked at the door
        if refs:
            images = [_open_image(job.read_input(ref)) for ref in refs]
            params = {**params, "image": images if isinstance(params["image"], list)
                      else images[0]}
        return StageOutput(tensors=self.family.encode(params))


def _open_image(data: bytes):
    import io

    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return image.convert("RGB")


class DenoiseStage(ModelStage):
    role = "denoise"

    def call(self, job: JobContext) -> StageOutput:
        try:
            return StageOutput(tensors=self.family.denoise(job.params, job.inputs,
                                                           job.progress))
        except StageStopped:
            # The loop's activations are freed by now; hand the cached blocks back too, for
            # the other stages' workers that may share this GPU.
            import torch

            if self.family.device.type == "cuda":
                torch.cuda.empty_cache()
            raise


class DecodeStage(ModelStage):
    role = "decode"

    def call(self, job: JobContext) -> StageOutput:
        started = time.perf_counter()
        frames = self.family.decode(job.params, job.inputs)  # (F, H, W, 3) in [0, 1]
        decoded = time.perf_counter()
        out_dir = Path(self.config.options.get("results_dir", DEFAULT_RESULTS_DIR))
        files = write_frames(frames, out_dir / f"{job.job_id}", fps=int(job.params.get("fps", 16)),
                             save_npy=bool(job.params.get("save_npy")))
        log.info("decode %s: %d frames, vae %.0f ms, write %.0f ms", job.job_id, len(frames),
                 (decoded - started) * 1e3, (time.perf_counter() - decoded) * 1e3)
        result: dict[str, Any] = {"files": files, "frames": int(len(frames)),
                                  "height": int(frames.shape[1]), "width": int(frames.shape[2]),
                                  "family": self.family.name}
        return StageOutput(result=result)


def write_frames(frames, stem: Path, *, fps: int = 16, save_npy: bool = False) -> dict[str, str]:
    """Frames (F, H, W, 3) in [0, 1] to `stem`.png (one frame) or `stem`.mp4 (H.264), plus the
    float frames as `stem`.npy when asked; returns {"image" | "video", "frames": path}.

    `frames` is a numpy array or a torch tensor on any device; a tensor's pixels are made where
    it is (on a GPU: no float copy to the host, a quarter of the bytes cross, and no
    single-threaded numpy passes over them), with the same float32 arithmetic, so the
    pixels are the same bytes either way."""
    import numpy as np

    stem.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(frames, np.ndarray):
        pixels = (frames * 255).round().clip(0, 255).astype(np.uint8)
    else:
        import torch

        pixels = (frames * 255).round().clamp(0, 255).to(torch.uint8).cpu().numpy()
        if save_npy:
            frames = frames.float().cpu().numpy()
    files: dict[str, str] = {}
    if len(pixels) == 1:
        from PIL import Image

        files["image"] = _atomic(stem.with_suffix(".png"),
                                 lambda p: Image.fromarray(pixels[0]).save(p, format="PNG"))
    else:
        import imageio.v3 as iio

        files["video"] = _atomic(stem.with_suffix(".mp4"), lambda p: iio.imwrite(
            p, pixels, extension=".mp4", fps=fps, codec="libx264"))
    if save_npy:
        files["frames"] = _atomic(stem.with_suffix(".npy"),
                                  lambda p: np.save(p, frames, allow_pickle=False))
    return files


def _atomic(path: Path, write) -> str:
    """Write through a temporary name, so a half-written file never has the final name. The
    real extension stays last: PyAV and Pillow pick the container by the file name."""
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    with open(tmp, "wb") as f:
        write(f)
    tmp.replace(path)
    return str(path.resolve())
