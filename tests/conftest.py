"""Shared fixtures: real redis-server processes, ring memories of every local backend."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid

import pytest

from stagepool.broker.cluster import start_redis
from stagepool.common.ring import Layout, Ring
from stagepool.common.ring.shm import ShmMemory
from stagepool.common.ring.tcp import TcpMemory
from stagepool.common.ring.tcpserver import TcpRingServer


class RedisServer:
    """A private redis-server (no persistence unless asked), started as `stagepool up` does."""

    def __init__(self, tmp_path, persist: bool = False):
        if shutil.which("redis-server") is None:
            pytest.fail("redis-server is not installed (make setup installs it)")
        self.dir = tmp_path
        self.process, self.url = start_redis(tmp_path, persist)
        self.port = int(self.url.rsplit(":", 1)[1].split("/")[0])

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


def gateway_client(base_url: str, token: str = "", workers: int = 1,
                   timeout_s: float = 120.0, http_timeout_s: float = 30.0):
    """An HTTP client of a cluster's gateway, once it answers and every stage has `workers`
    live workers (the broker's count: null while it is unreachable)."""
    import httpx

    client = httpx.Client(base_url=base_url, timeout=http_timeout_s,
                          headers={"Authorization": f"Bearer {token}"} if token else {})
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if all(q["workers"] == workers for q in client.get("/v1/queues").json()["stages"]):
                return client
        except (httpx.HTTPError, KeyError, TypeError, ValueError):
            pass
        if time.monotonic() > deadline:
            client.close()
            raise AssertionError("the gateway or the workers never came up")
        time.sleep(0.2)


@pytest.fixture
def redis_server(tmp_path):
    server = RedisServer(tmp_path)
    yield server
    server.stop()


@pytest.fixture
def namespace():
    return f"t{uuid.uuid4().hex[:8]}"


class RingFixture:
    """An owner ring (shm) plus a way to open client memories by `backend`."""

    def __init__(self, backend: str, layout: Layout):
        self.backend = backend
        self.layout = layout
        self.name = f"stagepool-test-{uuid.uuid4().hex[:10]}"
        self.owner_mem = ShmMemory(self.name, layout.nbytes, create=True)
        self.owner = Ring.format(self.owner_mem, layout)
        self.server = None
        if backend == "tcp":
            self.server = TcpRingServer("tcp://127.0.0.1:0", {"ring": self.owner_mem._region},
                                        {"ring": self.owner_mem.nbytes})
            self.server.start()
        self._clients = []

    def spec(self) -> tuple[str, str]:
        """What a child process needs to attach: (backend, address)."""
        return (self.backend, self.server.endpoint if self.server else self.name)

    def client(self) -> Ring:
        ring = attach(*self.spec())
        self._clients.append(ring)
        return ring

    def close(self) -> None:
        for ring in self._clients:
            ring.mem.close()
        if self.server:
            self.server.stop()
        self.owner_mem.close()


def attach(backend: str, address: str) -> Ring:
    if backend == "tcp":
        return Ring.attach(TcpMemory(address, "ring"))
    return Ring.attach(ShmMemory(address))


@pytest.fixture(params=["shm", "tcp"])
def ring_backend(request):
    return request.param


@pytest.fixture
def make_ring(ring_backend):
    made = []

    def make(capacity=16, slot_bytes=256, cells=8):
        fixture = RingFixture(ring_backend, Layout(capacity, slot_bytes, cells))
        made.append(fixture)
        return fixture

    yield make
    for fixture in made:
        fixture.close()


def wait_ended(store, job_ids: list[str], timeout_s: float) -> list[str | None]:
    """The states of `job_ids`, in order, once all have ended or `timeout_s` has passed:
    woken by the job store's `{ns}:ended` announcements, not by polling."""
    from stagepool.common.jobstore import EndedFeed
    from stagepool.common.wire import TERMINAL_STATES

    feed = EndedFeed(store)  # subscribed first: a job that ends from here on is announced
    try:
        states = dict(zip(job_ids, store.states(job_ids)))
        running = [j for j, state in states.items() if state not in TERMINAL_STATES]
        states.update(feed.wait(running, timeout_s))
    finally:
        feed.close()
    if any(state not in TERMINAL_STATES for state in states.values()):
        states = dict(zip(job_ids, store.states(job_ids)))
    return [states[j] for j in job_ids]


def pytest_configure(config):
    os.environ.setdefault("PYTHONHASHSEED", "0")


def pytest_collection_modifyitems(items):
    """Every test that starts a cluster is marked `cluster`, however it gets one."""
    for item in items:
        if {"cluster", "cluster_factory"} & set(item.fixturenames):
            item.add_marker(pytest.mark.cluster)


TEST_PIPELINE = """
[pipeline]
name = "noop"
{stages}

[redis]
namespace = "{namespace}"

[ring]
capacity = 256
claim_grace_ms = 500
publish_grace_ms = 500

[broker]
reaper_interval_ms = 50
worker_timeout_ms = 3000

[worker]
heartbeat_ms = 200
{worker_extra}

[transfer]
backend = "{transfer}"

[gateway]
port = 0
token = "{token}"
broker_timeout_s = 1.0
"""

STAGE = """
[[pipeline.stages]]
name = "{name}"
state = "{state}"
sleep_ms = {sleep_ms}
workers = {workers}
lease_ms = {lease_ms}
max_attempts = {max_attempts}
max_batch = {max_batch}
"""

# Where the model tests run their stages: "cpu" here and in CI; `STAGEPOOL_TEST_DEVICE=cuda`
# on a GPU machine (bench/gpu_env.sh) runs the same tests there.
DEVICE = os.environ.get("STAGEPOOL_TEST_DEVICE", "cpu")

MODEL_STAGE = """kind = "{kind}"
options = {{ family = "{family}", model_path = "{model_path}", threads = 1, results_dir = "{results_dir}", device = "{device}" }}
"""


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """The tiny model directories, built once per test session."""
    from stagepool.stages.families.tiny import init_tiny

    return init_tiny(tmp_path_factory.mktemp("models"))


class Cluster:
    """`stagepool up` as a real process tree on a real Redis."""

    def __init__(self, tmp_path, redis_url, namespace, workers=2, sleep_ms=0, models=None,
                 lease_ms=1000, transfer="auto", token="", max_batch=1, stage_extra="",
                 worker_extra="", max_attempts=5, family="tiny", extra=""):
        """`models`: a tiny model directory -> the model stages on it, else no-op stages.
        `stage_extra` and `worker_extra`: more TOML lines for every stage and for [worker]."""
        import json
        import sys

        stages = ""
        for name, state in [("encode", "encoding"), ("denoise", "denoising"),
                            ("decode", "decoding")]:
            stages += STAGE.format(name=name, state=state, sleep_ms=sleep_ms, workers=workers,
                                   lease_ms=lease_ms, max_batch=max_batch,
                                   max_attempts=max_attempts) + stage_extra
            if models is not None:
                stages += MODEL_STAGE.format(kind=name, model_path=models, device=DEVICE,
                                             family=family,
                                             results_dir=tmp_path / "results")
        self.config_path = tmp_path / "pipeline.toml"
        self.config_path.write_text(TEST_PIPELINE.format(
            stages=stages, namespace=namespace, transfer=transfer, token=token,
            worker_extra=worker_extra) + extra)
        self.state_dir = tmp_path / "state"
        self.log = open(tmp_path / "up.log", "wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "stagepool.broker.cli", "up", "--config",
             str(self.config_path), "--redis-url", redis_url, "--state-dir", str(self.state_dir)],
            stdout=self.log, stderr=subprocess.STDOUT,
        )
        info_path = self.state_dir / "cluster.json"
        deadline = time.monotonic() + 30
        while not info_path.exists():
            assert self.process.poll() is None, "stagepool up exited"
            assert time.monotonic() < deadline, "stagepool up did not start"
            time.sleep(0.05)
        self.info = json.loads(info_path.read_text())
        self.broker = self.info["broker"]
        self.gateway = self.info["gateway"]

    def pids(self) -> dict[str, int]:
        import json

        return json.loads((self.state_dir / "cluster.json").read_text())["children"]

    def wait_ready(self, client, workers_per_stage: int, timeout_s: float = 30) -> None:
        """Until every stage has its workers and the gateway (where there is one) answers."""
        import httpx

        deadline = time.monotonic() + timeout_s
        while True:
            queues = client.queues().queues
            if all(q.workers >= workers_per_stage for q in queues):
                break
            assert time.monotonic() < deadline, f"workers never registered: {queues}"
            time.sleep(0.1)
        while self.gateway:
            try:
                httpx.get(f"{self.gateway}/health", timeout=5)
                return
            except httpx.TransportError:
                assert time.monotonic() < deadline, "the gateway never answered"
                time.sleep(0.1)

    def stop(self) -> None:
        import signal

        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


@pytest.fixture
def cluster_factory(tmp_path, redis_server, namespace):
    made = []

    def make(**kwargs):
        cluster = Cluster(tmp_path, redis_server.url, namespace, **kwargs)
        made.append(cluster)
        return cluster

    yield make
    for cluster in made:
        cluster.stop()
