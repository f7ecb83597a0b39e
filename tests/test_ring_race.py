"""Multi-process races on one ring: P producers x C consumers, with and without kills.

Without kills every item is consumed exactly once. With consumers SIGKILLed mid-claim, the
owner (this process, playing the broker's reaper) republishes expired leases and reclaimed
slots with attempt + 1: every item is still delivered at least once, requeued ones with
attempt > 1.
"""

from __future__ import annotations

import collections
import multiprocessing
import os
import signal
import time

import pytest

from tests import ring_procs

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
    per_producer = 1500 if ring_backend == "shm" else 300
    ring = make_ring(capacity=64, cells=consumers)
    outs = [str(tmp_path / f"c{c}.txt") for c in range(consumers)]
    procs = [ctx.Process(target=ring_procs.consume, args=(ring.spec(), c, outs[c], 0, 3.0))
             for c in range(consumers)]
    procs += [ctx.Process(target=ring_procs.produce, args=(ring.spec(), p, per_producer))
              for p in range(producers)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=240)
        assert proc.exitcode == 0
    records = _read_records(outs)
    expected = {f"{p}:{i}:1" for p in range(producers) for i in range(per_producer)}
    counts = collections.Counter(records)
    assert set(counts) == expected
    assert max(counts.values()) == 1, "an item was consumed twice"


def test_consumers_killed_mid_claim_lose_nothing(make_ring, ring_backend, tmp_path):
    total = 300 if ring_backend == "shm" else 120
    lease_s = 0.3
    ring = make_ring(capacity=32, cells=8)
    owner = ring.owner
    outs = [str(tmp_path / f"c{c}.txt") for c in range(8)]

    def start_consumer(cell):
        proc = ctx.Process(target=ring_procs.consume, args=(ring.spec(), cell, outs[cell], 0.01, 4.0))
        proc.start()
        return proc

    victims = [start_consumer(c) for c in range(3)]
    survivor = start_consumer(3)
    pending = collections.deque(f"x:{i}:1".encode() for i in range(total))
    beats = {}
    recovered = set()
    stuck_since = {}
    killed = replaced = False
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        while pending and owner.try_produce(pending[0]):
            pending.popleft()
        now = time.monotonic()
        if not killed and len(_read_records(outs)) > total // 4:
            for proc in victims:  # SIGKILL: no chance to unlease or release
                os.kill(proc.pid, signal.SIGKILL)
            killed = True
        if killed and not replaced:
            for proc in victims:
                proc.join()
            start_consumer(4)
            replaced = True
        # The owner's reaper: expired leases and slots claimed but never released.
        for cell in range(8):
            lease = owner.read_lease(cell)
            if lease is None:
                continue
            gen, beat, seen = beats.get(cell, (None, None, now))
            if (gen, beat) != (lease.gen, lease.beat):
                beats[cell] = (lease.gen, lease.beat, now)
            elif now - seen > lease_s and (cell, lease.gen) not in recovered:
                recovered.add((cell, lease.gen))
                pending.append(f"{lease.job_id}:{lease.attempt + 1}".encode())
        claimed, _, _ = owner.stuck()
        for position in claimed:
            if now - stuck_since.setdefault(position, now) > lease_s:
                payload = owner.reclaim(position)
                if payload is not None:
                    item, attempt = payload.decode().rsplit(":", 1)
                    pending.append(f"{item}:{int(attempt) + 1}".encode())
        delivered = {r.rsplit(":", 1)[0] for r in _read_records(outs)}
        if len(delivered) == total and not pending:
            break
        time.sleep(0.02)
    records = _read_records(outs)
    delivered = collections.defaultdict(list)
    for record in records:
        item, attempt = record.rsplit(":", 1)
        delivered[item].append(int(attempt))
    assert killed
    assert set(delivered) == {f"x:{i}" for i in range(total)}, "an item was lost"
    requeued = [item for item, attempts in delivered.items() if max(attempts) > 1]
    assert requeued, "killing consumers mid-claim should have forced requeues"
    assert all(1 in attempts or max(attempts) > 1 for attempts in delivered.values())
