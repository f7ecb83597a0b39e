"""The lease reaper: finds work whose worker is gone and gives it back to a pool.

Every tick, for each stage ring, on the broker's own memory:
  1. lease cells: a held lease whose beat has not changed for its lease_ms (by the broker's
     monotonic clock) is expired: the cell is fenced (its holder can never change it again,
     common/ring/cells.py), its holder asked to stop should it come back, and -> `recover`;
  2. slots claimed but not released for claim_grace_ms (a consumer died between claim and
     lease) -> `Ring.reclaim`, then `recover` from the slot's own record;
  3. a head slot taken but not published for publish_grace_ms (a producer died mid-write)
     -> `Ring.skip` (its producer's lease, if any, brings the job back through step 1);
  4. records waiting for ring space are moved in (`Dispatcher.drain`).
`recover` asks Redis (jobs.lua `retry`, mode crash) what to do: publish the stage again with
attempt + 1, publish the hand-on a dead worker had committed but not delivered, dead-letter
after max_attempts, or nothing (the attempt was already superseded).
"""

from __future__ import annotations

import logging
import threading
import time

from ..common.config import Config
from ..common.errors import ProtocolError, StagepoolError
from ..common import transitions as tx
from ..common.jobstore import JobStore
from ..common.ring import Ring, lanes
from ..common.ring.cells import WRITING
from ..common.dispatch import decode_dispatch
from .dispatcher import Dispatcher

log = logging.getLogger(__name__)

_RUN_ID_CHECK_S = 1.0
_TRIM_EVERY_S = 10.0  # how often the ids of expired job records are forgotten


