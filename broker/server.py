"""The broker: one process per deployment that owns the rings and answers the control socket.

Lifecycle of a job through the broker:
  1. a `Submit` arrives on the ZMQ ROUTER (or an entry on the Redis ingress stream);
  2. jobs.lua `submit` writes the record (idempotent on job id; a burst of submits in one
     round trip), then the first stage's `Dispatch` is published into its ring (or queued in
     the Dispatcher while the ring is full), and the client hears the job is accepted;
  3. workers take it from there: they claim, lease, run, commit to Redis and publish the
     hand-on into the next ring themselves: the broker is not on the per-stage hot path;
  4. the Reaper re-publishes work whose lease expired or whose slot was never released.
On start the broker makes fresh rings and rebuilds them from Redis: every non-terminal job's
current stage is published again with a new attempt, which also fences off any worker still
running an attempt from before the restart.

Threads: this one (control socket), the ingress reader, the reaper, and the ring servers.
Each owns its sockets; they share only the JobStore (thread-safe) and the rings (atomics).
"""

from __future__ import annotations

import logging
import signal
import threading
import time
import uuid
from typing import Any

import zmq

from ..common import transitions as tx
from ..common.addresses import endpoint_host, is_local
from ..common import wire
from ..common.config import Config
from ..common.dispatch import Dispatch, encode_dispatch
from ..common.frames import Codec, looks_json, salvage_rid
from ..common.errors import Busy, Code, ProtocolError, StagepoolError
from ..common.jobstore import JobStore
from ..common.security import Keys, require, serve_curve
from ..common.ring import lanes
from ..common.wire import (
    Cancel, Error, GetQueues, GetStatus, GetWorkers, Heartbeat, HeartbeatAck,
    Hello, ListJobs, Purge, QueueInfo, Queues, Register, Registered, Retry, Submit, Submitted,
    Unregister,
    Rewind, RewindResult, VerbsAccept, VerbsConnect, Welcome, Ack,
)
from .dispatcher import Dispatcher
from .ingress import Ingress
from .jobs import JobDesk
from .reaper import Reaper
from .registry import DeadPeers, Registry
from .ringhost import RingHost

log = logging.getLogger(__name__)

_POLL_MS = 100
_MAX_GREETED = 100_000  # identities remembered as having said Hello


