"""Placing a stage's workers on GPUs: one CUDA_VISIBLE_DEVICES per worker, round robin."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from stagepool.common import config as config_mod
from stagepool.common.errors import ConfigError


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().partition("=")[::2] for item in raw if b"=" in item)


@pytest.mark.cluster
def test_up_gives_each_worker_of_a_stage_one_of_its_devices(cluster_factory):
    cluster = cluster_factory(workers=3, stage_extra='devices = ["0", "GPU-1f2e"]\n')
    pids = cluster.pids()
    assert [_environ(pids[f"denoise-{i}"]).get("CUDA_VISIBLE_DEVICES") for i in range(3)] == [
        "0", "GPU-1f2e", "0"]
    for name in ("broker", "gateway"):  # the rest keep what `up` was given
        assert _environ(pids[name]).get("CUDA_VISIBLE_DEVICES") == os.environ.get(
            "CUDA_VISIBLE_DEVICES")


@pytest.mark.cluster
def test_all_places_a_stage_round_robin_over_every_gpu_the_host_lists(cluster_factory,
                                                                      tmp_path, monkeypatch):
    smi = tmp_path / "bin" / "nvidia-smi"  # the driver's listing, as on a 2-GPU host
    smi.parent.mkdir()
    smi.write_text("#!/bin/sh\n"
                   "echo 'GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-aaaa-0)'\n"
                   "echo 'GPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-bbbb-1)'\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{smi.parent}:{os.environ['PATH']}")
    cluster = cluster_factory(workers=3, stage_extra='devices = ["all"]\n')
    pids = cluster.pids()
    assert [_environ(pids[f"decode-{i}"]).get("CUDA_VISIBLE_DEVICES") for i in range(3)] == [
        "GPU-aaaa-0", "GPU-bbbb-1", "GPU-aaaa-0"]


def test_all_without_a_gpu_is_a_config_error(tmp_path, monkeypatch):
    from stagepool.broker.cluster import host_gpus

    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi
    with pytest.raises(ConfigError, match="lists no GPU"):
        host_gpus()


@pytest.mark.parametrize("stage, message", [
    ('devices = ["0,1"]', "each of devices names one GPU"),
    ('devices = ["0"]\noptions = { device = "cuda:1" }', "each worker sees one GPU as 'cuda'"),
])
def test_a_placement_that_cannot_work_is_a_config_error(tmp_path, stage, message):
    path = tmp_path / "p.toml"
    path.write_text(f'[[pipeline.stages]]\nname = "denoise"\n{stage}\n')
    with pytest.raises(ConfigError, match=message):
        config_mod.load(path, env={})


def test_up_refuses_workers_for_a_stage_that_does_not_exist(tmp_path):
    done = subprocess.run([sys.executable, "-m", "stagepool.broker.cli", "up", "--config",
                           "configs/noop.toml", "--workers", "denoize=4", "--state-dir",
                           str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "no stage 'denoize' (stages: encode, denoise, decode)" in done.stderr
    assert not (tmp_path / "cluster.json").exists()
