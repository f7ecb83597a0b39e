"""Each family's params schema: real defaults, and bad params refused with the field named."""

from __future__ import annotations

import re

import pytest

from stagepool.common.errors import ConfigError, InvalidParams
from stagepool.common.config import StageConfig
from stagepool.stages.families import pipeline_schema
from stagepool.stages.families import params as schemas
from stagepool.stages.families.qwen_image import QwenImageFamily
from stagepool.stages.families.wan import TinyFamily, WanFamily


def test_the_real_families_default_to_their_models_sizes():
    wan, qwen, tiny = WanFamily.defaults, QwenImageFamily.defaults, TinyFamily.defaults
    assert (wan["height"], wan["width"], wan["num_frames"], wan["infer_steps"]) == (
        480, 832, 81, 50)
    assert wan["guidance_scale"] == 5.0 and wan["max_sequence_length"] == 512
    assert (qwen["height"], qwen["width"], qwen["infer_steps"], qwen["true_cfg_scale"]) == (
        1328, 1328, 50, 4.0)
    assert (tiny["height"], tiny["num_frames"], tiny["infer_steps"]) == (32, 1, 4)


@pytest.mark.parametrize("params, field", [
    ({"height": "64"}, "$.height"),              # wrong type
    ({"height": 8}, "$.height"),                 # below the bound
    ({"width": 4096}, "$.width"),                # above it
    ({"width": 100}, "$.width"),                 # not a multiple of 16
    ({"num_frames": 4}, "num_frames must be 4k+1"),
    ({"infer_steps": 0}, "$.infer_steps"),
    ({"seed": -1}, "$.seed"),
    ({"guidance_scale": "high"}, "$.guidance_scale"),
    ({"colour": "red"}, "colour"),               # unknown field
    ({"prompt": "x" * 5000}, "$.prompt"),        # too large
    ({"aspect_ratio": "wide"}, "$.aspect_ratio"),
])
def test_bad_wan_params_are_refused_naming_the_field(params, field):
    with pytest.raises(InvalidParams, match=re.escape(field)):
        schemas.check(schemas.WanParams, {"prompt": "a fox", **params})


def test_good_params_pass_and_a_qwen_image_job_is_one_frame():
    schemas.check(schemas.WanParams, {"prompt": "a fox", "height": 720, "width": 1280,
                                      "num_frames": 33, "guidance_scale": 6, "task": "video"})
    schemas.check(schemas.QwenImageParams, {"prompt": "a pear", "num_frames": 1})
    with pytest.raises(InvalidParams, match=r"\$.num_frames"):
        schemas.check(schemas.QwenImageParams, {"prompt": "a pear", "num_frames": 81})


def _stage(name, kind, family=None):
    return StageConfig(name=name, kind=kind, options={"family": family} if family else {})


def test_a_pipeline_has_its_model_stages_family_schema():
    assert pipeline_schema([_stage("a", "noop")]) is None
    assert pipeline_schema([_stage("e", "encode"), _stage("d", "decode")]) is schemas.TinyWanParams
    assert pipeline_schema([_stage("e", "encode", "wan2.1"), _stage("n", "noop")]) is \
        schemas.WanParams
    with pytest.raises(ConfigError, match="different params"):
        pipeline_schema([_stage("e", "encode", "wan2.1"), _stage("d", "decode", "qwen-image")])


def test_pipeline_prints_the_stages_and_a_json_schema_with_the_models_defaults():
    import json
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "stagepool.broker.cli", "pipeline", "--config",
                           "configs/wan2.1.toml", "--json"], capture_output=True, text=True,
                          timeout=60, check=True)
    described = json.loads(done.stdout)
    assert [s["name"] for s in described["stages"]] == ["encode", "denoise", "decode"]
    assert {s["family"] for s in described["stages"]} == {"wan2.1"}
    params = described["params"]
    props = params["$defs"][params["$ref"].rsplit("/", 1)[-1]]["properties"]
    assert {k: props[k]["default"] for k in ("height", "width", "num_frames", "infer_steps")} \
        == {"height": 480, "width": 832, "num_frames": 81, "infer_steps": 50}
    assert props["height"]["multipleOf"] == 16 and props["height"]["maximum"] == 2048
    assert described["max_time_limit_s"] == 3600
