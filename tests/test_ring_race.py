"""Multi-process races on one ring: P producers x C consumers, with and without kills.

Without kills every item is consumed exactly once. With workers SIGKILLed mid-job, the
broker's own Reaper (in this process, on the owner's memory) recovers expired leases and
reclaimed slots through the real job store: every job still succeeds exactly once.
"""

from __future__ import annotations

import collections
import multiprocessing
import os
import signal
import time

import msgspec
import pytest

from stagepool.broker.dispatcher import Dispatcher
from stagepool.broker.reaper import Reaper
from stagepool.common import transitions as tx
from stagepool.common.config import Config
from stagepool.common.jobstore import JobStore
from stagepool.common.dispatch import Dispatch, encode_dispatch
from tests import ring_procs

from .conftest import wait_ended

pytestmark = pytest.mark.cluster  # every test races processes
ctx = multiprocessing.get_context("spawn")


def _read_records(paths):
    records = []
    for path in paths:
        if os.path.exists(path):
            with open(path) as f:
                records += [line.strip() for line in f if line.strip()]
    return records


@pytest.mark.parametrize("producers,consumers", [(3, 3), (1, 4), (4, 1)])
def test_every_item_is_consumed_exactly_once(make_ring, ring_backend, tmp_path, producers,
                                             consumers):
    per_producer = 600 if ring_backend == "shm" else 150
    ring = make_ring(capacity=64, cells=consumers)
    outs = [str(tmp_path / f"c{c}.txt") for c in range(consumers)]
    stop = ctx.Event()
    procs = [ctx.Process(target=ring_procs.consume, args=(ring.spec(), c, outs[c], stop))
             for c in range(consumers)]
    procs += [ctx.Process(target=ring_procs.produce, args=(ring.spec(), p, per_producer))
              for p in range(producers)]
    for proc in procs:
        proc.start()
    deadline = time.monotonic() + 240
    while len(_read_records(outs)) < producers * per_producer:
        assert time.monotonic() < deadline, "items were lost"
        time.sleep(0.02)
    stop.set()  # every item is recorded and the ring is empty: a second delivery is not coming
    for proc in procs:
        proc.join(timeout=30)
        assert proc.exitcode == 0
    records = _read_records(outs)
    expected = {f"{p}:{i}:1" for p in range(producers) for i in range(per_producer)}
    counts = collections.Counter(records)
    assert set(counts) == expected
    assert max(counts.values()) == 1, "an item was consumed twice"


def test_workers_killed_mid_job_lose_nothing_the_reaper_requeues(
        make_ring, ring_backend, tmp_path, redis_server, namespace):
    """Workers SIGKILLed anywhere between claim and commit, with the broker's real Reaper
    and job store: every job still succeeds, its result committed once."""
    total = 300 if ring_backend == "shm" else 120
    config = msgspec.convert({
        "pipeline": {"name": "race", "stages": [{"name": "work", "lease_ms": 300,
                                                 "max_attempts": 20}]},
        "redis": {"url": redis_server.url, "namespace": namespace},
        "ring": {"claim_grace_ms": 300, "publish_grace_ms": 300},
        "broker": {"reaper_interval_ms": 20}}, Config)
    ring = make_ring(capacity=32, cells=8)
    # The stage's priority lanes: every dispatch here has priority 0, the main lane's.
    rings = {"work": [make_ring(capacity=32, cells=1).owner, ring.owner,
                      make_ring(capacity=32, cells=1).owner]}
    store = JobStore(redis_server.url, namespace)
    dispatcher = Dispatcher(rings)
    reaper = Reaper(config, rings, store, dispatcher)
    job_ids = [f"x{i}" for i in range(total)]
    for job_id in job_ids:
        dispatch = encode_dispatch(Dispatch(job_id, 1, "work"))
        assert store.apply(tx.Submit(job_id, "race", b"{}", "work", dispatch)).ok
        dispatcher.publish("work", dispatch)
    reaper.start()

    def start_worker(cell):
        proc = ctx.Process(target=ring_procs.work, args=(ring.spec(), cell, redis_server.url,
                                                          namespace, 0.01, 30.0))
        proc.start()
        return proc

    workers = [start_worker(c) for c in range(4)]
    try:
        deadline = time.monotonic() + 60
        while store.redis.zcard(store.keys.results) < total // 4:
            assert time.monotonic() < deadline, "the workers made no progress"
            time.sleep(0.01)
        for proc in workers[:3]:  # SIGKILL: no chance to unlease, release or commit
            os.kill(proc.pid, signal.SIGKILL)
            proc.join()
        workers.append(start_worker(4))
        states = wait_ended(store, job_ids, timeout_s=120)
    finally:
        reaper.stop()
        for proc in workers:
            proc.kill()
            proc.join()
    assert collections.Counter(states) == {"succeeded": total}
    records = [store.get(j) for j in job_ids]
    assert {r["commits"] for r in records} == {"1"}
    assert reaper.recovered_total >= 1
    assert any(int(r["work.attempt"]) > 1 for r in records), "nothing was requeued"


