"""The data plane against real processes: a producer process holds tensors in its pool and a
consumer pulls them, in place on the same host (`local`) or through a real Mooncake engine."""

import json
import subprocess
import sys
import time

import msgspec
import pytest
import torch

from stagepool.common.config import TransferConfig
from stagepool.common.transfer import Exchange, FailureKind, PoolFull, PullStatus
from stagepool.common.transfer.pool import ALIGN_BYTES, Pool
from stagepool.common.dispatch import TensorDesc

BACKENDS = ["local", "mooncake"]
SIZES = [1, 7, 4096, 1 << 20, 16 << 20]  # bench/transfer.py goes to 256 MiB


class Producer:
    def __init__(self, backend: str, spec: dict[str, int]):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.transfer_procs", backend, json.dumps(spec)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        info = json.loads(self.proc.stdout.readline())
        self.endpoint = info["endpoint"]
        self.descs = msgspec.convert(info["descs"], list[TensorDesc])

    def command(self, line: str) -> str:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def expected(self, name: str) -> torch.Tensor:
        spec_len = len(self.descs)
        generator = torch.Generator().manual_seed(spec_len)
        for desc in self.descs:
            tensor = torch.randint(0, 256, (desc.nbytes,), dtype=torch.uint8, generator=generator)
            if desc.name == name:
                return tensor
        raise KeyError(name)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)
        self.close()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write("exit\n")
            self.proc.stdin.flush()
            self.proc.wait(10)
        self.proc.stdin.close()
        self.proc.stdout.close()


@pytest.fixture
def consumer_factory():
    made = []

    def make(backend: str, pool_mb: int = 8) -> Exchange:
        exchange = Exchange(TransferConfig(backend=backend, pool_mb=pool_mb, backoff_s=0.2,
                                           retries=1, timeout_s=2))
        made.append(exchange)
        return exchange

    yield make
    for exchange in made:
        exchange.close()


@pytest.mark.cluster  # a producer process
@pytest.mark.parametrize("backend", BACKENDS)
def test_tensors_of_every_size_arrive_bit_exact(backend, consumer_factory):
    spec = {f"t{n}": n for n in SIZES}
    producer = Producer(backend, spec)
    try:
        consumer = consumer_factory(backend, pool_mb=(sum(SIZES) >> 20) + 8)
        pull = consumer.pull(producer.endpoint, producer.descs)
        assert pull.wait(60) is PullStatus.DONE, pull.failure
        assert pull.nbytes == sum(SIZES)
        for name, nbytes in spec.items():
            assert pull.tensors[name].shape == (nbytes,)
            assert torch.equal(pull.tensors[name], producer.expected(name)), name
        pull.close()
    finally:
        producer.close()


@pytest.mark.cluster  # a producer process
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_corrupted_buffer_fails_the_checksum(backend, consumer_factory):
    producer = Producer(backend, {"embeds": 1 << 20})
    try:
        assert producer.command("corrupt embeds") == "ok"
        pull = consumer_factory(backend).pull(producer.endpoint, producer.descs)
        assert pull.wait(30) is PullStatus.FAILED
        assert pull.failure.kind is FailureKind.CHECKSUM and pull.failure.upstream
        assert "embeds" in pull.failure.message
    finally:
        producer.close()


@pytest.mark.cluster  # a producer process
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_killed_producer_is_reported_gone(backend, consumer_factory):
    producer = Producer(backend, {"embeds": 4096})
    producer.kill()
    pull = consumer_factory(backend).pull(producer.endpoint, producer.descs)
    assert pull.wait(30) is PullStatus.FAILED
    assert pull.failure.kind is FailureKind.PRODUCER_GONE and pull.failure.upstream


