"""The worker runtime: a pull loop over one stage's ring.

Lifecycle of a batch of dispatches in a worker (one commit path for every stage):
  1. the session registers with the broker: lease cells in the stage's ring, the ring to hand
     on to, the job store (session.py);
  2. claim up to `max_batch` dispatches, no more than our pool can hold the outputs of (a
     full pool leaves the work queued in the ring), and lease each in a cell (claims.py);
  3. `start` them in Redis, one round trip: Redis answers each one's params; a stale attempt
     or an ended job is dropped here, before any work (commits.py);
  4. for each: pull its inputs from the previous stage's worker (dataplane.py) and run the
     stage while the heartbeat keeps the leases alive. Inputs lost with their producer send
     the job back to that stage (`Rewind`); any other failure `retry`s this stage;
  5. hold the outputs in our pool, then commit the batch, one round trip: `finish` (Redis
     answers the next stage's attempt) or `complete` (the last stage's result, exactly once);
  6. publish the batch's hand-ons into the next ring's lanes in one go (waiting, the leases
     alive, while it is full), tell the previous stage's workers to release our inputs, and
     drop the leases; a lease cell the broker took back (we were presumed dead: our attempt
     was superseded) makes the worker register again for fresh cells.
A worker killed anywhere in 2-6 leaves a claimed slot or a lease that the broker's reaper
recovers; its replacement pulls the same held inputs again.
A running stage stops at its next step (`StageStopped` from `job.progress`, steps.py) when
its job ended or its attempt was superseded, or when its time limit passed (then it is
retried). A run that reaches no step within worker.stop_grace_s past its limit (a hung
kernel) makes the worker exit: the reaper recovers the job, the supervisor a new worker.
SIGTERM drains: the current batch finishes, then the worker unregisters and exits; a second
SIGTERM stops the running stage at its next step (its job is re-queued) first.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
import uuid
from typing import TYPE_CHECKING

import msgspec

from ..common.addresses import endpoint_host, route_to
from ..common.config import Config
from ..common.errors import RemoteError, StagepoolError, StageStopped, TransportError
from ..common.dispatch import Dispatch
from . import base, claims, steps
from .commits import Commits, Ran, handed_on
from .families.params import job_time_limit_s
from .gpu import GpuProbe
from .session import Session

if TYPE_CHECKING:
    from .dataplane import DataPlane

log = logging.getLogger(__name__)

EXIT_HUNG = 70  # the exit status of a worker whose stage would not stop (EX_SOFTWARE)
_FULL_POOL_WAIT_S = 0.05  # between looks at a full pool for room


class Worker:
    def __init__(self, config: Config, stage: str, *, broker_endpoint: str | None = None,
                 transport: str | None = None, worker_id: str | None = None,
                 redis_url: str = ""):
        """`redis_url`: this worker's own job store, over the one the broker offers."""
        self.config = config
        self.stage_config = config.stage(stage)
        worker_id = worker_id or f"{stage}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.stage = base.create(self.stage_config)
        endpoint = broker_endpoint or config.broker.endpoint
        if not config.transfer.host:  # peers reach us on our route to the broker's host
            transfer = msgspec.structs.replace(config.transfer,
                                               host=route_to(endpoint_host(endpoint)))
            config = self.config = msgspec.structs.replace(config, transfer=transfer)
        self.session = Session(config, stage, endpoint, transport or config.worker.transport,
                               worker_id, redis_url)
        self.commits = Commits(config, self.session)
        self.data: DataPlane | None = None
        self._draining = threading.Event()
        self._busy = threading.Event()
        self._run_deadline = 0.0  # monotonic: the time limit of the run in progress (0: none)
        self._turn = 0  # batches claimed: which priority lane goes first (lanes.claim_order)
        self._stop_now = threading.Event()  # a second stop signal: the run stops at its next step

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, lambda *_: self.drain())
        signal.signal(signal.SIGINT, lambda *_: self.drain())

    def drain(self) -> None:
        """Finish the current batch, then stop; asked again, stop the running stage at its
        next step (its job is re-queued) and then stop."""
        if self._draining.is_set():
            self._stop_now.set()
        self._draining.set()

    def run(self) -> None:
        self.stage.load()
        session, settings = self.session, self.config.worker
        session.device = self.stage.device
        session.gpu = GpuProbe.open(self.stage.device)
        if self.stage.uses_tensors:
            # Before registering: a worker is only offered jobs once its pool can hold them.
            # Imported here: the data plane needs torch, which a noop deployment may lack.
            from .dataplane import DataPlane

            self.data = DataPlane(self.config, self.stage_config.name)
            session.on_peers = self.data.exchange.peers_news
            session.session = self.data.exchange.session
        session.attach(self._draining)
        session.start_heartbeat(self._busy, self._chores)
        log.info("worker %s serving %s (ring %s, advertising %s)", session.worker_id,
                 self.stage_config.name, session.transport, self.config.transfer.host)
        try:
            while not self._draining.is_set():
                if session.reattach.is_set():
                    session.attach(self._draining)
                cells = (session.cells if self.data is None
                         else self.data.admit(session.cells, session.store))
                if not cells:  # our pool is full of held outputs: leave the work queued
                    time.sleep(_FULL_POOL_WAIT_S)
                    continue
                try:
                    batch = claims.claim_batch(session.consume_lanes, cells,
                                               session.registered.lease_ms,
                                               settings.claim_wait_s, settings.spin_us / 1e6,
                                               self._turn)
                except (TransportError, RemoteError):
                    log.warning("ring unreachable; attaching again", exc_info=True)
                    session.reattach.set()
                    time.sleep(settings.register_retry_s)
                    continue
                if batch:
                    self._turn += 1
                    self._serve(batch)
        finally:
            session.close()
            if self.data is not None:
                self.data.close(session.store)

    def _chores(self) -> None:
        """On the heartbeat thread: the data plane's upkeep, and the hung-run watchdog."""
        deadline = self._run_deadline
        if deadline and time.monotonic() > deadline + self.config.worker.stop_grace_s:
            # The run ignored its stop (no step reached): only a new process frees the GPU.
            log.error("worker %s: a %s run is past its time limit and did not stop; exiting "
                      "so the reaper recovers its job", self.session.worker_id,
                      self.stage_config.name)
            logging.shutdown()
            os._exit(EXIT_HUNG)
        if self.data is not None:
            self.data.chores(self.session.store)

    def _serve(self, batch: list[claims.Leased]) -> None:
        session = self.session
        session.leased = tuple(cell for cell, _ in batch)
        self._busy.set()
        try:
            self._handle(batch)
        except StagepoolError:
            # Redis or a ring went away mid-batch: the leases are now the jobs' only trace.
            log.warning("could not finish a batch of %d; leaving its leases to the reaper",
                        len(batch), exc_info=True)
            session.renew()
            return
        finally:
            self._busy.clear()
            session.leased = ()
        if not claims.unlease(session.consume, batch) or any(
                session.consume.lost(cell) for cell in session.cells):
            log.warning("worker %s: the broker took back a lease cell (presumed dead); "
                        "registering again", session.worker_id)
            session.renew()

    def _handle(self, batch: list[claims.Leased]) -> None:
        ran: list[Ran] = []
        try:
            started = self.commits.start([dispatch for _, dispatch in batch])
            for (cell, dispatch), params_json in zip(batch, started):
                if params_json is None:  # not started: stale, duplicate or ended
                    continue
                done = self._run(dispatch, params_json, cell)
                if done is not None:
                    ran.append(done)
            self._commit(ran)
        finally:
            for done in ran:
                if done.pull is not None:
                    done.pull.close()

    def _attempt(self, dispatch: Dispatch, started: float, outcome: str,
                 level: int = logging.INFO, exc_info: bool = False) -> None:
        """The one log line of each stage attempt: job, stage, attempt, worker, time, outcome."""
        fields = {"job": dispatch.job_id, "stage": self.stage_config.name,
                  "attempt": dispatch.attempt, "worker": self.session.worker_id,
                  "ran_ms": round((time.monotonic() - started) * 1e3), "outcome": outcome}
        log.log(level, "attempt " + " ".join(f"{k}={v}" for k, v in fields.items()),
                exc_info=exc_info, extra=fields)  # keys of their own in --log-format json

    def _run(self, dispatch: Dispatch, params_json: bytes, cell: int) -> Ran | None:
        """Pull the inputs and run the stage; None when the attempt ended here."""
        started = time.monotonic()
        pull = None
        if dispatch.tensors:
            pull, failure = self.data.pull(dispatch)
            if failure is not None:
                why = f"{failure.kind}: {failure.message}"
                if failure.upstream:
                    status = self.session.rewind(dispatch, why,
                                                 self.data.exchange.dead_peer(dispatch.endpoint))
                    self._attempt(dispatch, started, f"rewound ({status}): {why}")
                else:
                    self._attempt(dispatch, started, f"retried: {why}")
                    self._retry(dispatch, why)
                return None
        params = msgspec.json.decode(params_json)
        limit_s = job_time_limit_s(params, self.stage_config.time_limit_s)
        self._run_deadline = time.monotonic() + limit_s
        job = base.JobContext(job_id=dispatch.job_id, attempt=dispatch.attempt, params=params,
                              inputs=pull.tensors if pull else {},
                              read_input=self.session.blobs().get,
                              progress=steps.reporter(
                                  self.commits, self.session.consume, cell, dispatch,
                                  self._run_deadline, limit_s, self._stop_now))
        try:
            output = self.stage.run(job)
        except Exception as exc:
            if pull is not None:
                pull.close()
            if isinstance(exc, StageStopped):
                self._attempt(dispatch, started, f"stopped: {exc}")
                if exc.retry:
                    self._retry(dispatch, str(exc))
            else:
                permanent = isinstance(exc, base.PERMANENT_ERRORS)
                self._attempt(dispatch, started,
                              f"{'failed' if permanent else 'retried'}: {type(exc).__name__}",
                              logging.WARNING, exc_info=True)
                self._retry(dispatch, f"{type(exc).__name__}: {exc}", permanent=permanent)
            return None
        finally:
            self._run_deadline = 0.0
        return Ran(dispatch, output, pull, ran_s=time.monotonic() - started)

    def _commit(self, ran: list[Ran]) -> None:
        """Hold the outputs, commit the batch in one round trip, then hand on."""
        store, next_stage = self.session.store, self.commits.next_stage
        ready = []
        for done in ran:
            d = done.dispatch
            if next_stage:
                done.hand_on = Dispatch(d.job_id, 0, next_stage, d.priority, d.deadline_ms)
                if done.output.tensors:
                    try:
                        descs = self.data.hold(d.job_id, done.output.tensors, store)
                    except StagepoolError as exc:
                        self._attempt(d, time.monotonic() - done.ran_s,
                                      f"retried: cannot hold outputs: {exc}")
                        self._retry(d, f"cannot hold outputs: {exc}")
                        continue
                    done.held = True
                    done.hand_on = msgspec.structs.replace(
                        done.hand_on, endpoint=self.data.endpoint, tensors=descs)
            ready.append(done)
        hand_ons, committed = [], []
        for done, outcome in self.commits.commit(ready):
            ran_from = time.monotonic() - done.ran_s  # the line gives the run's time
            if not outcome.ok:
                self._attempt(done.dispatch, ran_from, f"not committed: {outcome.status}")
                if done.held:
                    self.data.release(done.dispatch.job_id)
                continue
            self.session.jobs_done += 1
            hand_on = handed_on(done, outcome)
            if hand_on is not None:
                hand_ons.append(hand_on)
            committed.append((done, ran_from))
        self.commits.publish(self.session.produce_lanes, hand_ons)  # first: the next stage waits
        for done, ran_from in committed:
            self._attempt(done.dispatch, ran_from, "committed")
            if done.pull is not None:  # our stage is committed: the producer may let go
                self.data.release_upstream(done.dispatch)

    def _retry(self, dispatch: Dispatch, error: str, permanent: bool = False) -> None:
        again = self.commits.retry(dispatch, error, permanent)
        if again is not None:
            self.commits.publish(self.session.consume_lanes, [again])
