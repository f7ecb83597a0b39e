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


def consume(spec, cell: int, out_path: str, work_s: float, idle_exit_s: float) -> None:
    """Claim, lease, 'work', record, unlease; exit after `idle_exit_s` without items."""
    ring = attach(*spec)
    fd = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    idle_since = time.monotonic()
    while time.monotonic() - idle_since < idle_exit_s:
        claim = ring.claim(timeout_s=0.05)
        if claim is None:
            continue
        idle_since = time.monotonic()
        item, attempt = claim.payload.decode().rsplit(":", 1)
        ring.lease(cell, claim.ticket, int(attempt), item, 300)
        if not ring.release(claim):
            ring.unlease(cell)
            continue
        if work_s:
            time.sleep(work_s)
        os.write(fd, f"{item}:{attempt}\n".encode())  # one small O_APPEND write: atomic
        ring.unlease(cell)
    os.close(fd)
    ring.mem.close()
