"""Wan2.1 text-to-video (and the `tiny` family, a Wan2.1 model at toy size).

encode: tokenizer + UMT5EncoderModel -> prompt_embeds (+ negative_prompt_embeds for CFG)
denoise: WanTransformer3DModel + the scheduler loop, through WanPipeline itself
         (output_type="latent"), classifier-free guidance when guidance_scale > 1
decode: AutoencoderKLWan -> frames, with the pipeline's own latent de-normalisation
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Callable

from . import Family, Tensors, image_processor
from . import params as schemas


class WanFamily(Family):
    name = "wan2.1"
    Params = schemas.WanParams  # Wan2.1-T2V's own defaults: 480x832, 81 frames, 50 steps

    def load(self, stage: str) -> None:
        self.pipe = self._pipeline(self._components(stage))
        self.pipe.set_progress_bar_config(disable=True)
        if stage == "denoise":  # the latent shape follows the VAE's compression (its config)
            downsample = self.vae_config().get("temperal_downsample", [False, True, True])
            self.pipe.vae_scale_factor_temporal = 2 ** sum(downsample)
            self.pipe.vae_scale_factor_spatial = 2 ** len(downsample)

    def _components(self, stage: str) -> dict[str, Any]:
        """What `stage` loads; the other components are None."""
        import torch
        from diffusers import AutoencoderKLWan, WanTransformer3DModel
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
        return parts

    def _pipeline(self, parts: dict[str, Any]):
        from diffusers import WanPipeline

        return WanPipeline(**parts)

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
        return self._denoise(self.params(params), inputs, progress)

    def _denoise(self, p: dict[str, Any], inputs: Tensors,
                 progress: Callable[[int, int], None], **extra) -> Tensors:
        """The pipeline's own loop on the encode stage's embeddings, to latents."""
        steps = int(p["infer_steps"])
        self.use_lora(p.get("lora_name", ""))
        latents = self.pipe(
            prompt_embeds=inputs["prompt_embeds"].to(self.device),
            negative_prompt_embeds=_maybe(inputs, "negative_prompt_embeds", self.device),
            height=p["height"], width=p["width"], num_frames=p["num_frames"],
            num_inference_steps=steps, guidance_scale=p["guidance_scale"],
            generator=self.generator(p), output_type="latent",
            callback_on_step_end=self.step_callback(progress, steps), **extra,
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
    tiny_dir = "tiny"


def _scheduler(path: str):
    import diffusers

    config = json.loads((Path(path) / "scheduler" / "scheduler_config.json").read_text())
    cls = getattr(diffusers, config["_class_name"])
    return cls.from_pretrained(path, subfolder="scheduler")


def _maybe(inputs: Tensors, name: str, device):
    tensor = inputs.get(name)
    return None if tensor is None else tensor.to(device)


class WanI2VFamily(WanFamily):
    """Wan2.1 image-to-video: WanImageToVideoPipeline split at its seams.

    encode: the text encoder, the CLIP image encoder and the VAE encoder on the conditioning
            frame -> prompt_embeds (+ negative), image_embeds, and `condition` (the frame's
            latents behind the first-frame mask), exactly as the pipeline prepares them
    denoise: the pipeline's own loop, handed the encode stage's image features in place of
             its image encoders (which this stage does not load); its noise is drawn as the
             pipeline draws it, so the split equals the monolithic pipeline
    decode: as text-to-video
    """

    name = "wan2.1-i2v"
    Params = schemas.WanI2VParams

    def _components(self, stage: str) -> dict[str, Any]:
        import torch
        from diffusers import AutoencoderKLWan
        from transformers import CLIPVisionModel

        parts = {**super()._components(stage), "image_processor": None, "image_encoder": None}
        if stage == "encode":  # the image's encoders too: CLIP, and the VAE on its frame
            path = self.model_path
            parts["image_processor"] = image_processor("CLIPImageProcessor").from_pretrained(
                path, subfolder="image_processor")
            parts["image_encoder"] = CLIPVisionModel.from_pretrained(
                path, subfolder="image_encoder", dtype=torch.float32).to(self.device)
            parts["vae"] = AutoencoderKLWan.from_pretrained(
                path, subfolder="vae", dtype=torch.float32).to(self.device)
        return parts

    def _pipeline(self, parts: dict[str, Any]):
        pipe = _split_i2v_pipeline()(**parts)
        if parts["vae"] is None:  # denoise: the pipeline reads the VAE's z_dim alone
            pipe.use_vae_config(self.vae_config())
        return pipe

    def encode(self, params: dict[str, Any]) -> Tensors:
        import torch

        out = super().encode(params)
        p = self.params(params)
        image = p["image"]  # a PIL image: the stage opened the stored input
        pipe = self.pipe
        with torch.no_grad():
            out["image_embeds"] = pipe.encode_image(image, self.device)
            frame = pipe.video_processor.preprocess(image, height=p["height"], width=p["width"])
            frame = frame.to(self.device, dtype=torch.float32)
            shape_only = torch.zeros(1)  # the noise is drawn in denoise, as the pipeline does
            _, condition = pipe.prepare_latents(
                frame, 1, pipe.vae.config.z_dim, p["height"], p["width"], p["num_frames"],
                torch.float32, self.device, None, latents=shape_only)
        out["condition"] = condition
        return out

    def denoise(self, params: dict[str, Any], inputs: Tensors,
                progress: Callable[[int, int], None]) -> Tensors:
        import torch

        p = self.params(params)
        self.pipe.given = {"image_embeds": inputs["image_embeds"].to(self.device),
                           "condition": inputs["condition"].to(self.device)}
        placeholder = torch.zeros(1, 3, p["height"], p["width"])  # the frame is in `condition`
        return self._denoise(p, inputs, progress, image=placeholder)


class TinyWanI2VFamily(WanI2VFamily):
    """Wan2.1 image-to-video at toy size (`stagepool models init-tiny`)."""

    name = "tiny-i2v"
    Params = schemas.TinyWanI2VParams
    tiny_dir = "tiny-i2v"


@functools.cache
def _split_i2v_pipeline():
    """The class, made on first use (diffusers is imported lazily)."""
    from diffusers import WanImageToVideoPipeline
    from diffusers.utils.torch_utils import randn_tensor

    class SplitI2VPipeline(WanImageToVideoPipeline):
        """WanImageToVideoPipeline whose denoise stage takes its image features as given:
        `given` holds the encode stage's image_embeds and condition."""

        given: dict[str, Any] = {}

        def use_vae_config(self, vae: dict) -> None:
            """The VAE as its config alone (not a module: the loop never runs it)."""
            from types import SimpleNamespace

            object.__setattr__(self, "vae", SimpleNamespace(config=SimpleNamespace(**vae)))

        def encode_image(self, image, device=None):
            if "image_embeds" in self.given:
                return self.given["image_embeds"]
            return super().encode_image(image, device)

        def prepare_latents(self, image, batch_size, num_channels_latents=16, height=480,
                            width=832, num_frames=81, dtype=None, device=None, generator=None,
                            latents=None, last_image=None):
            if "condition" not in self.given:
                return super().prepare_latents(image, batch_size, num_channels_latents, height,
                                               width, num_frames, dtype, device, generator,
                                               latents, last_image)
            shape = (batch_size, num_channels_latents,
                     (num_frames - 1) // self.vae_scale_factor_temporal + 1,
                     height // self.vae_scale_factor_spatial,
                     width // self.vae_scale_factor_spatial)
            noise = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
            return noise, self.given["condition"].to(device=device, dtype=dtype)

    return SplitI2VPipeline
