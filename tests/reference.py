"""The monolithic diffusers pipelines: what the three-stage split must equal, for the tests.

`monolithic(family, params)` runs the whole pipeline the family splits, loaded from the same
directory with the same dtype and seed on the family's device, and returns frames in the form
`Family.decode` does.
"""

from __future__ import annotations

from typing import Any

import torch

from stagepool.stages.families import Family
from stagepool.stages.families.qwen_image import QwenImageFamily
from stagepool.stages.families.qwen_image_edit import QwenImageEditFamily, \
    QwenImageEditPlusFamily, image_processor_for
from stagepool.stages.families.wan import WanFamily, WanI2VFamily


def monolithic(family: Family, params: dict[str, Any]):
    p = family.params(params)
    pipe = _pipeline(family)
    if p.get("lora_name"):
        pipe.load_lora_weights(family.lora_dir, weight_name=f"{p['lora_name']}.safetensors",
                               adapter_name=p["lora_name"])
    return _run(family, pipe, p)


def _pipeline(family: Family):
    """The whole pipeline the family splits, on the family's device."""
    if isinstance(family, WanI2VFamily):
        from diffusers import AutoencoderKLWan, WanImageToVideoPipeline
        from transformers import CLIPVisionModel

        pipe = WanImageToVideoPipeline.from_pretrained(
            family.model_path, dtype=family.dtype, vae=_vae(AutoencoderKLWan, family),
            image_encoder=CLIPVisionModel.from_pretrained(
                family.model_path, subfolder="image_encoder", dtype=torch.float32))
    elif isinstance(family, WanFamily):
        from diffusers import AutoencoderKLWan, WanPipeline

        pipe = WanPipeline.from_pretrained(family.model_path, dtype=family.dtype,
                                           vae=_vae(AutoencoderKLWan, family))
    elif isinstance(family, QwenImageEditFamily):
        from diffusers import AutoencoderKLQwenImage, QwenImageEditPipeline, \
            QwenImageEditPlusPipeline

        pipe = QwenImageEditPipeline.from_pretrained(
            family.model_path, dtype=family.dtype, vae=_vae(AutoencoderKLQwenImage, family),
            processor=image_processor_for(family.model_path))
        if isinstance(family, QwenImageEditPlusFamily):  # the same components (2509's layout)
            pipe = QwenImageEditPlusPipeline(**pipe.components)
    elif isinstance(family, QwenImageFamily):
        from diffusers import AutoencoderKLQwenImage, QwenImagePipeline

        pipe = QwenImagePipeline.from_pretrained(family.model_path, dtype=family.dtype,
                                                 vae=_vae(AutoencoderKLQwenImage, family))
    else:
        raise TypeError(f"no monolithic reference for {type(family).__name__}")
    pipe.to(family.device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _run(family: Family, pipe, p: dict[str, Any]):
    common = dict(prompt=p["prompt"], negative_prompt=p["negative_prompt"], height=p["height"],
                  width=p["width"], num_inference_steps=int(p["infer_steps"]),
                  max_sequence_length=p["max_sequence_length"],
                  generator=family.generator(p), output_type="np")
    if isinstance(family, WanI2VFamily):
        return pipe(**common, image=p["image"], num_frames=p["num_frames"],
                    guidance_scale=p["guidance_scale"]).frames[0]
    if isinstance(family, WanFamily):
        return pipe(**common, num_frames=p["num_frames"],
                    guidance_scale=p["guidance_scale"]).frames[0]
    if isinstance(family, QwenImageEditFamily):
        return pipe(**common, image=p["image"], true_cfg_scale=p["true_cfg_scale"]).images
    return pipe(**common, true_cfg_scale=p["true_cfg_scale"]).images


def _vae(cls, family: Family):
    """The VAE in float32, as the decode stage loads it (and the models' cards advise)."""
    return cls.from_pretrained(family.model_path, subfolder="vae", dtype=torch.float32)
