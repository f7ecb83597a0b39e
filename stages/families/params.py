"""Each family's job params as a typed schema: its model's real defaults and bounds.

The broker checks every submit against its pipeline's schema (from ZMQ, HTTP or the ingress
stream alike), so a job with params its model cannot take is refused at the door with the
field named, and no worker, no GPU, ever sees it. Torch-free: the broker imports it.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

import msgspec

from ...common.errors import InvalidParams

MAX_SIDE = 2048  # pixels; a deployment may subclass a schema for larger outputs
MAX_PROMPT_CHARS = 4000

Side = Annotated[int, msgspec.Meta(ge=16, le=MAX_SIDE, multiple_of=16)]
Steps = Annotated[int, msgspec.Meta(ge=1, le=1000)]
Seed = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
Prompt = Annotated[str, msgspec.Meta(max_length=MAX_PROMPT_CHARS)]
Ratio = Annotated[str, msgspec.Meta(pattern=r"^([1-9][0-9]{0,3}:[1-9][0-9]{0,3})?$")]
SequenceLength = Annotated[int, msgspec.Meta(ge=1, le=512)]
# An input file stored beside the jobs (common/blobs.py): the gateway stores uploads, an
# ingress client SETs its own.
BlobRef = Annotated[str, msgspec.Meta(pattern=r"^blob:[0-9a-f]{64}$",
                                      description="an input stored in Redis: blob:<sha256 hex>")]


class Params(msgspec.Struct, forbid_unknown_fields=True):
    """What every family's job takes besides its model's own knobs."""

    max_images: ClassVar[int] = 0  # how many input images a job may name (`image`): none

    prompt: Prompt = ""
    seed: Seed = 0
    aspect_ratio: Ratio = ""  # "W:H": sizes the output at the default area (no height/width)
    task: Literal["", "image", "video"] = ""  # what a LightX2V client asked for
    fps: Annotated[int, msgspec.Meta(ge=1, le=240)] = 16
    save_npy: bool = False  # also write the frames as .npy
    # Each stage's run of this job stops after this long: it may only tighten a stage's own
    # `time_limit_s` (the broker refuses more than the longest stage allows).
    time_limit_s: Annotated[float, msgspec.Meta(gt=0)] | None = None


class WanParams(Params):
    """Wan2.1 text-to-video (its pipeline's defaults: 480x832, 81 frames, 50 steps)."""

    negative_prompt: Prompt = ""
    height: Side = 480
    width: Side = 832
    num_frames: Annotated[int, msgspec.Meta(ge=1, le=257)] = 81  # 4k + 1
    infer_steps: Steps = 50
    guidance_scale: Annotated[float, msgspec.Meta(ge=0.0, le=30.0)] = 5.0
    max_sequence_length: SequenceLength = 512
    # One of the denoise stage's `loras` (its options), applied for this job; "": none.
    lora_name: Annotated[str, msgspec.Meta(max_length=128)] = ""

    def __post_init__(self):
        if (self.num_frames - 1) % 4:
            raise ValueError(f"num_frames must be 4k+1 (1, 5, ... 81), got {self.num_frames}")


class WanI2VParams(WanParams, kw_only=True):
    """Wan2.1 image-to-video: the conditioning frame (required), then the T2V knobs."""

    max_images: ClassVar[int] = 1
    image: BlobRef


class TinyWanI2VParams(WanI2VParams, kw_only=True):
    """The tiny Wan image-to-video model: toy defaults."""

    height: Side = 32
    width: Side = 32
    num_frames: Annotated[int, msgspec.Meta(ge=1, le=257)] = 5
    infer_steps: Steps = 4
    max_sequence_length: SequenceLength = 32


class TinyWanParams(WanParams):
    """The tiny Wan model: toy defaults."""

    height: Side = 32
    width: Side = 32
    num_frames: Annotated[int, msgspec.Meta(ge=1, le=257)] = 1
    infer_steps: Steps = 4
    max_sequence_length: SequenceLength = 32


class QwenImageParams(Params):
    """Qwen-Image text-to-image (its defaults: 1328x1328, 50 steps, true_cfg_scale 4.0)."""

    negative_prompt: Prompt | None = None
    height: Side = 1328
    width: Side = 1328
    num_frames: Literal[1] = 1  # one image (LightX2V's image route says so)
    infer_steps: Steps = 50
    true_cfg_scale: Annotated[float, msgspec.Meta(ge=0.0, le=30.0)] = 4.0
    max_sequence_length: SequenceLength = 512


class TinyQwenImageParams(QwenImageParams):
    """The tiny Qwen-Image model: toy defaults."""

    height: Side = 32
    width: Side = 32
    infer_steps: Steps = 4
    max_sequence_length: Annotated[int, msgspec.Meta(ge=1, le=512)] = 64


class QwenImageEditParams(QwenImageParams, kw_only=True):
    """Qwen-Image-Edit: the image to edit (required); the output takes its aspect ratio at
    about 1 MP unless height and width (both) or aspect_ratio say otherwise."""

    max_images: ClassVar[int] = 1
    image: BlobRef
    height: Side | None = None
    width: Side | None = None

    def __post_init__(self):
        if (self.height is None) != (self.width is None):
            raise ValueError("give both height and width, or neither (the image's own size)")


class TinyQwenImageEditParams(QwenImageEditParams, kw_only=True):
    """The tiny Qwen-Image-Edit model: toy defaults (a 32x32 output)."""

    height: Side | None = 32
    width: Side | None = 32
    infer_steps: Steps = 4
    max_sequence_length: SequenceLength = 64


MAX_IMAGES = 3  # Qwen-Image-Edit-2509/2511 are made for one to three input images
Images = Annotated[list[BlobRef], msgspec.Meta(min_length=1, max_length=MAX_IMAGES)]


class QwenImageEditPlusParams(QwenImageEditParams, kw_only=True):
    """Qwen-Image-Edit-2509/2511: one image, or a list of up to three (Picture 1, 2, 3 to the
    prompt); the output takes the last one's aspect ratio unless height and width say."""

    max_images: ClassVar[int] = MAX_IMAGES
    image: BlobRef | Images


class TinyQwenImageEditPlusParams(QwenImageEditPlusParams, kw_only=True):
    """The tiny model as Qwen-Image-Edit-2509: toy defaults (a 32x32 output)."""

    height: Side | None = 32
    width: Side | None = 32
    infer_steps: Steps = 4
    max_sequence_length: SequenceLength = 64


def check(schema: type[Params], params: dict[str, Any]) -> None:
    """Raise InvalidParams (naming the field) unless `params` fit `schema`."""
    try:
        msgspec.convert(params, schema)
    except (msgspec.ValidationError, ValueError) as exc:
        raise InvalidParams(f"invalid params: {exc}") from None


def check_time_limit(params: dict[str, Any], longest_s: float) -> None:
    """A job's `time_limit_s` (checked in every pipeline, with a params schema or not): a
    number > 0 that some stage allows; each stage runs the job for at most the smaller of
    its own limit and this one."""
    limit = params.get("time_limit_s")
    if limit is None:
        return
    if isinstance(limit, bool) or not isinstance(limit, (int, float)) or not limit > 0:
        raise InvalidParams(f"invalid params: time_limit_s must be a number > 0, got {limit!r}")
    if limit > longest_s:
        raise InvalidParams(f"invalid params: time_limit_s = {limit:g} is above this "
                            f"deployment's longest stage limit ({longest_s:g} s)")


def configured_loras(stages: list) -> list[str]:
    """The LoRAs a pipeline's stages serve (their options' `loras`)."""
    return sorted({name for stage in stages for name in stage.options.get("loras", [])})


def check_lora(params: dict[str, Any], loras: list[str]) -> None:
    """A job's `lora_name` must be one this deployment's denoise stage serves."""
    name = params.get("lora_name")
    if not name:
        return
    if not loras:
        raise InvalidParams(f"lora_name: no LoRA is configured on this deployment ({name!r} "
                            "cannot be applied)")
    if name not in loras:
        raise InvalidParams(f"lora_name: {name!r} is not one of this deployment's LoRAs "
                            f"({', '.join(loras)})")


def job_time_limit_s(params: dict[str, Any], stage_limit_s: float) -> float:
    """The limit of one stage's run of a job: the stage's, tightened by the job's."""
    limit = params.get("time_limit_s")
    if isinstance(limit, (int, float)) and not isinstance(limit, bool) and limit > 0:
        return min(stage_limit_s, float(limit))
    return stage_limit_s


def defaults(schema: type[Params]) -> dict[str, Any]:
    """The fields a job may leave out, with their values (a required one, such as an i2v
    family's `image`, has none)."""
    return {f.name: f.default_factory() if f.default_factory is not msgspec.NODEFAULT
            else f.default for f in msgspec.structs.fields(schema)
            if f.required is False}


def takes_images(schema: type[Params] | None) -> bool:
    """Whether the pipeline's jobs take a conditioning image (a text-only one refuses it)."""
    return images_per_job(schema) > 0


def images_per_job(schema: type[Params] | None) -> int:
    """How many input images a job may name: 0 (text-only), 1, or more."""
    return schema.max_images if schema is not None else 0


def image_refs(params: dict[str, Any]) -> list[str]:
    """The stored inputs a job's params name (`image`: one reference or a list of them)."""
    image = params.get("image")
    return [] if image is None else list(image) if isinstance(image, list) else [image]
