"""Tiny model directories: the real diffusers and transformers classes at toy sizes.

`stagepool models init-tiny DIR` writes, with random weights from a fixed seed:
  DIR/tiny        a Wan2.1 text-to-video model (UMT5 encoder, WanTransformer3DModel,
                  AutoencoderKLWan, UniPC flow scheduler): the `tiny` family, the default
  DIR/qwen-image  a Qwen-Image text-to-image model (Qwen2.5-VL encoder,
                  QwenImageTransformer2DModel, AutoencoderKLQwenImage)
  DIR/tiny-i2v    a Wan2.1 image-to-video model (the text-to-video parts plus a CLIP vision
                  encoder, and a transformer conditioned on its features and the first frame)
  DIR/qwen-image-edit  a Qwen-Image-Edit model (the Qwen-Image parts, with the encoder's
                  vision markers and a Qwen2-VL image processor)
in the Diffusers directory layout (model_index.json plus one folder per component), the same
layout the real checkpoints use, so every stage loads them with `from_pretrained`. Sizes follow
diffusers' own fast tests. Tokenizers are byte-level BPEs trained in memory on a few lines of
text: nothing is downloaded.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch

from . import image_processor

log = logging.getLogger(__name__)

_CORPUS = [
    "a red fox jumps over the lazy dog in the snow",
    "a cat sitting on a windowsill at sunset, cinematic lighting, high detail",
    "an astronaut riding a horse on the moon, photorealistic",
    "a bowl of fruit on a wooden table, oil painting",
    "describe the image by detailing the color, shape, size, texture, quantity, text, "
    "spatial relationships of the objects and background",
    "system user assistant",
]


def _tokenizer(specials: list[str], vocab_size: int, *, eos: str, pad: str, append_eos: bool):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_CORPUS * 4, trainer)
    if append_eos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"$A {eos}", special_tokens=[(eos, tok.token_to_id(eos))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, pad_token=pad,
                                   model_max_length=512)


def _wan_parts(in_channels: int = 16, **transformer_extra) -> dict:
    """A toy Wan2.1's components, from a fixed seed: tokenizer, UMT5 encoder, transformer
    (`transformer_extra`: an image-to-video one's image conditioning), VAE, scheduler."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(0)
    tokenizer = _tokenizer(["<pad>", "</s>", "<unk>"], 400, eos="</s>", pad="<pad>",
                           append_eos=True)
    text_encoder = UMT5EncoderModel(UMT5Config(
        vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id))
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
        in_channels=in_channels, out_channels=16, text_dim=32, freq_dim=256, ffn_dim=32,
        num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32, **transformer_extra)
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                        flow_shift=3.0)
    return {"tokenizer": tokenizer, "text_encoder": text_encoder, "transformer": transformer,
            "vae": vae, "scheduler": scheduler}


def build_wan(path: Path) -> None:
    from diffusers import WanPipeline

    WanPipeline(**_wan_parts()).save_pretrained(path)


_VISION = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]


def _qwen_parts(vision_tokens: bool) -> dict:
    """A toy Qwen-Image's text side, from a fixed seed: tokenizer, Qwen2.5-VL encoder (its
    vision markers in the tokenizer when `vision_tokens`, else three ids past it), transformer."""
    from diffusers import QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    tokenizer = _tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
                           + (_VISION if vision_tokens else []), 500,
                           eos="<|im_end|>", pad="<|endoftext|>", append_eos=False)
    if vision_tokens:
        vocab = len(tokenizer)
        start, end, image, video = tokenizer.convert_tokens_to_ids(_VISION)
        markers = {"vision_start_token_id": start, "vision_end_token_id": end,
                   "image_token_id": image, "video_token_id": video}
    else:
        vocab = len(tokenizer) + 3
        markers = {"vision_start_token_id": vocab - 3, "vision_end_token_id": vocab - 2,
                   "vision_token_id": vocab - 1}
    text_encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
        text_config={"hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "num_key_value_heads": 2, "vocab_size": vocab,
                     "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default",
                                      "type": "default"},
                     "rope_theta": 1000000.0, "bos_token_id": tokenizer.pad_token_id,
                     "eos_token_id": tokenizer.eos_token_id},
        vision_config={"depth": 2, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2,
                       "out_hidden_size": 16},
        hidden_size=16, vocab_size=vocab, bos_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, **markers))
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
        num_attention_heads=3, joint_attention_dim=16, guidance_embeds=False,
        axes_dims_rope=(8, 4, 4))
    return {"tokenizer": tokenizer, "text_encoder": text_encoder, "transformer": transformer}


