"""Model families: adapters that split a diffusers pipeline into encode, denoise and decode.

A family loads, for one stage, only the components that stage needs, from a local Diffusers
directory (`model_path`), and runs that stage's part of the pipeline with the pipeline's own
code, so the split output equals the monolithic pipeline's for the same seed:

  encode(params)                    -> tensors (prompt embeddings, masks)
  denoise(params, tensors, progress) -> tensors (latents); progress(step, steps) per step
  decode(params, tensors)           -> frames: a float tensor (frames, height, width, 3) in [0, 1],
                                       left on the device (the decode stage makes its pixels
                                       there and copies a quarter of the bytes back)

A family is named by `family = ...` in a model stage's options: a built-in one ("tiny",
"wan2.1", "qwen-image", "tiny-qwen-image"), an entry point in the `stagepool.families` group,
or "module:Class" (stages/plugins.py). Its `Params` (a msgspec Struct, params.py) is its jobs'
schema, which the broker checks every submit against; importing a family module does not
import torch (the broker imports it), only loading and running one does.
"""

from __future__ import annotations

import abc
import json
from pathlib import Path
from typing import Any, Callable

from . import params as schemas

Tensors = dict[str, Any]  # name -> torch.Tensor


class Family(abc.ABC):
    name: str
    Params: type[schemas.Params] | None = None  # the jobs' schema; None: params unchecked
    defaults: dict[str, Any]  # job params a request may leave out: the schema's, when it has one
    needs_model_dir = True  # model_path must be a Diffusers directory (model_index.json)
    # The directory `stagepool models init-tiny DIR` builds for a toy-size family ("": none):
    # `stagepool up` builds it where a stage's model_path names a missing one.
    tiny_dir = ""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.Params is not None:
            cls.defaults = schemas.defaults(cls.Params)

    def __init__(self, model_path: str, device: str = "cpu", dtype: str = "float32"):
        if self.needs_model_dir and not (Path(model_path) / "model_index.json").exists():
            raise FileNotFoundError(
                f"no Diffusers model at {model_path!r} for the {self.name} family "
                f"(`stagepool models init-tiny DIR` builds the tiny ones)")
        import torch

        self.model_path = model_path
        self.device = torch.device(device)
        self.dtype = getattr(torch, dtype)
        self._loras: list[str] = []  # the LoRAs loaded, least recently used first

    def params(self, params: dict[str, Any]) -> dict[str, Any]:
        """The job's params over the family defaults. An `aspect_ratio` ("16:9") without height
        and width sizes the output at the default area, in multiples of 16 pixels."""
        merged = {**self.defaults, **params}
        ratio = params.get("aspect_ratio")
        if ratio and "height" not in params and "width" not in params:
            merged["height"], merged["width"] = size_for_aspect(
                str(ratio), self.defaults["height"] * self.defaults["width"])
        return merged

    @abc.abstractmethod
    def load(self, stage: str) -> None:
        """Load what `stage` ("encode" | "denoise" | "decode") needs."""

    @abc.abstractmethod
    def encode(self, params: dict[str, Any]) -> Tensors: ...

    @abc.abstractmethod
    def denoise(self, params: dict[str, Any], inputs: Tensors,
                progress: Callable[[int, int], None]) -> Tensors: ...

    @abc.abstractmethod
    def decode(self, params: dict[str, Any], inputs: Tensors): ...

    @staticmethod
    def step_callback(progress: Callable[[int, int], None], steps: int):
        """A diffusers `callback_on_step_end` that reports step i/N."""
        def on_step(pipe, i, t, kwargs):
            progress(i + 1, steps)
            return {}

        return on_step

    @staticmethod
    def denormalize(vae, latents):
        """Latents back to the VAE's scale, as the Wan and Qwen-Image pipelines do."""
        import torch

        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(shape)
        std = 1.0 / torch.tensor(vae.config.latents_std).view(shape)
        return latents / std.to(latents) + mean.to(latents)

    lora_dir = ""  # where the denoise stage's LoRAs are (`<name>.safetensors`); "": none
    LORA_CACHE = 4  # adapters kept loaded at once; the least recently used goes first

    def use_lora(self, name: str) -> None:
        """Make `name` the only active LoRA of the denoise pipeline (loading it the first
        time, diffusers' `load_lora_weights`), or none for "". The broker has checked the
        name against the stage's `loras`."""
        pipe, loaded = self.pipe, self._loras
        if not name:
            if loaded:
                pipe.disable_lora()
            return
        if name in loaded:
            loaded.remove(name)
        else:
            if len(loaded) >= self.LORA_CACHE:
                pipe.delete_adapters(loaded.pop(0))
            pipe.load_lora_weights(self.lora_dir, weight_name=f"{name}.safetensors",
                                   adapter_name=name)
        loaded.append(name)
        pipe.set_adapters([name])
        pipe.enable_lora()

    def vae_config(self) -> dict[str, Any]:
        """The VAE's config.json: what a stage that loads no VAE reads of it (the latent
        layout follows its compression)."""
        if not hasattr(self, "_vae_config"):
            self._vae_config = json.loads(
                (Path(self.model_path) / "vae" / "config.json").read_text())
        return self._vae_config

    def generator(self, params: dict[str, Any]):
        import torch

        # A CPU generator: the same noise for the same seed on every device.
        return torch.Generator("cpu").manual_seed(int(params["seed"]))


def image_processor(name: str):
    """transformers' image processor class `name`, or its PIL twin where torchvision is not
    installed (transformers falls back the same way, with a warning in every worker log)."""
    import importlib.util

    import transformers

    if importlib.util.find_spec("torchvision") is None:
        name += "Pil"
    return getattr(transformers, name)


def size_for_aspect(ratio: str, area: int, multiple: int = 16) -> tuple[int, int]:
    """(height, width) of about `area` pixels with width:height = `ratio` ("W:H")."""
    try:
        w, h = (float(x) for x in ratio.split(":"))
        if w <= 0 or h <= 0:
            raise ValueError
    except ValueError:
        raise ValueError(f"aspect_ratio must be W:H, got {ratio!r}") from None
    width = (area * w / h) ** 0.5
    return (max(multiple, round(width * h / w / multiple) * multiple),
            max(multiple, round(width / multiple) * multiple))


def create(name: str, model_path: str, device: str = "cpu", dtype: str = "float32") -> Family:
    from .. import plugins

    return plugins.load(plugins.FAMILIES, name, Family)(model_path, device, dtype)


def pipeline_schema(stages: list) -> type[schemas.Params] | None:
    """The params schema of a pipeline's jobs: its model stages' family's `Params`; None when
    no stage runs a family or the family declares none. ConfigError when the model stages
    name families with different schemas (a job has one set of params)."""
    from ...common.errors import ConfigError
    from .. import plugins
    from ..base import Stage
    from ..model import ModelStage

    found: dict[type, str] = {}
    for stage in stages:
        if issubclass(plugins.load(plugins.STAGES, stage.kind, Stage), ModelStage):
            name = stage.options.get("family", "tiny")
            family = plugins.load(plugins.FAMILIES, name, Family)
            if family.Params is not None:
                found.setdefault(family.Params, name)
    if len(found) > 1:
        raise ConfigError(f"the model stages' families take different params: "
                          f"{sorted(found.values())}")
    return next(iter(found), None)
