"""Config loading and wire schemas (pure logic, no services)."""

from __future__ import annotations

import msgspec
import pytest

from stagepool.common import config, wire
from stagepool.common import dispatch as dispatch_mod
from stagepool.common.frames import Codec
from stagepool.common.errors import ConfigError, PayloadTooLarge, ProtocolError


def test_the_noop_config_has_three_stages_in_order():
    loaded = config.load("configs/noop.toml", env={})
    assert [s.name for s in loaded.pipeline.stages] == ["encode", "denoise", "decode"]
    assert loaded.next_stage("denoise").name == "decode" and loaded.next_stage("decode") is None


def test_environment_overrides_win_and_are_typed():
    loaded = config.load("configs/noop.toml", env={
        "STAGEPOOL_REDIS_URL": "redis://example:1/2", "STAGEPOOL_RING_CAPACITY": "64",
        "STAGEPOOL_WORKER_CLAIM_WAIT_S": "0.25"})
    assert loaded.redis.url == "redis://example:1/2"
    assert loaded.ring.capacity == 64 and loaded.worker.claim_wait_s == 0.25


def test_an_unknown_config_field_is_a_clear_error(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[pipeline]\nname = "x"\n[[pipeline.stages]]\nname = "a"\nsleeep_ms = 1\n')
    with pytest.raises(ConfigError, match="sleeep_ms"):
        config.load(path, env={})


def test_a_pipeline_without_stages_is_refused():
    with pytest.raises(ConfigError, match="no stages"):
        config.load(None, env={})


def test_max_batch_must_fit_the_ring_lease_cells(tmp_path):
    path = tmp_path / "batch.toml"
    path.write_text('[pipeline]\nname = "x"\n[[pipeline.stages]]\nname = "a"\nmax_batch = 65\n'
                    '[ring]\ncells = 64\n')
    with pytest.raises(ConfigError, match="max_batch must be 1..ring.cells"):
        config.load(path, env={})
    assert config.load("configs/noop.toml", env={}).pipeline.stages[0].max_batch == 16


def test_dispatch_records_round_trip_and_fit_a_default_slot():
    dispatch = dispatch_mod.Dispatch("j" * 64, 3, "denoise", 1, 0, "host:1234", [
        dispatch_mod.TensorDesc("prompt_embeds", "bfloat16", [1, 512, 4096], 4194304, 1 << 40, 123)])
    payload = dispatch_mod.encode_dispatch(dispatch)
    assert dispatch_mod.decode_dispatch(payload) == dispatch
    assert len(payload) < 1024 - 16


def test_a_garbage_dispatch_is_a_protocol_error():
    with pytest.raises(ProtocolError, match="undecodable dispatch"):
        dispatch_mod.decode_dispatch(b"\x93\x01")


def test_the_codec_decodes_json_and_msgpack_into_the_same_message():
    codec = Codec(wire.Request)
    as_json, was_json = codec.decode(b'{"type": "status", "job_id": "a", "rid": 3}')
    as_pack, was_pack = codec.decode(msgspec.msgpack.encode({"type": "status", "job_id": "a",
                                                              "rid": 3}))
    assert as_json == as_pack == wire.GetStatus(job_id="a", rid=3)
    assert was_json and not was_pack


def test_the_codec_refuses_oversize_frames():
    with pytest.raises(PayloadTooLarge):
        Codec(wire.Request).decode(b"{" + b" " * wire.MAX_FRAME_BYTES + b"}")


def test_no_module_uses_pickle():
    import pathlib

    for folder in ("broker", "common", "stages"):
        for path in pathlib.Path(folder).rglob("*.py"):
            text = path.read_text()
            assert "import pickle" not in text and "recv_pyobj" not in text, path
