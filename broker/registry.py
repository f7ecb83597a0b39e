"""The broker's registry of live workers: who they are, what they run on, what they are doing.

Lifecycle of an entry:
  1. `register` gives a worker fresh lease cells in its stage's ring (fenced from whoever had
     them before, broker/ringhost.py) and records what it said about itself (host, pid, device);
  2. each heartbeat refreshes it with the worker's busy flag, jobs done and GPU figures;
  3. `drop` (the worker unregistered) or `expire` (silent for broker.worker_timeout_ms)
     frees its cells; the reaper recovers any lease it still held.
`listing` answers `stagepool workers`, the gateway's /v1/workers and its GPU metrics: the
entries, plus the jobs each one leases now (read from its ring cells) and their steps (from
Redis). The entries live in the broker's memory only: a restarted broker learns every worker
again at its next heartbeat.
"""

from __future__ import annotations

import logging
import time

import msgspec

from ..common import wire
from ..common.config import Config
from ..common.errors import ProtocolError, StagepoolError
from ..common.jobstore import JobStore
from .ringhost import RingHost

log = logging.getLogger(__name__)


class _Entry:
    __slots__ = ("info", "cells", "last_seen")

    def __init__(self, info: wire.WorkerInfo, cells: list[int], now: float):
        self.info = info
        self.cells = cells
        self.last_seen = now


class Registry:
    def __init__(self, config: Config, ringhost: RingHost, store: JobStore):
        self.config = config
        self.ringhost = ringhost
        self.store = store
        self._entries: dict[str, _Entry] = {}

    def register(self, request: wire.Register) -> list[int]:
        """Lease cells for the worker (RingError when its ring has none left)."""
        stage = self.config.stage(request.stage)
        self.drop(request.worker_id)
        if request.replaces:  # its cells free up as the reaper recovers their leases
            self.drop(request.replaces)
        if not 1 <= request.cells <= self.ringhost.layout.cells:
            raise ProtocolError(f"cells must be 1..{self.ringhost.layout.cells}")
        cells = self.ringhost.allocate_cells(stage.name, request.worker_id, request.cells)
        now_ms = int(time.time() * 1000)
        info = wire.WorkerInfo(
            worker_id=request.worker_id, stage=stage.name, host=request.host, pid=request.pid,
            transport=request.transport, device=request.device or "cpu", registered_ms=now_ms,
            heartbeat_ms=now_ms)
        self._entries[request.worker_id] = _Entry(info, cells, time.monotonic())
        log.info("worker %s (%s, pid %d on %s, %s) registered for %s, cells %s",
                 request.worker_id, request.transport, request.pid, request.host, info.device,
                 stage.name, cells)
        return cells

    def heartbeat(self, beat: wire.Heartbeat) -> bool:
        """Refresh a worker; False when it is unknown (it must register again)."""
        entry = self._entries.get(beat.worker_id)
        if entry is None:
            return False
        entry.last_seen = time.monotonic()
        info = entry.info
        info.busy, info.jobs_done, info.gpu = beat.busy, beat.jobs_done, beat.gpu
        info.heartbeat_ms = int(time.time() * 1000)
        return True

    def drop(self, worker_id: str) -> None:
        entry = self._entries.pop(worker_id, None)
        if entry is not None:
            self.ringhost.free_cell(entry.info.stage, worker_id)

    def expire(self, now: float) -> None:
        timeout_s = self.config.broker.worker_timeout_ms / 1000
        for worker_id, entry in list(self._entries.items()):
            if now - entry.last_seen > timeout_s:
                log.warning("worker %s (%s) silent for %.1f s: dropped", worker_id,
                            entry.info.stage, now - entry.last_seen)
                self.drop(worker_id)

    def count(self, stage: str) -> int:
        return sum(1 for e in self._entries.values() if e.info.stage == stage)

    def listing(self) -> wire.WorkerList:
        """Every worker, with the jobs its cells lease now and the first one's step."""
        out, steps = [], []
        for entry in sorted(self._entries.values(),
                            key=lambda e: (e.info.stage, e.info.worker_id)):
            ring = self.ringhost.rings[entry.info.stage]
            jobs = [lease.job_id for cell in entry.cells
                    if (lease := ring.read_lease(cell)) is not None]
            info = msgspec.structs.replace(entry.info, jobs=jobs)
            out.append(info)
            if jobs:
                steps.append((info, jobs[0]))
        if steps:
            try:
                found = self.store.fields([(job, f"{info.stage}.step") for info, job in steps])
            except StagepoolError:
                found = [None] * len(steps)  # Redis away: the listing goes on without steps
            for (info, _), step in zip(steps, found):
                info.step = step or ""
        return wire.WorkerList(workers=out)


class DeadPeers:
    """Producers (Mooncake sessions) some worker could not pull from: told to every worker
    with its heartbeat's answer, so jobs that need them go back a stage at once, until the
    producer's own heartbeat proves it alive (then told as revived, for as long)."""

    MAX_PEERS = 1000

    def __init__(self, dead_s: float):
        self.dead_s = dead_s
        self._dead_until: dict[str, float] = {}
        self._revived_until: dict[str, float] = {}

    def report(self, peer: str, stage: str) -> None:
        if len(self._dead_until) >= self.MAX_PEERS:
            return
        self._dead_until[peer] = time.monotonic() + self.dead_s
        self._revived_until.pop(peer, None)
        log.warning("peer %s is unreachable (a %s pull failed): telling every worker", peer,
                    stage)

    def news(self, alive: str) -> tuple[list[str], list[str]]:
        """(dead, revived) peers to tell a worker whose own session is `alive`."""
        now = time.monotonic()
        if alive and self._dead_until.pop(alive, None) is not None:
            self._revived_until[alive] = now + self.dead_s
            log.info("peer %s is back", alive)
        self._dead_until = {p: t for p, t in self._dead_until.items() if t > now}
        self._revived_until = {p: t for p, t in self._revived_until.items() if t > now}
        return list(self._dead_until), list(self._revived_until)
