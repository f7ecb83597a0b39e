"""Wan2.1 text-to-video (and the `tiny` family, a Wan2.1 model at toy size).

encode: tokenizer + UMT5EncoderModel -> prompt_embeds (+ negative_prompt_embeds for CFG)
denoise: WanTransformer3DModel + the scheduler loop, through WanPipeline itself
         (output_type="latent"), classifier-free guidance when guidance_scale > 1
decode: AutoencoderKLWan -> frames, with the pipeline's own latent de-normalisation
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from . import Family, Tensors
from . import params as schemas


class WanFamily(Family):
    name = "wan2.1"
    Params = schemas.WanParams  # Wan2.1-T2V's own defaults: 480x832, 81 frames, 50 steps

    def load(self, stage: str) -> None:
        import torch
        from diffusers import AutoencoderKLWan, WanPipeline, WanTransformer3DModel
        from transformers import AutoTokenizer, UMT5EncoderModel

        path = self.model_path
        parts: dict[str, Any] = {"tokenizer": None, "text_encoder": None, "transformer": None,
                                 "vae": None, "scheduler": None}
        if stage == "encode":
            parts["tokenizer"] = AutoTokenizer.from_pretrained(path, subfolder="tokenizer")
            parts["text_encoder"] = UMT5EncoderModel.from_pretrained(
                path, subfolder="text_encoder", dtype=self.dtype).to(self.device)
        elif stage == "denoise":
            parts["transformer"] = WanTransformer3DModel.from_pretrained(
                path, subfolder="transformer", dtype=self.dtype).to(self.device)
            parts["scheduler"] = _scheduler(path)
        elif stage == "decode":
            parts["vae"] = AutoencoderKLWan.from_pretrained(
                path, subfolder="vae", dtype=torch.float32).to(self.device)
        self.pipe = WanPipeline(**parts)
        self.pipe.set_progress_bar_config(disable=True)
        if stage == "denoise":
            # The latent shape follows the VAE's compression, read from its config alone.
            vae = json.loads((Path(path) / "vae" / "config.json").read_text())
            downsample = vae.get("temperal_downsample", [False, True, True])
            self.pipe.vae_scale_factor_temporal = 2 ** sum(downsample)
            self.pipe.vae_scale_factor_spatial = 2 ** len(downsample)

    def encode(self, params: dict[str, Any]) -> Tensors:
        import torch

        p = self.params(params)
        with torch.no_grad():
            embeds, negative = self.pipe.encode_prompt(
                prompt=p["prompt"], negative_prompt=p["negative_prompt"],
                do_classifier_free_guidance=p["guidance_scale"] > 1.0,
                max_sequence_length=p["max_sequence_length"], device=self.device)
        out = {"prompt_embeds": embeds}
        if negative is not None:
            out["negative_prompt_embeds"] = negative
        return out

    def denoise(self, params: dict[str, Any], inputs: Tensors,
                progress: Callable[[int, int], None]) -> Tensors:
        p = self.params(params)
        steps = int(p["infer_steps"])

        latents = self.pipe(
            prompt_embeds=inputs["prompt_embeds"].to(self.device),
            negative_prompt_embeds=_maybe(inputs, "negative_prompt_embeds", self.device),
            height=p["height"], width=p["width"], num_frames=p["num_frames"],
            num_inference_steps=steps, guidance_scale=p["guidance_scale"],
            generator=self.generator(p), output_type="latent",
            callback_on_step_end=self.step_callback(progress, steps),
        ).frames
        return {"latents": latents}

    def decode(self, params: dict[str, Any], inputs: Tensors):
        import torch

        vae = self.pipe.vae
        latents = inputs["latents"].to(self.device, dtype=vae.dtype)
        latents = self.denormalize(vae, latents)
        with torch.no_grad():
            video = vae.decode(latents, return_dict=False)[0]
        frames = self.pipe.video_processor.postprocess_video(video, output_type="pt")[0]
        return frames.permute(0, 2, 3, 1)




class TinyFamily(WanFamily):
    """Wan2.1 at toy size (`stagepool models init-tiny`): toy defaults to match."""

    name = "tiny"
    Params = schemas.TinyWanParams

def _scheduler(path: str):
    import diffusers

    config = json.loads((Path(path) / "scheduler" / "scheduler_config.json").read_text())
    cls = getattr(diffusers, config["_class_name"])
    return cls.from_pretrained(path, subfolder="scheduler")


def _maybe(inputs: Tensors, name: str, device):
    tensor = inputs.get(name)
    return None if tensor is None else tensor.to(device)
