"""What an operator sees of the workers: `stagepool workers`, `/v1/workers`, the per-worker
metrics, and the GPU figures the heartbeat carries."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import types

import httpx
import pytest

from stagepool.common.client import BrokerClient
from stagepool.common.jobstore import JobStore
from stagepool.stages.gpu import GpuProbe

from .conftest import wait_ended

STEPS = 'kind = "tests.plugins:Steps"\n'


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stagepool.broker.cli", *args],
                          capture_output=True, text=True, timeout=60)


@pytest.mark.cluster
def test_workers_lists_every_worker_with_its_job_step_and_jobs_done(
        cluster_factory, redis_server, namespace):
    cluster = cluster_factory(workers=2, stage_extra=STEPS, lease_ms=5000)
    store = JobStore(redis_server.url, namespace)
    with BrokerClient(cluster.broker, timeout_s=30) as client:
        cluster.wait_ready(client, 2)
        client.submit({"slow_stage": "decode"}, job_id="quick")
        assert wait_ended(store, ["quick"], 30) == ["succeeded"]
        client.submit({"slow_stage": "denoise", "steps": 3000, "step_ms": 10}, job_id="long")
        deadline = time.monotonic() + 30
        while True:  # the long job is denoising, its step recorded, and the heartbeats have
            # told the jobs done: "quick" once per stage, "long" past encode
            workers = json.loads(_cli("workers", "--json", "--broker", cluster.broker).stdout)
            running = [w for w in workers if w.get("jobs") == ["long"]]
            done_by_stage = {s: sum(w.get("jobs_done", 0) for w in workers if w["stage"] == s)
                             for s in ("encode", "denoise", "decode")}
            if (running and running[0].get("step") and running[0].get("busy")
                    and done_by_stage == {"encode": 2, "denoise": 1, "decode": 1}):
                break
            assert time.monotonic() < deadline, f"workers never showed it all: {workers}"
            time.sleep(0.1)
        table = _cli("workers", "--broker", cluster.broker)
        http = httpx.get(f"{cluster.gateway}/v1/workers", timeout=10).json()["workers"]
        metrics = httpx.get(f"{cluster.gateway}/metrics", timeout=10).text
        client.cancel("long")
    pids = cluster.pids()
    assert {(w["stage"], w["pid"]) for w in workers} == {
        (stage, pids[f"{stage}-{i}"]) for stage in ("encode", "denoise", "decode")
        for i in range(2)}
    (runner,) = running
    assert runner["stage"] == "denoise"
    done, total = (int(x) for x in runner["step"].split("/"))
    assert total == 3000 and 0 < done < 3000
    assert all(w["device"] == "cpu" and "gpu" not in w and w["host"] for w in workers)
    assert all(time.time() * 1000 - w["heartbeat_ms"] < 5000 for w in workers)
    assert {w["worker_id"] for w in http} == {w["worker_id"] for w in workers}
    assert table.returncode == 0 and table.stdout.startswith("WORKER")
    assert "long (" in table.stdout  # the job and its step
    assert f'stagepool_worker_busy{{stage="denoise",worker="{runner["worker_id"]}"}} 1.0' \
        in metrics


class _FakeNvml(types.SimpleNamespace):
    """pynvml's calls the probe makes, over two cards (a pure-logic unit test)."""


def _nvml(monkeypatch):
    class NVMLError(Exception):
        pass

    cards = {0: "GPU-aaaa", 1: "GPU-bbbb"}
    fake = _FakeNvml(
        NVMLError=NVMLError, nvmlInit=lambda: None,
        nvmlDeviceGetHandleByIndex=lambda i: cards[i],
        nvmlDeviceGetHandleByUUID=lambda u: next(h for h in cards.values() if h == u),
        nvmlDeviceGetIndex=lambda h: next(i for i, u in cards.items() if u == h),
        nvmlDeviceGetName=lambda h: "NVIDIA H100 80GB HBM3",
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(used=3 * 2**30,
                                                                total=80 * 2**30),
        nvmlDeviceGetUtilizationRates=lambda h: types.SimpleNamespace(gpu=97))
    monkeypatch.setitem(sys.modules, "pynvml", fake)


@pytest.mark.parametrize("visible, device, card", [
    (None, "cuda", 0), (None, "cuda:1", 1), ("1", "cuda", 1), ("GPU-bbbb", "cuda", 1),
    ("1,0", "cuda:1", 0),
])
def test_the_probe_finds_the_card_through_cuda_visible_devices(monkeypatch, visible, device,
                                                               card):
    _nvml(monkeypatch)
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    stats = GpuProbe.open(device).sample()
    assert (stats.index, stats.memory_used_mib, stats.memory_total_mib,
            stats.utilization_pct) == (card, 3072, 81920, 97)


def test_no_probe_on_a_cpu_or_without_nvml(monkeypatch):
    assert GpuProbe.open("cpu") is None
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails
    assert GpuProbe.open("cuda") is None


@pytest.mark.cluster
def test_a_worker_that_takes_a_new_identity_frees_the_cells_of_its_old_one(cluster_factory):
    """After a failed batch a worker registers under a fresh id; naming the one it gave up
    frees that one's cells at once instead of after the broker's worker timeout."""
    from stagepool.common import wire
    from stagepool.common.errors import RemoteError

    cluster = cluster_factory(workers=1)
    with BrokerClient(cluster.broker, timeout_s=10) as client:
        cluster.wait_ready(client, 1)
        spare = 64 - 1  # the ring's cells, less the stage's own worker's

        def register(worker_id, replaces=""):
            return client.call(wire.Register(worker_id=worker_id, stage="encode", host="h",
                                             pid=1, cells=spare, replaces=replaces))

        register("ghost-a")
        with pytest.raises(RemoteError, match="free lease cells"):
            register("ghost-b")  # a stranger: ghost-a still holds them
        assert len(register("ghost-c", replaces="ghost-a").cells) == spare
        client.call(wire.Unregister(worker_id="ghost-c"))
