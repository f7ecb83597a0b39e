"""Qwen-Image text-to-image (the image-editing families build on it: qwen_image_edit.py).

encode: Qwen2 tokenizer + Qwen2.5-VL text encoder -> prompt_embeds and prompt_embeds_mask
        (+ the negative pair when true_cfg_scale > 1 and a negative prompt is given)
denoise: QwenImageTransformer2DModel + flow-match Euler loop through QwenImagePipeline itself
         (output_type="latent"), unpacked to the VAE's latent layout
decode: de-normalise, AutoencoderKLQwenImage -> one frame
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from . import Family, Tensors
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
            vae = self.vae_config()
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


def _no_mask_notice(record: logging.LogRecord) -> bool:
    """Drops the pipeline's per-job notice that embeddings came without a mask: the encode
    stage hands none exactly where the pipeline itself would use none (every token valid)."""
    return "is not provided, so the model will treat all" not in record.getMessage()