class Reaper:
    def __init__(self, config: Config, lanes_by_stage: dict[str, list[Ring]], store: JobStore,
                 dispatcher: Dispatcher):
        self.config = config
        self.lanes = lanes_by_stage
        self.rings = {stage: rings[lanes.MAIN] for stage, rings in lanes_by_stage.items()}
        self.store = store
        self.dispatcher = dispatcher
        self._beats: dict[tuple[str, int], tuple[int, int, float]] = {}  # -> gen, beat, seen_at
        self._writing_since: dict[tuple[str, int], float] = {}
        self._claimed_since: dict[tuple[str, int], float] = {}
        self._unpublished_since: dict[tuple[str, int], float] = {}
        self._scan_from: dict[str, int] = {}  # by ring name
        # Recoveries found in the rings, not yet recorded in Redis: (stage, job, attempt, why).
        self._owed: list[tuple[str, str, int, str]] = []
        # Called (on this thread) when Redis comes back as a new server: it may have lost the
        # writes of its last second, so jobs and rings may disagree; the broker rebuilds.
        self.on_redis_restart = None
        self._run_id = ""
        self._next_run_id_check = 0.0
        self._next_trim = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.recovered_total = 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="reaper", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        interval_s = self.config.broker.reaper_interval_ms / 1000
        while not self._stop.wait(interval_s):
            try:
                self.tick(time.monotonic())
            except StagepoolError:
                log.warning("reaper tick failed; retrying next tick", exc_info=True)
            except Exception:
                log.exception("reaper tick crashed; retrying next tick")

    def tick(self, now: float) -> None:
        for stage, rings in self.lanes.items():  # the rings alone: no Redis
            self._scan_leases(stage, rings[lanes.MAIN], now)
            for lane, ring in enumerate(rings):
                self._scan_slots(stage, lanes.ring_name(stage, lane), ring, now)
        if now >= self._next_run_id_check:
            self._next_run_id_check = now + _RUN_ID_CHECK_S
            run_id = self.store.run_id()
            if self._run_id and run_id != self._run_id and self.on_redis_restart is not None:
                log.warning("redis restarted (run id %s -> %s): reconciling every unfinished "
                            "job with the rings", self._run_id, run_id)
                self.on_redis_restart()
            self._run_id = run_id
        self._settle()
        self._publish_due()
        self.dispatcher.drain()
        if now >= self._next_trim:
            self._next_trim = now + _TRIM_EVERY_S
            forgotten = int(self.store.apply(tx.Trim("")).values[0])
            if forgotten:
                log.info("forgot %d job ids whose records expired (retention_s)", forgotten)

    def _settle(self) -> None:
        """Record the recoveries found, oldest first. One stays owed until Redis has recorded
        it: a tick that fails (Redis away) leaves the rest for the next one, and a broker that
        dies owing them rebuilds every unfinished job at its start anyway."""
        while self._owed:
            try:
                self.recover(*self._owed[0])
            except StagepoolError:
                raise  # Redis is away: this one and the rest wait for the next tick
            except Exception:  # a bug: never let one recovery block the others
                log.exception("recovery %s failed; a broker restart rebuilds its job",
                              self._owed[0])
            self._owed.pop(0)

    def _publish_due(self) -> None:
        """Publish the retries whose backoff is over (kept in Redis, so none is lost with us:
        a restarted broker's rebuild publishes every unfinished job anyway)."""
        values = self.store.apply(tx.Due("")).values
        for i in range(0, len(values), 4):
            job_id, stage, attempt, dispatch = values[i:i + 4]
            if stage.decode() in self.rings:
                self.dispatcher.republish(stage.decode(), dispatch, int(attempt))
                log.info("job %s: delayed retry of %s (attempt %s) published", job_id.decode(),
                         stage.decode(), attempt.decode())

    def _scan_leases(self, stage: str, ring: Ring, now: float) -> None:
        for cell in range(ring.layout.cells):
            lease = ring.read_lease(cell)
            key = (stage, cell)
            if lease is None:
                self._beats.pop(key, None)
                self._scan_writing(stage, ring, cell, now)
                continue
            gen, beat, seen_at = self._beats.get(key, (-1, -1, now))
            if (gen, beat) != (lease.gen, lease.beat):
                self._beats[key] = (lease.gen, lease.beat, now)
                continue
            if now - seen_at < lease.lease_ms / 1000:
                continue
            # Fence first: the holder, should it come back (frozen, partitioned), can never
            # change the cell again, and stops at its next step. A lease that changed since
            # we judged it has a live holder: leave it.
            if not ring.fence(cell, lease.gen):
                continue
            ring.request_stop(cell, lease.gen)
            log.warning("lease expired: job %s stage %s attempt %d (cell %d)",
                        lease.job_id, stage, lease.attempt, cell)
            self._owed.append((stage, lease.job_id, lease.attempt, "lease expired"))

    def _scan_writing(self, stage: str, ring: Ring, cell: int, now: float) -> None:
        """A cell left mid-write (its worker died in the microseconds of a lease's body
        write) is taken back once no live worker could still be writing it."""
        key = (stage, cell)
        if ring.cell_state(cell) != WRITING:
            self._writing_since.pop(key, None)
            return
        since = self._writing_since.setdefault(key, now)
        if now - since > self.config.broker.worker_timeout_ms / 1000:
            ring.fence(cell, writing_too=True)
            self._writing_since.pop(key, None)
            log.warning("lease cell %s/%d was left mid-write: taken back", stage, cell)

    def _scan_slots(self, stage: str, name: str, ring: Ring, now: float) -> None:
        """One lane's ring (`name`) of `stage`: claimed slots never released, and slots
        taken but never published."""
        claim_grace_s = self.config.ring.claim_grace_ms / 1000
        publish_grace_s = self.config.ring.publish_grace_ms / 1000
        claimed, unpublished, dequeue = ring.stuck(self._scan_from.get(name, 0))
        self._scan_from[name] = claimed[0] if claimed else dequeue
        live = set()
        for position in claimed:
            key = (name, position)
            live.add(key)
            first = self._claimed_since.setdefault(key, now)
            if now - first < claim_grace_s:
                continue
            payload = ring.reclaim(position)
            if payload is None:
                continue
            try:
                dispatch = decode_dispatch(payload)
            except ProtocolError:
                log.error("reclaimed an undecodable record at %s/%d; dropped", name, position)
                continue
            log.warning("slot %s/%d claimed but never released: job %s attempt %d",
                        name, position, dispatch.job_id, dispatch.attempt)
            self._owed.append((stage, dispatch.job_id, dispatch.attempt,
                               "claimed, never leased"))
        for key in [k for k in self._claimed_since if k[0] == name and k not in live]:
            del self._claimed_since[key]
        if unpublished is None:
            self._unpublished_since = {k: v for k, v in self._unpublished_since.items()
                                       if k[0] != name}
            return
        first = self._unpublished_since.setdefault((name, unpublished), now)
        if now - first >= publish_grace_s and ring.skip(unpublished):
            log.warning("skipped slot %s/%d: taken but never published", name, unpublished)

    def recover(self, stage: str, job_id: str, attempt: int, reason: str) -> None:
        stage_config = self.config.stage(stage)
        next_stage = self.config.next_stage(stage)
        outcome = self.store.apply(tx.Retry(
            job_id, stage, attempt, "broker", reason, stage_config.max_attempts, "crash",
            next_stage.name if next_stage else ""))
        if outcome.status == "retry":
            new_attempt, dispatch = int(outcome.values[0]), outcome.values[1]
            self.dispatcher.republish(stage, dispatch, new_attempt)
            self.recovered_total += 1
        elif outcome.status == "republish":
            target, new_attempt, dispatch = outcome.values[0].decode(), int(outcome.values[1]), outcome.values[2]
            self.dispatcher.republish(target, dispatch, new_attempt)
            self.recovered_total += 1
        elif outcome.status == "dead":
            log.error("job %s dead-lettered after %d attempts of %s", job_id, attempt, stage)
        else:
            log.info("recovery of %s/%s attempt %d: %s", job_id, stage, attempt, outcome.status)
