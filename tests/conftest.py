"""Shared fixtures: real redis-server processes, ring memories of every local backend."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid

import pytest
import redis

from stagepool.broker.cluster import free_port
from stagepool.common.ring import Layout, Ring
from stagepool.common.ring.shm import ShmMemory
from stagepool.common.ring.tcp import TcpMemory, TcpRingServer


class RedisServer:
    def __init__(self, tmp_path, persist: bool = False):
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed (make setup installs it)")
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.dir = tmp_path
        args = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(tmp_path),
                "--save", "", "--appendonly", "yes" if persist else "no"]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.02)
        client.close()

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


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


def pytest_configure(config):
    os.environ.setdefault("PYTHONHASHSEED", "0")
