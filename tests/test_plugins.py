"""Stage kinds and model families as plugins, and a noop deployment without torch."""

from __future__ import annotations

from pathlib import Path

import pytest

from stagepool.common import config as config_mod
from stagepool.common.client import BrokerClient
from stagepool.common.errors import ConfigError
from stagepool.common.jobstore import JobStore
from stagepool.stages import base, families, plugins
from stagepool.stages.model import EncodeStage
from stagepool.stages.noop import NoopStage

from .conftest import wait_ended
from .plugins import Gradient, Shout


def _stage(kind: str) -> config_mod.StageConfig:
    return config_mod.StageConfig(name="s", kind=kind)


def test_built_in_kinds_and_families_are_entry_points():
    assert isinstance(base.create(_stage("noop")), NoopStage)
    assert isinstance(base.create(_stage("encode")), EncodeStage)
    assert plugins.load(plugins.FAMILIES, "qwen-image", families.Family).name == "qwen-image"


def test_a_kind_or_family_named_by_module_and_class_is_loaded():
    assert isinstance(base.create(_stage("tests.plugins:Shout")), Shout)
    assert isinstance(families.create("tests.plugins:Gradient", ""), Gradient)


@pytest.mark.parametrize("kind, message", [
    ("denoize", "unknown stage kind 'denoize'; known: decode, denoise, encode, noop"),
    ("tests.plugins:Nope", "cannot load stage kind 'tests.plugins:Nope'"),
    ("no_such_module:Stage", "cannot load stage kind 'no_such_module:Stage'"),
    ("tests.plugins:Gradient", "not a subclass of Stage"),
])
def test_a_bad_kind_is_a_config_error_that_says_why(kind, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        base.create(_stage(kind))


def test_a_family_without_its_model_directory_says_where_it_looked():
    with pytest.raises(FileNotFoundError, match="no Diffusers model at '/nowhere'"):
        families.create("tiny", "/nowhere")


PIPELINE = """
[pipeline]
name = "plugins"
{stages}
[redis]
namespace = "{namespace}"
[worker]
heartbeat_ms = 200
[transfer]
backend = "local"
{transfer}
[gateway]
port = 0
"""


def _run_cluster(tmp_path, redis_server, namespace, stages: str, params: list[dict],
                 env: dict | None = None, transfer: str = ""):
    import json
    import os
    import subprocess
    import sys
    import time

    path = tmp_path / "pipeline.toml"
    path.write_text(PIPELINE.format(stages=stages, namespace=namespace, transfer=transfer))
    state = tmp_path / "state"
    log = open(tmp_path / "up.log", "wb")
    up = subprocess.Popen([sys.executable, "-m", "stagepool.broker.cli", "up", "--config",
                           str(path), "--redis-url", redis_server.url, "--state-dir", str(state)],
                          stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    store = JobStore(redis_server.url, namespace)
    try:
        deadline = time.monotonic() + 60
        while not (state / "cluster.json").exists():
            assert up.poll() is None and time.monotonic() < deadline, "stagepool up failed"
            time.sleep(0.05)
        broker = json.loads((state / "cluster.json").read_text())["broker"]
        with BrokerClient(broker, timeout_s=30) as client:
            ids = [client.submit(p).job_id for p in params]
            assert wait_ended(store, ids, 120) == ["succeeded"] * len(ids), \
                [client.status(i).error for i in ids]
            return [client.status(i) for i in ids]
    finally:
        up.terminate()
        up.wait(60)
        log.close()
        store.close()


@pytest.mark.cluster
def test_a_plugin_family_and_kind_from_a_test_module_run_through_a_real_cluster(
        tmp_path, redis_server, namespace):
    family = '{ family = "tests.plugins:Gradient", results_dir = "%s" }' % (tmp_path / "out")
    stages = "".join(f'[[pipeline.stages]]\nname = "{kind}"\nkind = "{kind}"\n'
                     f"options = {family}\n" for kind in ("encode", "denoise", "decode"))
    [job] = _run_cluster(tmp_path, redis_server, namespace, stages,
                         [{"prompt": "a plugin", "seed": 4, "infer_steps": 5}])
    assert job.stages["denoise"]["step"] == "5/5"
    assert job.result["family"] == "gradient"
    assert (job.result["height"], job.result["width"]) == (8, 12)
    assert Path(job.result["files"]["image"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    stages = '[[pipeline.stages]]\nname = "shout"\nkind = "tests.plugins:Shout"\n'
    (tmp_path / "shout").mkdir()
    [job] = _run_cluster(tmp_path / "shout", redis_server, namespace + "b", stages,
                         [{"prompt": "quiet"}])
    assert job.result == {"shout": "QUIET"}


@pytest.mark.cluster
def test_a_full_pool_makes_jobs_wait_in_the_ring_not_fail(tmp_path, redis_server, namespace):
    """Encode's 1 MiB pool holds three 300 KiB outputs while denoise takes 0.3 s a job; 12
    jobs queue behind it. Without admission by capacity, encode would run ahead, wait 0.2 s
    for room (put_wait_s), and fail them."""
    family = '{ family = "tests.plugins:Gradient", results_dir = "%s" }' % (tmp_path / "out")
    stages = "".join(f'[[pipeline.stages]]\nname = "{kind}"\nkind = "{kind}"\n'
                     f"options = {family}\n" for kind in ("encode", "denoise", "decode"))
    jobs = _run_cluster(tmp_path, redis_server, namespace, stages,
                        [{"prompt": f"p{i}", "embed_kb": 300, "infer_steps": 2, "step_ms": 150}
                         for i in range(12)],
                        transfer="pool_mb = 1\nput_wait_s = 0.2")
    assert all(job.stages["encode"]["retries"] == 0 for job in jobs)
    log = (tmp_path / "state" / "logs" / "encode-0.log").read_text()
    assert "cannot hold outputs" not in log


@pytest.mark.cluster
def test_a_noop_deployment_runs_where_torch_cannot_be_imported(tmp_path, redis_server,
                                                               namespace):
    """The broker, gateway and noop workers of an install without the `models` extra."""
    blocker = tmp_path / "no_models"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(
        "import sys\n"
        "for name in ('torch', 'diffusers', 'transformers', 'numpy'):\n"
        "    sys.modules[name] = None  # `import torch` raises ImportError\n")
    stages = "".join(f'[[pipeline.stages]]\nname = "{s}"\n' for s in ("a", "b", "c"))
    jobs = _run_cluster(tmp_path, redis_server, namespace, stages, [{"n": 1}, {"n": 2}],
                        env={"PYTHONPATH": str(blocker)})
    assert [j.result["stage"] for j in jobs] == ["c", "c"]


@pytest.mark.parametrize("name, builds", [
    ("tiny", True), ("tiny-i2v", True), ("tiny-qwen-image-edit", True),
    ("wan2.1", False), ("qwen-image-edit", False), ("noop", False)])
def test_up_builds_a_toy_familys_missing_model_dir_and_no_other(name, builds, tmp_path,
                                                                 monkeypatch):
    """Each shipped config, its model_path moved under tmp_path: `stagepool up` builds the
    tiny models where a toy-size family names its missing directory, and nowhere else."""
    import msgspec

    from stagepool.broker import cli
    from stagepool.stages.families import tiny

    config = config_mod.load(f"configs/{name}.toml", env={})
    stages = [msgspec.structs.replace(stage, options={
        **stage.options, "model_path": str(tmp_path / Path(stage.options["model_path"]).name)})
        if "model_path" in stage.options else stage for stage in config.pipeline.stages]
    config = msgspec.structs.replace(config, pipeline=msgspec.structs.replace(
        config.pipeline, stages=stages))
    built = []
    monkeypatch.setattr(tiny, "init_tiny", built.append)
    cli._ensure_tiny_models(config)
    assert built == ([tmp_path] * len(stages) if builds else [])
    if builds:
        assert Path(stages[0].options["model_path"]).name in tiny.BUILDERS