class Broker:
    def __init__(self, config: Config):
        self.config = config
        self.broker_id = uuid.uuid4().hex[:12]
        self.schema = wire.schema_hash()
        self.keys = Keys.from_config(config)
        require("broker.endpoint", config.broker.endpoint, self.keys, config.security.insecure)
        self.store = JobStore.from_config(config)
        self.redis_url = self.store.url
        self.ringhost = RingHost(config, self.broker_id, self.keys)
        self.dispatcher = Dispatcher(self.ringhost.lanes)
        self.reaper = Reaper(config, self.ringhost.lanes, self.store, self.dispatcher)
        self.reaper.on_redis_restart = self.rebuild
        self.ingress = Ingress(self.store, self.submit, consumer="broker")
        self.registry = Registry(config, self.ringhost, self.store)
        self.jobs = JobDesk(config, self.store, self.ringhost, self.dispatcher)
        self._greeted: dict[bytes, float] = {}
        self.peers = DeadPeers(config.transfer.dead_peer_s)
        self._codec = Codec(wire.Request)
        self._stop = threading.Event()
        self._ctx = zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self._sock.setsockopt(zmq.MAXMSGSIZE, 16 * wire.MAX_FRAME_BYTES)
        serve_curve(self._sock, self.keys)
        self._sock.bind(config.broker.endpoint)
        self.endpoint = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._stage_names = [s.name for s in config.pipeline.stages]

    # -- lifecycle -------------------------------------------------------------------------

    def serve(self) -> None:
        """Rebuild from Redis, start the threads, answer the control socket until `stop`."""
        rebuilt = self.rebuild()
        log.info("broker %s on %s: rebuilt %d jobs; rings: %s", self.broker_id, self.endpoint,
                 rebuilt, ", ".join(self._stage_names))
        self.reaper.start()
        self.ingress.start()
        try:
            while not self._stop.is_set():
                if self._sock.poll(_POLL_MS):
                    batch = []
                    for _ in range(1000):
                        try:
                            batch.append(self._sock.recv_multipart(zmq.NOBLOCK))
                        except zmq.Again:
                            break
                    try:
                        self._on_batch(batch)
                    except Exception:  # a bug; each message was answered or logged already
                        log.exception("control: a burst of %d messages broke the loop; "
                                      "serving on", len(batch))
                self.registry.expire(time.monotonic())
        finally:
            self.close()

    def stop(self, *_: Any) -> None:
        self._stop.set()

    def close(self) -> None:
        self.ingress.stop()
        self.reaper.stop()
        self._sock.close(linger=0)
        self.ringhost.close()
        self.store.close()

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)

    def rebuild(self) -> int:
        """Publish every non-terminal job's current stage again, with a fresh attempt: at
        start (fresh rings), and when Redis restarted (its records may be a second behind the
        rings; the older attempts still in them are refused at their start)."""
        count = 0
        for job_id in list(self.store.active_ids()):
            outcome = self.store.apply(tx.Rebuild(job_id, self._stage_names))
            if outcome.status != "retry":
                continue
            attempt, dispatch, stage = outcome.values
            self.dispatcher.republish(stage.decode(), dispatch, int(attempt))
            count += 1
        return count

    # -- the submit path (control socket and ingress) -----------------------------------------

    def submit(self, request: Submit) -> Submitted:
        answer = self.submit_batch([request])[0]
        if isinstance(answer, StagepoolError):
            raise answer
        return answer

    def submit_batch(self, requests: list[Submit]) -> list[Submitted | StagepoolError]:
        """Submits written to Redis in one round trip, then the created ones published, each
        into its priority's lane of the first stage. A request that is refused (bad, or busy:
        no room in its lane nor in the overflow) gets its error in its place; the others go on. A job is published only once durable, so a submit is acknowledged
        only once durable, and a worker never starts a job Redis does not know."""
        answers: list[Submitted | StagepoolError | None] = []
        submits: list[tx.Submit] = []
        first, broker = self._stage_names[0], self.config.broker
        lane_room = [r.layout.capacity - r.depth() for r in self.ringhost.lanes[first]]
        backlog_room = broker.max_backlog - self.dispatcher.backlog(first)
        for request in requests:
            try:
                submit = self._prepare(request)
                lane = lanes.lane_of(submit.priority)
                if lane_room[lane] > 0:
                    lane_room[lane] -= 1
                elif backlog_room > 0:
                    backlog_room -= 1
                else:
                    raise Busy(f"busy: {broker.max_backlog} jobs already wait for room in the "
                               f"{first} ring; submit again later", broker.busy_retry_after_s)
                submits.append(submit)
                answers.append(None)
            except StagepoolError as exc:
                answers.append(exc)
        outcomes = iter(zip(submits, self.store.run(submits)))
        for index, answer in enumerate(answers):
            if answer is None:
                submit, outcome = next(outcomes)
                if outcome.ok:
                    self.dispatcher.publish(submit.first_stage, submit.dispatch,
                                            submit.priority)
                answers[index] = Submitted(job_id=submit.job_id, created=outcome.ok)
        return answers

    def _prepare(self, request: Submit) -> tx.Submit:
        name, params = self.config.pipeline.name, request.params
        if request.pipeline and request.pipeline != name:
            raise ProtocolError(f"unknown pipeline {request.pipeline!r}; this broker runs "
                                f"{name!r}")
        job_id = (wire.check_job_id(request.job_id) if request.job_id is not None
                  else uuid.uuid4().hex)
        first = self._stage_names[0]
        params_json = wire.check_params(params)
        self.jobs.admit(params)
        priority = wire.check_priority(request.priority)
        deadline_ms = wire.check_deadline(request.deadline_ms)
        dispatch = encode_dispatch(Dispatch(job_id, 1, first, priority, deadline_ms))
        return tx.Submit(job_id, name, params_json, first, dispatch, priority, deadline_ms)

    # -- control socket ----------------------------------------------------------------------

    def _on_batch(self, batch: list[list[bytes]]) -> None:
        """Answer a burst of messages; consecutive submits share one Redis round trip."""
        submits: list[tuple[bytes, Submit, bool]] = []
        for frames in batch:
            parsed = self._parse(frames)
            if parsed is None:
                continue
            identity, request, as_json = parsed
            if isinstance(request, Submit) and identity in self._greeted:
                submits.append(parsed)
                continue
            self._flush_submits(submits)
            self._answer(identity, request, as_json, lambda: self._handle(identity, request))
        self._flush_submits(submits)

    def _flush_submits(self, submits: list[tuple[bytes, Submit, bool]]) -> None:
        if not submits:
            return
        requests = [r for _, r, _ in submits]
        try:
            answers = self.submit_batch(requests)
        except StagepoolError as exc:  # Redis is gone: every submit of the burst hears so
            answers = [exc] * len(submits)
        except Exception as exc:  # a bug: answer each submit with it, keep serving
            log.exception("control: a burst of %d submits failed", len(submits))
            answers = [exc] * len(submits)
        for (identity, request, as_json), answer in zip(submits, answers):
            self._answer(identity, request, as_json, lambda: answer)
        submits.clear()

    def _parse(self, frames: list[bytes]):
        """(identity, request, as_json), or None after answering what could not be parsed."""
        if len(frames) != 2:
            log.warning("control: dropped a message of %d frames (send exactly one)", len(frames))
            if frames:
                self._reply(frames[0], Error(code=Code.BAD_REQUEST,
                                             message="send exactly one frame per message"), False)
            return None
        identity, frame = frames
        try:
            request, as_json = self._codec.decode(frame)
        except StagepoolError as exc:
            log.warning("control: refused a request from %s: %s", identity.hex(), exc)
            self._reply(identity, wire.error_reply(exc, salvage_rid(frame)), looks_json(frame))
            return None
        return identity, request, as_json

    def _answer(self, identity: bytes, request, as_json: bool, handle) -> None:
        """Reply with what `handle()` returns (or raises: an error reply) to `request`."""
        rid = request.rid
        try:
            reply = handle()
            if isinstance(reply, Exception):
                raise reply
        except StagepoolError as exc:
            log.warning("control: refused a request from %s: %s", identity.hex(), exc)
            reply = wire.error_reply(exc, rid)
        except Exception as exc:
            log.exception("control: request from %s failed", identity.hex())
            reply = Error(code=Code.INTERNAL, message=f"internal error: {exc}", rid=rid)
        reply.rid = rid
        self._reply(identity, reply, as_json)

    def _reply(self, identity: bytes, reply, as_json: bool) -> None:
        try:
            frame = self._codec.encode(reply, as_json)
        except OverflowError:  # an int beyond 64 bits (in params): JSON carries it
            frame = self._codec.encode(reply, True)
        try:
            self._sock.send_multipart([identity, frame], zmq.NOBLOCK)
        except zmq.Again:
            log.warning("control: dropped a reply to %s (peer not reading)", identity.hex())

    def _handle(self, identity: bytes, request):
        if isinstance(request, Hello):
            return self._hello(identity, request)
        if identity not in self._greeted:
            return Error(code=Code.HANDSHAKE, message="send hello first")
        match request:
            case Submit():
                return self.submit(request)
            case GetStatus(job_id=job_id):
                return self.jobs.status(job_id)
            case Cancel(job_id=job_id):
                return self.jobs.cancel(job_id)
            case Retry(job_id=job_id):
                return self.jobs.retry(job_id)
            case ListJobs():
                return self.jobs.list(request)
            case Purge():
                return self.jobs.purge(request)
            case GetQueues():
                return self._queues()
            case Register():
                return self._register(request)
            case Heartbeat():
                if not self.registry.heartbeat(request):
                    return Error(code=Code.UNKNOWN_WORKER, message="register again")
                dead, revived = self.peers.news(request.session)
                return HeartbeatAck(broker_id=self.broker_id, dead_peers=dead,
                                    revived_peers=revived)
            case GetWorkers():
                return self.registry.listing()
            case Unregister(worker_id=worker_id):
                self.registry.drop(worker_id)
                return Ack()
            case Rewind():
                return self._rewind(request)
            case VerbsConnect(stage=stage, qp=qp):
                if self.ringhost.verbs is None:
                    return Error(code=Code.UNAVAILABLE, message="verbs is not enabled")
                return VerbsAccept(qp=self.ringhost.verbs.accept(stage, qp))
        raise ProtocolError(f"unexpected {type(request).__name__}")

    def _rewind(self, request: Rewind) -> RewindResult:
        """Send a job back to the stage that produced the inputs a worker could not pull; a
        producer that could not be reached is announced dead to every worker (heartbeats)."""
        if request.dead_peer:
            self.peers.report(request.dead_peer, request.stage)
        stages = self.config.pipeline.stages
        index = self._stage_names.index(request.stage) if request.stage in self._stage_names else -1
        if index <= 0:
            return Error(code=Code.BAD_REQUEST, message=f"{request.stage!r} has no previous stage")
        prev = stages[index - 1]
        outcome = self.store.apply(tx.Rewind(
            wire.check_job_id(request.job_id), request.stage, request.attempt,
            request.worker_id, request.error, prev.name, index - 1,
            prev.max_attempts))
        if outcome.status == "retry":
            attempt, dispatch = outcome.values
            self.dispatcher.republish(prev.name, dispatch, int(attempt))
            log.info("job %s: %s inputs lost (%s); %s runs again (attempt %s)", request.job_id,
                     request.stage, request.error, prev.name, int(attempt))
        return RewindResult(status=outcome.status)

    def _hello(self, identity: bytes, hello: Hello):
        if hello.version != wire.PROTOCOL_VERSION:
            return Error(code=Code.VERSION,
                         message=f"broker speaks version {wire.PROTOCOL_VERSION}, not {hello.version}")
        if hello.schema and hello.schema != self.schema:
            return Error(code=Code.VERSION, message=f"schema {hello.schema} != {self.schema}")
        if len(self._greeted) >= _MAX_GREETED:
            oldest = sorted(self._greeted, key=self._greeted.get)[: _MAX_GREETED // 10]
            for key in oldest:
                del self._greeted[key]
        self._greeted[identity] = time.monotonic()
        return Welcome(version=wire.PROTOCOL_VERSION, schema=self.schema, broker_id=self.broker_id)

    def _queues(self) -> Queues:
        queues = []
        for stage, ring in self.ringhost.rings.items():
            in_flight = sum(ring.read_lease(c) is not None for c in range(ring.layout.cells))
            workers = self.registry.count(stage)
            rings = self.ringhost.lanes[stage]
            queues.append(QueueInfo(stage=stage, depth=sum(r.depth() for r in rings),
                                    backlog=self.dispatcher.backlog(stage), in_flight=in_flight,
                                    workers=workers, capacity=ring.layout.capacity))
        return Queues(queues=queues, recovered=self.reaper.recovered_total)

    # -- workers -----------------------------------------------------------------------------

    def _register(self, request: Register) -> Registered:
        stage = self.config.stage(request.stage)
        next_stage = self.config.next_stage(stage.name)
        cells = self.registry.register(request)
        if request.host != self.ringhost.host:
            local = [what for what, address in (("redis", self.redis_url),
                                                 ("tcp ring", self.ringhost.tcp_endpoint()))
                     if address and is_local(endpoint_host(address))]
            if local:
                log.info("worker %s is on host %s: it reaches the %s offered on a loopback or "
                         "wildcard address at the address it reached the broker at",
                         request.worker_id, request.host, " and ".join(local))
        return Registered(
            broker_id=self.broker_id, cell=cells[0], cells=cells,
            consume=self.ringhost.attach_info(stage.name),
            produce=self.ringhost.attach_info(next_stage.name) if next_stage else None,
            consume_lanes=[self.ringhost.attach_info(stage.name, lane)
                           for lane in range(len(lanes.LANES))],
            produce_lanes=[self.ringhost.attach_info(next_stage.name, lane)
                           for lane in range(len(lanes.LANES))] if next_stage else [],
            next_stage=next_stage.name if next_stage else "",
            lease_ms=stage.lease_ms, heartbeat_ms=self.config.worker.heartbeat_ms,
            max_attempts=stage.max_attempts, redis_url=self.redis_url,
            namespace=self.config.redis.namespace,
            events_maxlen=self.config.redis.events_maxlen,
            retention_s=self.config.redis.retention_s,
        )