@pytest.mark.cluster  # a producer process
def test_a_dead_producer_costs_one_timeout_then_fails_at_once_until_it_is_back(
        consumer_factory):
    """The first pull from a killed producer waits out the engine's tries; it is then
    counted as dead, so the next jobs that need it go back a stage at once, until the
    broker says it is back (it heartbeated)."""
    producer = Producer("mooncake", {"embeds": 4096})
    producer.kill()
    consumer = consumer_factory("mooncake")
    session = json.loads(producer.endpoint)[6]
    assert consumer.dead_peer(producer.endpoint) == ""
    first = consumer.pull(producer.endpoint, producer.descs)
    assert first.wait(30) is PullStatus.FAILED
    assert consumer.dead_peer(producer.endpoint) == session
    started = time.monotonic()
    again = consumer.pull(producer.endpoint, producer.descs)
    assert again.wait(30) is PullStatus.FAILED
    assert again.failure.kind is FailureKind.PRODUCER_GONE and "dead" in again.failure.message
    assert time.monotonic() - started < 0.5
    consumer.peers_news([], [session])
    assert consumer.dead_peer(producer.endpoint) == ""


@pytest.mark.cluster  # a producer process
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_release_notice_frees_the_producers_hold(backend, consumer_factory):
    producer = Producer(backend, {"embeds": 4096})
    try:
        consumer = consumer_factory(backend)
        pull = consumer.pull(producer.endpoint, producer.descs)
        assert pull.wait(30) is PullStatus.DONE
        assert json.loads(producer.command("held")) == ["job/encode"]
        consumer.notify_release(producer.endpoint, "job/encode")
        deadline = time.monotonic() + 10
        while json.loads(producer.command("held")) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert json.loads(producer.command("held")) == []
    finally:
        producer.close()


@pytest.mark.cluster  # a producer process
@pytest.mark.parametrize("backend", BACKENDS)
def test_descriptors_outside_the_pool_are_refused(backend, consumer_factory):
    producer = Producer(backend, {"embeds": 4096})
    try:
        desc = producer.descs[0]
        bad = [msgspec.structs.replace(desc, address=desc.address + (1 << 40))]
        pull = consumer_factory(backend).pull(producer.endpoint, bad)
        assert pull.poll() is PullStatus.FAILED
        assert pull.failure.kind is FailureKind.BAD_DESCRIPTOR
        wrong_shape = [msgspec.structs.replace(desc, shape=[4097])]
        pull = consumer_factory(backend).pull(producer.endpoint, wrong_shape)
        assert pull.poll() is PullStatus.FAILED
    finally:
        producer.close()


def test_a_garbled_endpoint_is_a_failure_not_an_exception(consumer_factory):
    pull = consumer_factory("local").pull("{not json", [])
    assert pull.poll() is PullStatus.FAILED
    assert pull.failure.kind is FailureKind.BAD_DESCRIPTOR


def test_the_pool_reuses_freed_blocks_and_reports_full():
    pool = Pool(ALIGN_BYTES * 5)
    blocks = [pool.alloc(ALIGN_BYTES) for _ in range(4)]
    with pytest.raises(PoolFull):
        pool.alloc(1)
    pool.free(blocks[1], ALIGN_BYTES)
    pool.free(blocks[2], ALIGN_BYTES)
    assert pool.alloc(2 * ALIGN_BYTES) == blocks[1]  # neighbours coalesced into one block
    pool.free(blocks[0], ALIGN_BYTES)
    pool.free(blocks[1], 2 * ALIGN_BYTES)
    pool.free(blocks[3], ALIGN_BYTES)
    assert pool.used_bytes == 0
    assert pool.alloc(4 * ALIGN_BYTES) == blocks[0]
    pool.close()


def test_put_holds_until_released_and_a_rerun_replaces_the_hold():
    exchange = Exchange(TransferConfig(backend="local", pool_mb=1))
    try:
        exchange.put("j/encode", {"x": torch.ones(1000)})
        used = exchange.pool.used_bytes
        exchange.put("j/encode", {"x": torch.ones(1000)})
        assert exchange.pool.used_bytes == used
        assert exchange.held() == ["j/encode"]
        assert exchange.release("j/encode") and not exchange.release("j/encode")
        assert exchange.pool.used_bytes == 0
        with pytest.raises(PoolFull):
            exchange.put("big", {"x": torch.ones(1 << 20)})
        assert exchange.pool.used_bytes == 0  # a failed put leaves nothing allocated
    finally:
        exchange.close()
