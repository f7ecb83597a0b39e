"""Child-process bodies for the multi-process ring tests (importable for spawn)."""

from __future__ import annotations

import os
import time

from tests.conftest import attach


def produce(spec, producer: int, count: int) -> None:
    ring = attach(*spec)
    for i in range(count):
        ring.produce(f"{producer}:{i}:1".encode(), timeout_s=30)
    ring.mem.close()


def consume(spec, cell: int, out_path: str, stop) -> None:
    """Claim, lease, record, unlease, until `stop` (an Event) is set."""
    ring = attach(*spec)
    fd = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    while not stop.is_set():
        claim = ring.claim(timeout_s=0.05)
        if claim is None:
            continue
        item, attempt = claim.payload.decode().rsplit(":", 1)
        ring.lease(cell, claim.ticket, int(attempt), item, 300)
        if not ring.release(claim):
            ring.unlease(cell)
            continue
        os.write(fd, f"{item}:{attempt}\n".encode())  # one small O_APPEND write: atomic
        ring.unlease(cell)
    os.close(fd)
    ring.mem.close()


def work(spec, cell: int, redis_url: str, namespace: str, work_s: float,
         idle_exit_s: float) -> None:
    """A worker's path on one stage, by hand: claim, lease, release, start, work, complete,
    unlease; exit after `idle_exit_s` without dispatches."""
    from stagepool.common import transitions as tx
    from stagepool.common.jobstore import JobStore
    from stagepool.common.dispatch import decode_dispatch

    ring = attach(*spec)
    store = JobStore(redis_url, namespace)
    worker = f"w{cell}-{os.getpid()}"
    idle_since = time.monotonic()
    while time.monotonic() - idle_since < idle_exit_s:
        claim = ring.claim(timeout_s=0.05)
        if claim is None:
            continue
        idle_since = time.monotonic()
        d = decode_dispatch(claim.payload)
        ring.lease(cell, claim.ticket, d.attempt, d.job_id, 300)
        if not ring.release(claim):
            ring.unlease(cell)
            continue
        if store.apply(tx.Start(d.job_id, d.stage, d.attempt, worker, "working", 0)).ok:
            time.sleep(work_s)
            store.apply(tx.Complete(d.job_id, d.stage, d.attempt, worker, b"{}"))
        ring.unlease(cell)
    store.close()
    ring.mem.close()


def hold_then_report(spec, cell: int, out_path: str) -> None:
    """Lease `cell`, say so, wait to be frozen and thawed (the parent SIGSTOPs us past the
    lease), then try to beat and unlease and write what happened."""
    ring = attach(*spec)
    ring.lease(cell, 0, 1, "frozen-job", 200)
    with open(out_path + ".leased", "w") as f:
        f.write("1")
    while not os.path.exists(out_path + ".go"):
        time.sleep(0.01)
    beat, stop, unleased = ring.beat(cell), ring.stop_requested(cell), ring.unlease(cell)
    with open(out_path, "w") as f:
        f.write(f"{int(beat)} {int(stop)} {int(unleased)}")
    ring.mem.close()