def build_qwen_image(path: Path) -> None:
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, \
        QwenImagePipeline

    parts = _qwen_parts(vision_tokens=False)
    z_dim = 4
    vae = AutoencoderKLQwenImage(base_dim=z_dim * 6, z_dim=z_dim, dim_mult=[1, 2, 4],
                                 num_res_blocks=1, temperal_downsample=[False, True],
                                 latents_mean=[0.0] * z_dim, latents_std=[1.0] * z_dim)
    QwenImagePipeline(**parts, scheduler=FlowMatchEulerDiscreteScheduler(),
                      vae=vae).save_pretrained(path)


def build_qwen_image_edit(path: Path) -> None:
    """Qwen-Image-Edit at toy size, in the real checkpoint's layout: the text side with the
    vision markers, a VAE at the real 8x compression (the pipeline encodes its conditioning
    image at about 1 MP: the VAE's width keeps that small), and a `processor` folder (the
    Qwen2-VL image processor, at few pixels, and the tokenizer)."""
    import json

    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, \
        QwenImageEditPipeline

    parts = _qwen_parts(vision_tokens=True)
    z_dim = 4
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=z_dim, dim_mult=[1, 1, 1, 1],
                                 num_res_blocks=1, temperal_downsample=[False, True, True],
                                 latents_mean=[0.0] * z_dim, latents_std=[1.0] * z_dim)
    QwenImageEditPipeline(**parts, scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae,
                          processor=None).save_pretrained(path)
    images = image_processor("Qwen2VLImageProcessor")(min_pixels=28 * 28, max_pixels=56 * 56)
    images.save_pretrained(path / "processor")
    parts["tokenizer"].save_pretrained(path / "processor")
    index = json.loads((path / "model_index.json").read_text())
    index["processor"] = ["transformers", "Qwen2VLProcessor"]
    (path / "model_index.json").write_text(json.dumps(index, indent=2))


def build_wan_i2v(path: Path) -> None:
    """Wan2.1 image-to-video at toy size: the text-to-video parts, plus a CLIP vision encoder
    and a transformer that takes its features (image_dim) and the conditioning channels."""
    from diffusers import WanImageToVideoPipeline
    from transformers import CLIPVisionConfig, CLIPVisionModel

    # in_channels: 16 noise + 4 first-frame mask + 16 conditioning latents
    parts = _wan_parts(in_channels=36, image_dim=4, added_kv_proj_dim=24)
    image_encoder = CLIPVisionModel(CLIPVisionConfig(
        hidden_size=4, projection_dim=4, num_hidden_layers=2, num_attention_heads=2,
        image_size=32, intermediate_size=16, patch_size=1))
    images = image_processor("CLIPImageProcessor")(crop_size=32, size=32)
    WanImageToVideoPipeline(**parts, image_encoder=image_encoder,
                            image_processor=images).save_pretrained(path)


BUILDERS = {"tiny": build_wan, "qwen-image": build_qwen_image, "tiny-i2v": build_wan_i2v,
            "qwen-image-edit": build_qwen_image_edit}


def init_tiny(root: str | Path, *, force: bool = False) -> dict[str, Path]:
    """Build every tiny model directory under `root` (skipping built ones); returns them."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # a bar per saved model says nothing here
    root = Path(root)
    built = {}
    for name, build in BUILDERS.items():
        path = root / name
        if force or not (path / "model_index.json").exists():
            log.info("building tiny %s model in %s", name, path)
            # Built aside, then renamed: a half-built directory is never mistaken for a model.
            tmp = root / f".{name}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            build(tmp)
            shutil.rmtree(path, ignore_errors=True)
            tmp.rename(path)
        built[name] = path
    return built