def _one_stage(make_ring, redis_server, namespace, lease_ms: int):
    """A one-stage pipeline's config, its main ring (2 cells) and its lanes for a Reaper."""
    config = msgspec.convert({
        "pipeline": {"name": "race", "stages": [{"name": "work", "lease_ms": lease_ms}]},
        "redis": {"url": redis_server.url, "namespace": namespace}}, Config)
    ring = make_ring(capacity=8, cells=2)
    rings = {"work": [make_ring(capacity=8, cells=1).owner, ring.owner,
                      make_ring(capacity=8, cells=1).owner]}
    return config, ring, rings


def test_an_expired_lease_found_while_redis_is_away_is_recovered_once_it_is_back(
        make_ring, tmp_path, redis_server, namespace):
    """The reaper records a recovery only once Redis has: a tick that cannot reach Redis
    leaves it owed, and the next tick that can records it."""
    from stagepool.broker.cluster import free_port
    from stagepool.common.errors import StoreUnavailable

    config, ring, rings = _one_stage(make_ring, redis_server, namespace, lease_ms=100)
    store = JobStore(redis_server.url, namespace)
    away = JobStore(f"redis://127.0.0.1:{free_port()}/0", namespace)  # nothing listens there
    reaper = Reaper(config, rings, away, Dispatcher(rings))
    dispatch = encode_dispatch(Dispatch("lost", 1, "work"))
    assert store.apply(tx.Submit("lost", "race", b"{}", "work", dispatch)).ok
    worker = ring.client()
    worker.try_produce(dispatch)
    claim = worker.try_claim()
    worker.lease(0, claim.ticket, 1, "lost", 100)
    worker.release(claim)
    assert store.apply(tx.Start("lost", "work", 1, "w", "working", 0)).ok
    with pytest.raises(StoreUnavailable):
        reaper.tick(time.monotonic())  # sees the lease (and cannot reach Redis)
    with pytest.raises(StoreUnavailable):
        reaper.tick(time.monotonic() + 1)  # expired: owed, but Redis is away
    assert store.get("lost")["work.attempt"] == "1"
    reaper.store = store
    reaper.tick(time.monotonic() + 2)
    assert store.get("lost")["work.attempt"] == "2"
    assert ring.owner.depth() == 1  # attempt 2 published again
    away.close()
    store.close()


def test_a_frozen_worker_resumed_after_its_cell_was_reused_cannot_touch_it(
        make_ring, tmp_path, redis_server, namespace):
    """A worker SIGSTOPped past its lease: the reaper fences the cell and recovers the job,
    the registry gives the cell to a new worker, and the old one, resumed, fails every change
    of the cell (it learns it was superseded) while the new lease stays whole."""
    config, ring, rings = _one_stage(make_ring, redis_server, namespace, lease_ms=200)
    store = JobStore(redis_server.url, namespace)
    reaper = Reaper(config, rings, store, Dispatcher(rings))
    out = str(tmp_path / "frozen")
    proc = ctx.Process(target=ring_procs.hold_then_report, args=(ring.spec(), 0, out))
    proc.start()
    deadline = time.monotonic() + 60
    while not os.path.exists(out + ".leased"):
        assert time.monotonic() < deadline and proc.is_alive()
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        while ring.owner.read_lease(0) is not None:  # expired, fenced, recovered
            assert time.monotonic() - started < 10, "the frozen lease was never expired"
            reaper.tick(time.monotonic())
            time.sleep(0.02)
        assert ring.owner.fence(0), "the registry's fence before it gives the cell away"
        new = ring.client()
        new.lease(0, 5, 2, "new-job", 5000)
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    open(out + ".go", "w").close()
    proc.join(timeout=30)
    assert proc.exitcode == 0
    with open(out) as f:
        beat, stop, unleased = f.read().split()
    assert (beat, stop, unleased) == ("0", "1", "0"), "the old holder changed a cell it lost"
    lease = ring.owner.read_lease(0)
    assert (lease.job_id, lease.attempt, lease.ticket) == ("new-job", 2, 5)
    assert new.beat(0) and new.unlease(0)
    store.close()
