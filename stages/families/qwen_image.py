"""Qwen-Image text-to-image, and Qwen-Image-Edit (image-to-image).

encode: Qwen2 tokenizer + Qwen2.5-VL text encoder -> prompt_embeds and prompt_embeds_mask
        (+ the negative pair when true_cfg_scale > 1 and a negative prompt is given)
denoise: QwenImageTransformer2DModel + flow-match Euler loop through QwenImagePipeline itself
         (output_type="latent"), unpacked to the VAE's latent layout
decode: de-normalise, AutoencoderKLQwenImage -> one frame
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

from . import Family, Tensors, image_processor, size_for_aspect
from . import params as schemas


class QwenImageFamily(Family):
    name = "qwen-image"
    Params = schemas.QwenImageParams  # Qwen-Image's own defaults: 1328x1328, 50 steps

    def load(self, stage: str) -> None:
        self.pipe = self._pipeline(self._components(stage))
        self.pipe.set_progress_bar_config(disable=True)
        if stage == "denoise":  # the latent layout follows the VAE (its config), not loaded here
            from diffusers.image_processor import VaeImageProcessor

            logging.getLogger(type(self.pipe).__module__).addFilter(_no_mask_notice)
            vae = json.loads((Path(self.model_path) / "vae" / "config.json").read_text())
            self.pipe.vae_scale_factor = 2 ** len(vae.get("temperal_downsample", [0, 0, 0]))
            self.pipe.latent_channels = vae.get("z_dim", 16)
            self.pipe.image_processor = VaeImageProcessor(
                vae_scale_factor=self.pipe.vae_scale_factor * 2)

    def _components(self, stage: str) -> dict[str, Any]:
        """What `stage` loads; the other components are None."""
        import torch
        from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, \
            QwenImageTransformer2DModel
        from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

        path = self.model_path
        parts: dict[str, Any] = {"tokenizer": None, "text_encoder": None, "transformer": None,
                                 "vae": None, "scheduler": None}
        if stage == "encode":
            parts["tokenizer"] = AutoTokenizer.from_pretrained(path, subfolder="tokenizer")
            parts["text_encoder"] = Qwen2_5_VLForConditionalGeneration.from_pretrained(
                path, subfolder="text_encoder", dtype=self.dtype).to(self.device)
        elif stage == "denoise":
            parts["transformer"] = QwenImageTransformer2DModel.from_pretrained(
                path, subfolder="transformer", dtype=self.dtype).to(self.device)
            parts["scheduler"] = FlowMatchEulerDiscreteScheduler.from_pretrained(
                path, subfolder="scheduler")
        elif stage == "decode":
            parts["vae"] = AutoencoderKLQwenImage.from_pretrained(
                path, subfolder="vae", dtype=torch.float32).to(self.device)
        return parts

    def _pipeline(self, parts: dict[str, Any]):
        from diffusers import QwenImagePipeline

        return QwenImagePipeline(**parts)

    def _cfg(self, p: dict[str, Any]) -> bool:
        return p["true_cfg_scale"] > 1 and p["negative_prompt"] is not None

    def encode(self, params: dict[str, Any]) -> Tensors:
        import torch

        p = self.params(params)
        out = {}
        with torch.no_grad():
            out["prompt_embeds"], out["prompt_embeds_mask"] = self.pipe.encode_prompt(
                prompt=p["prompt"], device=self.device,
                max_sequence_length=p["max_sequence_length"])
            if self._cfg(p):
                out["negative_prompt_embeds"], out["negative_prompt_embeds_mask"] = \
                    self.pipe.encode_prompt(prompt=p["negative_prompt"], device=self.device,
                                            max_sequence_length=p["max_sequence_length"])
        return {name: tensor for name, tensor in out.items() if tensor is not None}

    def denoise(self, params: dict[str, Any], inputs: Tensors,
                progress: Callable[[int, int], None]) -> Tensors:
        return self._denoise(self.params(params), inputs, progress)

    def _denoise(self, p: dict[str, Any], inputs: Tensors,
                 progress: Callable[[int, int], None], **extra) -> Tensors:
        """The pipeline's own loop on the encode stage's embeddings, to latents in the VAE's
        layout (the pipeline packs them into 2x2 patches; decode needs no sizes to unpack)."""
        steps = int(p["infer_steps"])
        moved = {name: tensor.to(self.device) for name, tensor in inputs.items()}
        pipe = self.pipe
        packed = pipe(
            prompt_embeds=moved["prompt_embeds"],
            prompt_embeds_mask=moved.get("prompt_embeds_mask"),
            negative_prompt_embeds=moved.get("negative_prompt_embeds"),
            negative_prompt_embeds_mask=moved.get("negative_prompt_embeds_mask"),
            true_cfg_scale=p["true_cfg_scale"], height=p["height"], width=p["width"],
            num_inference_steps=steps, max_sequence_length=p["max_sequence_length"],
            generator=self.generator(p), output_type="latent",
            callback_on_step_end=self.step_callback(progress, steps), **extra,
        ).images
        return {"latents": pipe._unpack_latents(packed, p["height"], p["width"],
                                                pipe.vae_scale_factor)}

    def decode(self, params: dict[str, Any], inputs: Tensors):
        import torch

        vae = self.pipe.vae
        latents = self.denormalize(vae, inputs["latents"].to(self.device, dtype=vae.dtype))
        with torch.no_grad():
            image = vae.decode(latents, return_dict=False)[0][:, :, 0]
        return self.pipe.image_processor.postprocess(image, output_type="pt").permute(0, 2, 3, 1)


class TinyQwenImageFamily(QwenImageFamily):
    """Qwen-Image at toy size (`stagepool models init-tiny`): toy defaults to match."""

    name = "tiny-qwen-image"
    Params = schemas.TinyQwenImageParams
    tiny_dir = "qwen-image"


EDIT_AREA = 1024 * 1024  # pixels: QwenImageEditPipeline sizes its conditioning image so


class QwenImageEditFamily(QwenImageFamily):
    """Qwen-Image-Edit: QwenImageEditPipeline split at its seams.

    encode: the Qwen2.5-VL encoder sees the prompt and the image (resized to about 1 MP at its
            own aspect ratio, as the pipeline does) -> prompt_embeds (+ negative); the VAE
            encodes the same image -> `image_latents`
    denoise: the pipeline's own loop, handed the image latents in place of the image (it loads
             no VAE); the output is the job's height x width, or the image's size at ~1 MP
    decode: as text-to-image
    """

    name = "qwen-image-edit"
    Params = schemas.QwenImageEditParams

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

    def encode(self, params: dict[str, Any]) -> Tensors:
        import torch
        from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import calculate_dimensions

        p = self.params(params)
        pipe, image = self.pipe, p["image"]  # a PIL image: the stage opened the stored input
        width, height, _ = calculate_dimensions(EDIT_AREA, image.size[0] / image.size[1])
        image = pipe.image_processor.resize(image, height, width)
        out = {}
        with torch.no_grad():
            out["prompt_embeds"], out["prompt_embeds_mask"] = pipe.encode_prompt(
                prompt=p["prompt"], image=image, device=self.device)
            if self._cfg(p):
                out["negative_prompt_embeds"], out["negative_prompt_embeds_mask"] = \
                    pipe.encode_prompt(prompt=p["negative_prompt"], image=image,
                                       device=self.device)
            pixels = pipe.image_processor.preprocess(image, height, width).unsqueeze(2)
            out["image_latents"] = pipe._encode_vae_image(
                pixels.to(self.device, dtype=pipe.vae.dtype), generator=None)
        # The image's own size: the pipeline derives the conditioning size from it again.
        out["image_size"] = torch.tensor(p["image"].size)
        return {name: tensor for name, tensor in out.items() if tensor is not None}

    def denoise(self, params: dict[str, Any], inputs: Tensors,
                progress: Callable[[int, int], None]) -> Tensors:
        p = self.params(params)
        latents = inputs["image_latents"].to(self.device)
        pipe = self.pipe
        if p["height"] is None:  # the output takes the conditioning image's size
            scale = pipe.vae_scale_factor
            p = {**p, "height": latents.shape[-2] * scale, "width": latents.shape[-1] * scale}
        pipe.image_processor = _LatentsGiven(latents)
        embeds = {name: inputs[name] for name in inputs if name.startswith(("prompt", "negative"))}
        image = SimpleNamespace(size=tuple(int(n) for n in inputs["image_size"]))
        return self._denoise(p, embeds, progress, image=image)


class TinyQwenImageEditFamily(QwenImageEditFamily):
    """Qwen-Image-Edit at toy size (`stagepool models init-tiny`): toy defaults to match."""

    name = "tiny-qwen-image-edit"
    Params = schemas.TinyQwenImageEditParams
    tiny_dir = "qwen-image-edit"


def _no_mask_notice(record: logging.LogRecord) -> bool:
    """Drops the pipeline's per-job notice that embeddings came without a mask: the encode
    stage hands none exactly where the pipeline itself would use none (every token valid)."""
    return "is not provided, so the model will treat all" not in record.getMessage()


class _LatentsGiven:
    """The denoise stage's stand-in for the edit pipeline's image processor: its conditioning
    image arrives as the encode stage's VAE latents, which 'resize' and 'preprocess' pass on
    (the pipeline then takes a latent-channel image as its image latents)."""

    def __init__(self, latents):
        self.latents = latents

    def resize(self, image, height: int, width: int):
        return image

    def preprocess(self, image, height: int, width: int):
        return self.latents[:, :, 0]


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
