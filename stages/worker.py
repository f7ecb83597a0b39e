"""The worker runtime: a pull loop over one stage's ring.

Lifecycle of a dispatch in a worker:
  1. register with the broker (ZMQ): get a lease cell, the ring to consume, the ring to
     hand on to, and Redis coordinates;
  2. claim a slot (spin briefly, then sleep on the ring's futex / remote wait);
  3. lease it (our cell: job, attempt, ticket), then release the slot; if the broker
     reclaimed the slot first, drop it: it has been published again;
  4. `start` in Redis: refused for a stale or duplicate attempt or a terminal job -> drop;
  5. run the stage while a heartbeat thread refreshes the lease and pings the broker;
  6. commit: `complete` (last stage, exactly once) or `finish` + publish the next stage's
     dispatch into its ring (retrying while it is full, the lease still alive);
     on an exception, `retry` (error mode) and publish the new attempt, or the job fails;
  7. drop the lease. A worker killed anywhere in 3-6 leaves a lease or a claimed slot that
     the broker's reaper recovers.
SIGTERM drains: the current job finishes, then the worker unregisters and exits.
A changed broker id (broker restarted) makes the worker register and attach again.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
import uuid

import msgspec

from ..common import wire
from ..common.client import BrokerClient
from ..common.config import Config
from ..common.errors import RemoteError, StagepoolError, TransportError
from ..common.jobstore import JobStore
from ..common.ring import Ring, open_memory
from ..common.wire import Dispatch, decode_dispatch, encode_dispatch
from . import base

log = logging.getLogger(__name__)

_REGISTER_RETRY_S = 0.5
_HANDOFF_TIMEOUT_S = 1.0


class Worker:
    def __init__(self, config: Config, stage: str, *, broker_endpoint: str | None = None,
                 transport: str | None = None, worker_id: str | None = None):
        self.config = config
        self.stage_config = config.stage(stage)
        self.stage_index = [s.name for s in config.pipeline.stages].index(stage)
        self.endpoint = broker_endpoint or config.broker.endpoint
        self.transport = transport or config.worker.transport
        self.worker_id = worker_id or f"{stage}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.stage = base.create(self.stage_config)
        self.jobs_done = 0
        self._draining = threading.Event()
        self._stopped = threading.Event()
        self._reattach = threading.Event()
        self._busy = threading.Event()
        self._registered: wire.Registered | None = None
        self._consume: Ring | None = None
        self._produce: Ring | None = None
        self._store: JobStore | None = None
        self._heartbeat: threading.Thread | None = None

    # -- lifecycle -----------------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, lambda *_: self.drain())
        signal.signal(signal.SIGINT, lambda *_: self.drain())

    def drain(self) -> None:
        """Finish the current job, then stop."""
        self._draining.set()

    def run(self) -> None:
        self.stage.load()
        self._attach()
        self._heartbeat = threading.Thread(target=self._heartbeat_loop, name="heartbeat",
                                           daemon=True)
        self._heartbeat.start()
        log.info("worker %s serving %s (%s)", self.worker_id, self.stage_config.name,
                 self.transport)
        spin_s = self.config.worker.spin_us / 1e6
        wait_s = self.config.worker.claim_wait_s
        try:
            while not self._draining.is_set():
                if self._reattach.is_set():
                    self._attach()
                try:
                    claim = self._consume.claim(wait_s, spin_s)
                except (TransportError, RemoteError):
                    log.warning("ring unreachable; attaching again", exc_info=True)
                    self._reattach.set()
                    time.sleep(_REGISTER_RETRY_S)
                    continue
                if claim is not None:
                    self._take(claim)
        finally:
            self._stopped.set()
            self._detach(unregister=True)

    # -- one dispatch --------------------------------------------------------------------

    def _take(self, claim) -> None:
        ring, cell = self._consume, self._registered.cell
        try:
            dispatch = decode_dispatch(claim.payload)
        except StagepoolError as exc:
            log.error("dropped an undecodable ring record at %d: %s", claim.ticket, exc)
            ring.release(claim)
            return
        ring.lease(cell, claim.ticket, dispatch.attempt, dispatch.job_id,
                   self._registered.lease_ms)
        try:
            if not ring.release(claim):
                log.info("slot %d was reclaimed by the broker; dropping", claim.ticket)
                return
            self._busy.set()
            self._handle(dispatch)
        except StagepoolError:
            # Redis or a ring went away mid-job. The lease is now the job's only trace, so we
            # leave it to expire (the reaper recovers it) and take a fresh identity and cell
            # rather than overwrite it with our next lease.
            log.warning("job %s: could not finish the attempt; leaving its lease to the reaper",
                        dispatch.job_id, exc_info=True)
            self.worker_id = f"{self.worker_id.rsplit('-', 1)[0]}-{uuid.uuid4().hex[:6]}"
            self._reattach.set()
            return
        finally:
            self._busy.clear()
        ring.unlease(cell)

    def _handle(self, dispatch: Dispatch) -> None:
        store, stage = self._store, self.stage_config
        job_id, attempt = dispatch.job_id, dispatch.attempt
        started = store.start(job_id, stage.name, attempt, self.worker_id, stage.job_state(),
                              self.stage_index)
        if not started.ok:
            log.debug("job %s attempt %d not started: %s", job_id, attempt, started.status)
            return
        params = msgspec.json.decode(started.values[0])
        job = base.JobContext(job_id=job_id, attempt=attempt, params=params)
        try:
            output = self.stage.run(job)
        except Exception as exc:
            log.warning("job %s failed in %s (attempt %d)", job_id, stage.name, attempt,
                        exc_info=True)
            self._retry(dispatch, f"{type(exc).__name__}: {exc}")
            return
        next_name = self._registered.next_stage
        if not next_name:
            outcome = store.complete(job_id, stage.name, attempt, self.worker_id, output.result)
            if outcome.ok:
                self.jobs_done += 1
            return
        hand_on = encode_dispatch(Dispatch(job_id, 1, next_name, dispatch.priority,
                                           dispatch.deadline_ms))
        outcome = store.finish(job_id, stage.name, attempt, self.worker_id, next_name, hand_on)
        if outcome.ok:
            self._publish(self._produce, hand_on)
            self.jobs_done += 1

    def _retry(self, dispatch: Dispatch, error: str) -> None:
        outcome = self._store.retry(dispatch.job_id, self.stage_config.name, dispatch.attempt,
                                    self.worker_id, error, self._registered.max_attempts,
                                    crash=False)
        if outcome.status == "retry":
            again = msgspec.structs.replace(dispatch, attempt=int(outcome.values[0]))
            self._publish(self._consume, encode_dispatch(again))

    def _publish(self, ring: Ring, payload: bytes) -> None:
        # The lease stays alive while we wait for room: nothing is lost if we die here.
        while True:
            try:
                ring.produce(payload, _HANDOFF_TIMEOUT_S)
                return
            except StagepoolError as exc:
                if self._reattach.is_set():
                    # The broker restarted: it rebuilt this hand-on from Redis already.
                    log.info("broker changed during hand-on; the rebuild covers it")
                    return
                log.warning("hand-on waiting: %s", exc)

    # -- broker connection ---------------------------------------------------------------

    def _attach(self) -> None:
        """Register (retrying until the broker answers) and open the rings it names."""
        self._detach(unregister=False)
        while True:
            try:
                with BrokerClient(self.endpoint, timeout_s=5, name=self.worker_id) as client:
                    registered = client.call(wire.Register(
                        worker_id=self.worker_id, stage=self.stage_config.name,
                        host=socket.gethostname(), pid=os.getpid(),
                        transport="shm" if self.transport == "auto" else self.transport))
                    self._consume = Ring.attach(self._open(registered.consume, client))
                    self._produce = (Ring.attach(self._open(registered.produce, client))
                                     if registered.produce else None)
                break
            except (StagepoolError, OSError) as exc:
                if self._draining.is_set():
                    raise
                log.warning("registering with %s: %s; retrying", self.endpoint, exc)
                time.sleep(_REGISTER_RETRY_S)
        self._registered = registered
        if self._store is None or self._store.url != registered.redis_url:
            self._store = JobStore(registered.redis_url, registered.namespace,
                                   events_maxlen=self.config.redis.events_maxlen)
        self._reattach.clear()

    def _open(self, attach: wire.RingAttach, client: BrokerClient):
        def verbs_connect(ring: str, qp: dict) -> dict:
            return client.call(wire.VerbsConnect(worker_id=self.worker_id, stage=ring, qp=qp)).qp

        return open_memory(attach, self.transport, verbs_connect=verbs_connect)

    def _detach(self, unregister: bool) -> None:
        if unregister and self._registered is not None:
            try:
                with BrokerClient(self.endpoint, timeout_s=2) as client:
                    client.call(wire.Unregister(worker_id=self.worker_id))
            except StagepoolError:
                pass  # the broker forgets us after worker_timeout_ms anyway
        for ring in (self._consume, self._produce):
            if ring is not None:
                ring.mem.close()
        self._consume = self._produce = None

    def _heartbeat_loop(self) -> None:
        """Refresh the lease while busy; ping the broker; notice a restarted broker."""
        client = None
        next_ping = 0.0
        while not self._stopped.is_set():
            registered = self._registered
            period_s = min(registered.heartbeat_ms, registered.lease_ms / 3) / 1000
            ring = self._consume
            if self._busy.is_set() and ring is not None:
                try:
                    ring.beat(registered.cell)
                except StagepoolError:
                    log.warning("lease refresh failed", exc_info=True)
            now = time.monotonic()
            if now >= next_ping and not self._reattach.is_set():
                next_ping = now + registered.heartbeat_ms / 1000
                try:
                    client = client or BrokerClient(self.endpoint, timeout_s=2,
                                                    name=self.worker_id)
                    ack = client.call(wire.Heartbeat(worker_id=self.worker_id,
                                                     busy=self._busy.is_set(),
                                                     jobs_done=self.jobs_done))
                    if ack.broker_id != registered.broker_id:
                        self._reattach.set()
                except RemoteError:
                    self._reattach.set()  # unknown worker: the broker restarted
                except StagepoolError:
                    if client is not None:
                        client.close()
                    client = None
            self._stopped.wait(period_s)
        if client is not None:
            client.close()
