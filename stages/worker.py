"""The worker runtime: a pull loop over one stage's ring.

Lifecycle of a dispatch in a worker:
  1. register with the broker (ZMQ): get a lease cell, the ring to consume, the ring to
     hand on to, and Redis coordinates;
  2. claim a slot (spin briefly, then sleep on the ring's futex / remote wait), and up to
     `max_batch - 1` more that are already waiting;
  3. lease each (one of our cells: job, attempt, ticket), then release its slot; if the
     broker reclaimed the slot first, drop it: it has been published again;
  4. `start` in Redis, the whole batch in one round trip: refused for a stale or duplicate
     attempt or a terminal job -> drop;
  5. pull the inputs the previous stage holds (common/transfer): inputs lost with their
     producer (or failing their checksum) send the job back to that stage through the broker
     (`Rewind`); a transfer error retries this stage. Then run the stage while a heartbeat
     thread refreshes the lease and pings the broker;
  6. commit (the batch in one round trip): `complete` (last stage, exactly once) or hold the
     outputs in our pool, `finish` + publish the next stage's dispatch into its ring
     (retrying while it is full, the lease still alive); on an exception, `retry` (error
     mode) and publish the new attempt, or the job fails; once committed, tell the previous
     stage's worker to release our inputs;
  7. drop the leases. A worker killed anywhere in 3-6 leaves a lease or a claimed slot that
     the broker's reaper recovers; its replacement pulls the same held inputs again.
A `cheap` stage (base.Stage.cheap) whose dispatches carry their params skips 4: it runs
first, and 6 records start and commit at once (`pass`): one round trip per batch. A first-stage
dispatch the broker published before its submit landed (`Dispatch.submit`) carries that
submit, applied (idempotent) in the same round trip, before the start.
Held outputs whose release notice was lost are swept by the heartbeat thread once Redis says
no consumer needs them (the job ended, or the next stage committed).
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
from ..common.transfer import Exchange, Failure, FailureKind, PoolFull, PullStatus
from ..common.wire import Dispatch, decode_dispatch, encode_dispatch
from . import base
from .commits import FIRST_ATTEMPT, Ran, Transitions, early_record, fitted

log = logging.getLogger(__name__)

_REGISTER_RETRY_S = 0.5
TERMINAL_STATES = frozenset({"succeeded", "failed", "cancelled", "dead"})
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
        self._transitions = Transitions(config.pipeline.name, self.stage_config,
                                        self.stage_index)
        self.jobs_done = 0
        self._draining = threading.Event()
        self._stopped = threading.Event()
        self._reattach = threading.Event()
        self._busy = threading.Event()
        self._leased: tuple[int, ...] = ()  # our cells holding a lease (the heartbeat beats them)
        self._registered: wire.Registered | None = None
        self._consume: Ring | None = None
        self._produce: Ring | None = None
        self._store: JobStore | None = None
        self._heartbeat: threading.Thread | None = None
        self._exchange: Exchange | None = None

    # -- lifecycle -----------------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, lambda *_: self.drain())
        signal.signal(signal.SIGINT, lambda *_: self.drain())

    def drain(self) -> None:
        """Finish the current job, then stop."""
        self._draining.set()

    def run(self) -> None:
        self.stage.load()
        if self.stage.uses_tensors:
            # Before registering: a worker is only offered jobs once its pool can hold them.
            self._open_exchange()
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
                    claims = [claim]
                    while len(claims) < self.stage_config.max_batch:
                        more = self._consume.try_claim()
                        if more is None:
                            break
                        claims.append(more)
                    self._take(claims)
        finally:
            self._stopped.set()
            self._detach(unregister=True)
            if self._exchange is not None:
                self._flush_transfer_counts()
                self._exchange.close()

    # -- one dispatch --------------------------------------------------------------------

    def _take(self, claims: list) -> None:
        ring, cells = self._consume, self._registered.cells or [self._registered.cell]
        batch: list[tuple[int, Dispatch]] = []
        for cell, claim in zip(cells, claims):
            try:
                dispatch = decode_dispatch(claim.payload)
            except StagepoolError as exc:
                log.error("dropped an undecodable ring record at %d: %s", claim.ticket, exc)
                ring.release(claim)
                continue
            ring.lease(cell, claim.ticket, dispatch.attempt, dispatch.job_id,
                       self._registered.lease_ms)
            if not ring.release(claim):
                log.info("slot %d was reclaimed by the broker; dropping", claim.ticket)
                ring.unlease(cell)
                continue
            batch.append((cell, dispatch))
        if not batch:
            return
        self._leased = tuple(cell for cell, _ in batch)
        self._busy.set()
        try:
            self._handle([dispatch for _, dispatch in batch])
        except StagepoolError:
            # Redis or a ring went away mid-batch. The leases are now the jobs' only trace, so
            # we leave them to expire (the reaper recovers them) and take a fresh identity and
            # cells rather than overwrite them with our next leases.
            log.warning("could not finish a batch of %d; leaving its leases to the reaper",
                        len(batch), exc_info=True)
            self.worker_id = f"{self.worker_id.rsplit('-', 1)[0]}-{uuid.uuid4().hex[:6]}"
            self._reattach.set()
            return
        finally:
            self._busy.clear()
            self._leased = ()
        for cell, _ in batch:
            ring.unlease(cell)

    def _handle(self, dispatches: list[Dispatch]) -> None:
        store = self._store
        ran: list[Ran] = []
        if self.stage.cheap and all(d.params is not None and not d.tensors for d in dispatches):
            for dispatch in dispatches:
                done = self._run(dispatch, dispatch.params, ahead=True)
                if done is not None:
                    ran.append(done)
        else:
            prefix = [t for d in dispatches for t in self._transitions.prefix(d)]
            outcomes = store.run_batch(prefix + [
                self._transitions.start(d, self.worker_id) for d in dispatches])[len(prefix):]
            for dispatch, started in zip(dispatches, outcomes):
                if not started.ok:
                    log.debug("job %s attempt %d not started: %s", dispatch.job_id,
                              dispatch.attempt, started.status)
                    continue
                done = self._run(dispatch, started.values[0], ahead=False)
                if done is not None:
                    ran.append(done)
        try:
            self._commit(ran)
        finally:
            for done in ran:
                if done.pull is not None:
                    done.pull.close()

    def _run(self, dispatch: Dispatch, params_json: bytes, ahead: bool) -> Ran | None:
        """Pull the inputs and run the stage; None when the attempt ended here (failed)."""
        pull = self._pull(dispatch) if dispatch.tensors else None
        if pull is not None and pull.failure is not None:
            return None
        job = base.JobContext(job_id=dispatch.job_id, attempt=dispatch.attempt,
                              params=msgspec.json.decode(params_json),
                              inputs=pull.tensors if pull else {},
                              progress=self._progress_reporter(dispatch))
        started = time.perf_counter()
        try:
            output = self.stage.run(job)
        except Exception as exc:
            log.warning("job %s failed in %s (attempt %d)", dispatch.job_id,
                        self.stage_config.name, dispatch.attempt, exc_info=True)
            if pull is not None:
                pull.close()
            self._fail(dispatch, f"{type(exc).__name__}: {exc}", ahead)
            return None
        ran_ms = int((time.perf_counter() - started) * 1000)
        return Ran(dispatch, params_json, output, pull, ran_ms, ahead)

    def _fail(self, dispatch: Dispatch, error: str, ahead: bool) -> None:
        if ahead:  # its start is not recorded yet, and retry is fenced on it
            started = self._store.run_batch(self._transitions.prefix(dispatch) + [
                self._transitions.start(dispatch, self.worker_id)])[-1]
            if not started.ok:
                return
        self._retry(dispatch, error)

    def _commit(self, ran: list[Ran]) -> None:
        """`complete` (last stage) or hold the outputs, `finish` and hand on: one round trip."""
        store, stage = self._store, self.stage_config
        next_name = self._registered.next_stage
        ready, transitions = [], []
        for done in ran:
            d = done.dispatch
            if next_name:
                hand_on = Dispatch(d.job_id, 1, next_name, d.priority, d.deadline_ms,
                                   params=done.params_json)
                if done.output.tensors:
                    key = f"{d.job_id}/{stage.name}"
                    try:
                        descs = self._hold(key, done.output.tensors)
                    except StagepoolError as exc:
                        self._fail(d, f"cannot hold outputs: {exc}", done.ahead)
                        continue
                    done.held_key = key
                    hand_on = msgspec.structs.replace(hand_on, endpoint=self._exchange.endpoint,
                                                      tensors=descs)
                done.hand_on, payload = fitted(hand_on, self._produce.layout.payload_max)
            else:
                payload = msgspec.json.encode(done.output.result)
            transitions.append(self._transitions.commit(done, self.worker_id, next_name,
                                                        payload))
            ready.append(done)
        prefix = [t for done in ready if done.ahead
                  for t in self._transitions.prefix(done.dispatch)]
        if (len(ready) == 1 and ready[0].ahead and ready[0].hand_on is not None
                and not self._consume.depth()):
            # A lone job (low load): hand on first, the commit riding along. When jobs are
            # queued (a batch, or more waiting) committing first costs Redis less.
            self._hand_on_early(ready[0], transitions[0])
        outcomes = store.run_batch(prefix + transitions)[len(prefix):]
        for done, outcome in zip(ready, outcomes):
            if not outcome.ok:
                if done.early and outcome.status == "duplicate":
                    # The next stage committed ours (carried) first: make sure it runs.
                    self._recover_hand_on(done.dispatch)
                    continue
                log.debug("job %s attempt %d not committed: %s", done.dispatch.job_id,
                          done.dispatch.attempt, outcome.status)
                if done.held_key:
                    self._exchange.release(done.held_key)
                continue
            attempt = int(outcome.values[0]) if done.hand_on is not None else 0
            if done.hand_on is not None and not (done.early and attempt == FIRST_ATTEMPT):
                hand_on = msgspec.structs.replace(done.hand_on, attempt=attempt)
                self._publish(self._produce, encode_dispatch(hand_on))
            self.jobs_done += 1
            if done.pull is not None:
                # Our stage is committed: the producer may let go of our inputs.
                self._exchange.notify_release(done.dispatch.endpoint,
                                              self._input_key(done.dispatch.job_id))

    def _hand_on_early(self, done: Ran, transition: tuple) -> None:
        """Publish a cheap stage's hand-on before its commit lands, carrying that commit (and
        whatever its own record carried), when it all fits the slot."""
        payload = early_record(done.hand_on,
                               self._transitions.prefix(done.dispatch) + [transition],
                               self._produce.layout.payload_max)
        if payload is not None:
            self._publish(self._produce, payload)
            done.early = True

    def _recover_hand_on(self, dispatch: Dispatch) -> None:
        """Our stage is committed but we cannot tell the next stage's attempt: republish it
        from Redis unless the next stage has started (what the reaper does for a crash)."""
        outcome = self._store.retry(dispatch.job_id, self.stage_config.name, dispatch.attempt,
                                    self.worker_id, "", self._registered.max_attempts,
                                    crash=True, next_stage=self._registered.next_stage)
        if outcome.status == "republish":
            hand_on = decode_dispatch(outcome.values[2])
            self._publish(self._produce, encode_dispatch(
                msgspec.structs.replace(hand_on, attempt=int(outcome.values[1]))))

    # -- the data plane ------------------------------------------------------------------

    def _input_key(self, job_id: str) -> str:
        return f"{job_id}/{self.config.pipeline.stages[self.stage_index - 1].name}"

    def _pull(self, dispatch: Dispatch):
        """Pull the inputs; on failure send the job where it can go on, and return the pull."""
        started = time.perf_counter()
        pull = self._open_exchange().pull(dispatch.endpoint, dispatch.tensors)
        status = pull.wait(self.config.transfer.pull_timeout_s)
        if status is PullStatus.DONE:
            self._exchange.count("pull", pull.backend, pull.nbytes,
                                 time.perf_counter() - started)
            return pull
        failure = pull.failure or Failure(FailureKind.TRANSFER, "pull timed out")
        pull.close()
        pull.failure = failure
        log.warning("job %s: pulling inputs failed: %s: %s", dispatch.job_id, failure.kind,
                    failure.message)
        if failure.upstream:
            self._rewind(dispatch, f"{failure.kind}: {failure.message}")
        else:
            self._retry(dispatch, f"{failure.kind}: {failure.message}")
        return pull

    def _rewind(self, dispatch: Dispatch, error: str) -> None:
        with BrokerClient(self.endpoint, timeout_s=10, name=self.worker_id) as client:
            result = client.call(wire.Rewind(job_id=dispatch.job_id, stage=dispatch.stage,
                                             attempt=dispatch.attempt,
                                             worker_id=self.worker_id, error=error))
        log.info("job %s: sent back to the previous stage: %s", dispatch.job_id, result.status)

    def _hold(self, key: str, tensors: dict) -> list:
        """Put outputs in the pool; while it is full, sweep old holds and wait a little."""
        self._open_exchange()
        deadline = time.monotonic() + self.config.transfer.put_wait_s
        while True:
            try:
                return self._exchange.put(key, tensors)
            except PoolFull:
                if time.monotonic() >= deadline:
                    raise
                self._sweep_holds(older_than_s=0.0)
                time.sleep(0.05)

    def _open_exchange(self) -> Exchange:
        """This worker's exchange, opened on first use (stages with tensors open it at start)."""
        if self._exchange is None:
            self._exchange = Exchange(self.config.transfer)
        return self._exchange

    def _sweep_holds(self, older_than_s: float) -> int:
        """Release held outputs that no consumer can need: a lost release notice's leftovers.

        A hold is needed while its job is live and the next stage has not committed.
        """
        exchange, store = self._exchange, self._store
        if exchange is None or store is None or self._registered is None:
            return 0
        next_name = self._registered.next_stage
        released = 0
        for key in exchange.held(older_than_s):
            job_id, _, _ = key.rpartition("/")
            record = store.get(job_id)
            if (record is None or record.get("state") in TERMINAL_STATES
                    or f"{next_name}.done" in record):
                released += exchange.release(key)
        return released

    def _progress_reporter(self, dispatch: Dispatch):
        def report(step: int, steps: int) -> None:
            try:
                self._store.progress(dispatch.job_id, dispatch.stage, dispatch.attempt, step,
                                     steps)
            except StagepoolError:
                log.debug("progress not recorded", exc_info=True)

        return report

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
                        transport="shm" if self.transport == "auto" else self.transport,
                        cells=self.stage_config.max_batch))
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

    def _flush_transfer_counts(self) -> None:
        counts = self._exchange.take_counts()
        if counts and self._store is not None:
            try:
                self._store.add_transfer(self.stage_config.name, counts)
            except StagepoolError:
                log.warning("could not record transfer counters", exc_info=True)

    def _heartbeat_loop(self) -> None:
        """Refresh the lease while busy; ping the broker; notice a restarted broker."""
        client = None
        next_ping = 0.0
        next_sweep = time.monotonic() + self.config.transfer.hold_check_s
        while not self._stopped.is_set():
            registered = self._registered
            period_s = min(registered.heartbeat_ms, registered.lease_ms / 3) / 1000
            ring = self._consume
            if self._busy.is_set() and ring is not None:
                try:
                    for cell in self._leased:
                        ring.beat(cell)
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
                if self._exchange is not None:
                    self._flush_transfer_counts()
            if self._exchange is not None and now >= next_sweep:
                next_sweep = now + self.config.transfer.hold_check_s
                try:
                    self._sweep_holds(self.config.transfer.hold_check_s)
                except StagepoolError:
                    log.warning("sweeping held outputs failed", exc_info=True)
            self._stopped.wait(period_s)
        if client is not None:
            client.close()
