"""Qwen-Image-Edit (one image) and Qwen-Image-Edit-2509/2511 (one to three images), split at
the seams of diffusers' QwenImageEditPipeline and QwenImageEditPlusPipeline.

encode: the Qwen2.5-VL encoder sees the prompt and the images (resized as the pipeline
        resizes them) -> prompt_embeds (+ negative); the VAE encodes each image ->
        `image_latents_<i>`, and `image_sizes` (each image's own size: the pipeline derives
        its sizes from them again)
denoise: the pipeline's own loop, handed the image latents in place of the images (this stage
         loads no VAE); the output is the job's height x width, or the (last) image's aspect
         ratio at about 1 MP, as the pipeline sizes it
decode: as text-to-image
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Callable

from . import Tensors, image_processor, size_for_aspect
from . import params as schemas
from .qwen_image import QwenImageFamily

EDIT_AREA = 1024 * 1024  # pixels: the output's default area (the pipelines' own)


class QwenImageEditFamily(QwenImageFamily):
    """Qwen-Image-Edit: the VL encoder and the VAE both see the image at about 1 MP."""

    name = "qwen-image-edit"
    Params = schemas.QwenImageEditParams
    several = False  # the pipeline takes one image

    def params(self, params: dict[str, Any]) -> dict[str, Any]:
        """Without height and width, the output takes the image's size (as the pipeline
        does: set in denoise, from the image latents), or `aspect_ratio` at about 1 MP."""
        merged = {**self.defaults, **params}
        ratio = params.get("aspect_ratio")
        if ratio and "height" not in params and "width" not in params:
            area = (self.defaults["height"] or 0) * (self.defaults["width"] or 0) or EDIT_AREA
            merged["height"], merged["width"] = size_for_aspect(str(ratio), area)
        return merged

    def _components(self, stage: str) -> dict[str, Any]:
        import torch
        from diffusers import AutoencoderKLQwenImage

        parts = {**super()._components(stage), "processor": None}
        if stage == "encode":  # the image's encoders too: the VL processor, and the VAE
            parts["processor"] = image_processor_for(self.model_path)
            parts["vae"] = AutoencoderKLQwenImage.from_pretrained(
                self.model_path, subfolder="vae", dtype=torch.float32).to(self.device)
        return parts

    def _pipeline(self, parts: dict[str, Any]):
        from diffusers import QwenImageEditPipeline

        return QwenImageEditPipeline(**parts)

    def _seen(self, image):
        """(what the VL encoder sees, what the VAE encodes, the VAE's (height, width)): the
        image resized to about 1 MP at its aspect ratio, for both."""
        from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import calculate_dimensions

        width, height = calculate_dimensions(EDIT_AREA, image.size[0] / image.size[1])[:2]
        resized = self.pipe.image_processor.resize(image, height, width)
        return resized, resized, (height, width)

    def encode(self, params: dict[str, Any]) -> Tensors:
        import torch

        p = self.params(params)
        pipe = self.pipe
        images = p["image"] if isinstance(p["image"], list) else [p["image"]]  # PIL images
        seen = [self._seen(image) for image in images]
        shown = [vl for vl, _, _ in seen] if self.several else seen[0][0]
        out = {}
        with torch.no_grad():
            out["prompt_embeds"], out["prompt_embeds_mask"] = pipe.encode_prompt(
                prompt=p["prompt"], image=shown, device=self.device)
            if self._cfg(p):
                out["negative_prompt_embeds"], out["negative_prompt_embeds_mask"] = \
                    pipe.encode_prompt(prompt=p["negative_prompt"], image=shown,
                                       device=self.device)
            for i, (_, vae_input, (height, width)) in enumerate(seen):
                pixels = pipe.image_processor.preprocess(vae_input, height, width).unsqueeze(2)
                out[f"image_latents_{i}"] = pipe._encode_vae_image(
                    pixels.to(self.device, dtype=pipe.vae.dtype), generator=None)
        out["image_sizes"] = torch.tensor([image.size for image in images])
        return {name: tensor for name, tensor in out.items() if tensor is not None}

    def denoise(self, params: dict[str, Any], inputs: Tensors,
                progress: Callable[[int, int], None]) -> Tensors:
        p = self.params(params)
        pipe = self.pipe
        images = [SimpleNamespace(size=tuple(int(n) for n in size),
                                  latents=inputs[f"image_latents_{i}"].to(self.device))
                  for i, size in enumerate(inputs["image_sizes"])]
        if p["height"] is None:  # the (last) image's size at about 1 MP, as its latents have
            last, scale = images[-1].latents, pipe.vae_scale_factor
            p = {**p, "height": last.shape[-2] * scale, "width": last.shape[-1] * scale}
        pipe.image_processor = _LatentsGiven()
        embeds = {name: inputs[name] for name in inputs if name.startswith(("prompt", "negative"))}
        return self._denoise(p, embeds, progress,
                             image=images if self.several else images[0])


class TinyQwenImageEditFamily(QwenImageEditFamily):
    """Qwen-Image-Edit at toy size (`stagepool models init-tiny`): toy defaults to match."""

    name = "tiny-qwen-image-edit"
    Params = schemas.TinyQwenImageEditParams
    tiny_dir = "qwen-image-edit"


class QwenImageEditPlusFamily(QwenImageEditFamily):
    """Qwen-Image-Edit-2509/2511: one to three images, named in the prompt as Picture 1, 2, 3;
    the VL encoder sees each at about 384x384, the VAE encodes each at about 1 MP."""

    name = "qwen-image-edit-plus"
    Params = schemas.QwenImageEditPlusParams
    several = True

    def _pipeline(self, parts: dict[str, Any]):
        from diffusers import QwenImageEditPlusPipeline

        return QwenImageEditPlusPipeline(**parts)

    def _seen(self, image):
        from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import \
            CONDITION_IMAGE_SIZE, VAE_IMAGE_SIZE, calculate_dimensions

        ratio = image.size[0] / image.size[1]
        shown_width, shown_height = calculate_dimensions(CONDITION_IMAGE_SIZE, ratio)
        width, height = calculate_dimensions(VAE_IMAGE_SIZE, ratio)
        return (self.pipe.image_processor.resize(image, shown_height, shown_width), image,
                (height, width))


class TinyQwenImageEditPlusFamily(QwenImageEditPlusFamily):
    """Qwen-Image-Edit-2509 at toy size: the tiny Qwen-Image-Edit model (the same layout)."""

    name = "tiny-qwen-image-edit-plus"
    Params = schemas.TinyQwenImageEditPlusParams
    tiny_dir = "qwen-image-edit"


class _LatentsGiven:
    """The denoise stage's stand-in for an edit pipeline's image processor: each image is a
    placeholder holding its size and the encode stage's VAE latents, which 'resize' and
    'preprocess' pass on (the pipeline takes a latent-channel image as its image latents)."""

    def resize(self, image, height: int, width: int):
        return image

    def preprocess(self, image, height: int, width: int):
        return image.latents[:, :, 0]


def image_processor_for(path: str):
    """Qwen2VLProcessor for images alone, from the model's `processor` folder.

    transformers' Qwen2VLProcessor insists on a video processor, whose class needs torchvision
    even though an edit never sees a video; this one takes the tokenizer and the image
    processor (the torchvision one where torchvision is installed, else the PIL one)."""
    from transformers import AutoTokenizer, Qwen2VLProcessor
    from transformers.processing_utils import ProcessorMixin

    class ImageQwen2VLProcessor(Qwen2VLProcessor):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    images = image_processor("Qwen2VLImageProcessor")
    return ImageQwen2VLProcessor(images.from_pretrained(path, subfolder="processor"),
                                 AutoTokenizer.from_pretrained(path, subfolder="processor"))
