"""Model directories at real shapes with random weights: size a deployment without the weights.

`stagepool models init-random --family wan2.1 --size 1.3B DIR` writes a Diffusers directory
whose every component has the shape of the published checkpoint (Wan2.1-T2V-1.3B: a UMT5-XXL
text encoder, a 30-layer 1536-wide WanTransformer3DModel, the Wan VAE, the UniPC flow
scheduler), filled with random weights. Every stage loads it with `from_pretrained` exactly as
it loads the real one, so memory, step time and hand-off costs are the real model's; the pixels
are noise. `--dry-run` prints each component's parameters and bytes without building anything.

The tokenizer is a small byte-level BPE (the real one is a 256k SentencePiece model that
cannot be downloaded here); prompts are padded to the same `max_sequence_length`, so the
encoder's work is the same.

Components are built on the GPU when there is one (seconds, not minutes, for the 5.7B-parameter
encoder), saved in the dtype the stages load them in, and written aside, then renamed.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_UMT5_XXL = dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24,
                 num_heads=64, relative_attention_num_buckets=32,
                 relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
                 layer_norm_epsilon=1e-6, tie_word_embeddings=False, pad_token_id=0,
                 eos_token_id=1, decoder_start_token_id=0)

_WAN_TRANSFORMER = dict(patch_size=(1, 2, 2), attention_head_dim=128, in_channels=16,
                        out_channels=16, text_dim=4096, freq_dim=256, cross_attn_norm=True,
                        qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)

# (family, size) -> per-component constructor arguments, from the published configs.
SHAPES: dict[tuple[str, str], dict[str, dict[str, Any]]] = {
    ("wan2.1", "1.3B"): {
        "text_encoder": _UMT5_XXL,
        "transformer": dict(_WAN_TRANSFORMER, num_attention_heads=12, ffn_dim=8960,
                            num_layers=30),
        "vae": {},  # AutoencoderKLWan's defaults are the Wan2.1 VAE
    },
    ("wan2.1", "14B"): {
        "text_encoder": _UMT5_XXL,
        "transformer": dict(_WAN_TRANSFORMER, num_attention_heads=40, ffn_dim=13824,
                            num_layers=40),
        "vae": {},
    },
}
_DTYPES = {"text_encoder": "bfloat16", "transformer": "bfloat16", "vae": "float32"}


def sizes(family: str) -> list[str]:
    return [size for (name, size) in SHAPES if name == family]


def _shapes(family: str, size: str) -> dict[str, dict[str, Any]]:
    try:
        return SHAPES[(family, size)]
    except KeyError:
        known = ", ".join(f"{f} {s}" for f, s in SHAPES)
        raise ValueError(f"no real shapes for {family} {size}; known: {known}") from None


def _build(component: str, kwargs: dict[str, Any]):
    """One component with random weights, on the current default device."""
    if component == "text_encoder":
        from transformers import UMT5Config, UMT5EncoderModel

        return UMT5EncoderModel(UMT5Config(**kwargs))
    if component == "transformer":
        from diffusers import WanTransformer3DModel

        return WanTransformer3DModel(**kwargs)
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan(**kwargs)


def describe(family: str, size: str) -> dict[str, dict[str, Any]]:
    """Parameters and bytes of each component, counted on the meta device (nothing built)."""
    import torch

    out = {}
    for component, kwargs in _shapes(family, size).items():
        with torch.device("meta"):
            model = _build(component, kwargs)
        params = sum(p.numel() for p in model.parameters())
        dtype = _DTYPES[component]
        out[component] = {"class": type(model).__name__, "params": params, "dtype": dtype,
                          "bytes": params * getattr(torch, dtype).itemsize}
    return out


def init_random(path: str | Path, family: str, size: str, *, force: bool = False,
                seed: int = 0) -> Path:
    """Build the directory (skipped when built, unless `force`); returns its path."""
    import torch
    from diffusers import UniPCMultistepScheduler, WanPipeline

    from .tiny import _tokenizer

    shapes = _shapes(family, size)
    path = Path(path)
    if (path / "model_index.json").exists() and not force:
        return path
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(seed)
    parts: dict[str, Any] = {}
    for component, kwargs in shapes.items():
        log.info("building %s (%s %s) on %s", component, family, size, device)
        dtype = getattr(torch, _DTYPES[component])
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)  # initialised in the saved dtype: no float32 copy first
        try:
            with torch.device(device):
                parts[component] = _build(component, kwargs).to(dtype)
        finally:
            torch.set_default_dtype(default)
    parts["tokenizer"] = _tokenizer(["<pad>", "</s>", "<unk>"], 400, eos="</s>", pad="<pad>",
                                    append_eos=True)
    parts["scheduler"] = UniPCMultistepScheduler(prediction_type="flow_prediction",
                                                 use_flow_sigmas=True, flow_shift=3.0)
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    WanPipeline(**parts).save_pretrained(tmp)
    (tmp / "random_weights.json").write_text(json.dumps(
        {"family": family, "size": size, "seed": seed,
         "note": "random weights at real shapes (stagepool models init-random)"}))
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    return path
