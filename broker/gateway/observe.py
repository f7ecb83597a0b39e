"""What the gateway and `stagepool top` see: Redis for jobs and queues, the broker for rings.

Queue depth and the age of the oldest waiting job come from Redis (`{ns}:queued:<stage>`,
kept exact by jobs.lua), so every gateway replica reports the whole system and the numbers
survive a broker restart. Ring occupancy, leases in flight and live workers are the broker's
(`GetQueues`); while the broker is unreachable they are reported as unknown, never as zero.

Sync on purpose: the gateway calls it from its thread pool, `top` from its loop. Redis is
thread-safe; broker clients are one per thread.
"""

from __future__ import annotations

import logging
import threading
import uuid
from pathlib import Path

import msgspec

from ...common import wire
from ...common.client import BrokerClient
from ...common.config import DEFAULT_RESULTS_DIR, Config
from ...common.errors import Code, RemoteError, StagepoolError, TransportError
from ...common.jobquery import JobFilter, find
from ...common.jobstore import JobStore, job_status
from ...common.security import Keys
from ...common.wire import TERMINAL_STATES
from ...common import httpwire as schema

log = logging.getLogger(__name__)


class Observer:
    def __init__(self, config: Config, broker_endpoint: str):
        self.config = config
        self.broker_endpoint = broker_endpoint
        self.store = JobStore.from_config(config)
        self.stage_names = [stage.name for stage in config.pipeline.stages]
        self.running_states = [stage.job_state() for stage in config.pipeline.stages]
        self.results_dirs = _results_dirs(config)
        self._local = threading.local()
        self._clients: list[BrokerClient] = []
        self._clients_lock = threading.Lock()

    def close(self) -> None:
        with self._clients_lock:
            for client in self._clients:
                client.close()
            self._clients.clear()
        self.store.close()

    # -- the broker --------------------------------------------------------------------

    def call(self, request):
        """One request to the broker from this thread's client; reconnects once if needed."""
        for attempt in range(2):
            client = getattr(self._local, "client", None)
            try:
                if client is None:
                    client = BrokerClient(self.broker_endpoint, name=f"gateway-{uuid.uuid4().hex[:6]}",
                                          timeout_s=self.config.gateway.broker_timeout_s,
                                          keys=Keys.from_config(self.config))
                    self._local.client = client
                    with self._clients_lock:
                        self._clients.append(client)
                return client.call(request)
            except (TransportError, RemoteError) as exc:
                handshake = isinstance(exc, RemoteError) and exc.code == Code.HANDSHAKE
                if not (handshake or isinstance(exc, TransportError)):
                    raise
                self._drop_client()  # a restarted broker forgets us; a dead one left a queue
                if attempt == 1 or not handshake:
                    raise
        raise AssertionError("unreachable")

    def _drop_client(self) -> None:
        client = getattr(self._local, "client", None)
        if client is not None:
            self._local.client = None
            with self._clients_lock:
                self._clients.remove(client)
            client.close()

    def broker_queues(self) -> wire.Queues | None:
        return self._ask(wire.GetQueues())

    def broker_workers(self) -> wire.WorkerList | None:
        return self._ask(wire.GetWorkers())

    def _ask(self, request):
        """The broker's answer, or None while it is unreachable (shown as unknown)."""
        try:
            return self.call(request)
        except StagepoolError as exc:
            log.debug("broker unreachable for %s: %s", type(request).__name__, exc)
            return None

    # -- jobs --------------------------------------------------------------------------

    def submit(self, params: dict, job_id: str | None, priority: int,
               deadline_ms: int = 0) -> schema.Submitted:
        """Through the broker; while it is unreachable, into the durable ingress stream."""
        try:
            reply = self.call(wire.Submit(params=params, job_id=job_id, priority=priority,
                                          deadline_ms=deadline_ms))
            return schema.Submitted(job_id=reply.job_id, created=reply.created, via="broker")
        except TransportError:
            job_id = wire.check_job_id(job_id) if job_id else uuid.uuid4().hex
            body = {"job_id": job_id, "params": params, "priority": priority,
                    "deadline_ms": deadline_ms}
            wire.check_params(params)
            self.store.add_ingress(msgspec.json.encode(body))
            log.warning("broker unreachable: job %s queued through the ingress stream", job_id)
            return schema.Submitted(job_id=job_id, created=True, via="ingress")

    def cancel(self, job_id: str) -> wire.CancelResult:
        return self.call(wire.Cancel(job_id=job_id))

    def job(self, job_id: str) -> schema.Job | None:
        record = self.store.get(wire.check_job_id(job_id))
        if record is None:
            return None
        return self.view(job_id, record)

    def jobs(self, limit: int, before_ms: int | None = None,
             active_only: bool = False) -> list[schema.Job]:
        return [self.view(job_id, record)
                for job_id, record in self.store.recent(limit, before_ms, active_only)]

    def find(self, query: JobFilter) -> tuple[list[schema.Job], int]:
        """`GET /v1/jobs`: the jobs that match, and the next page's before_ms (0: none)."""
        query.check(self.stage_names, self.running_states)
        found, next_before_ms = find(self.store, query, self.stage_names)
        return [self.from_status(status) for status in found], next_before_ms

    def ended(self, job_id: str) -> bool:
        """Has the job ended (or gone: expired, purged)?"""
        return (self.store.states([job_id])[0] or "succeeded") in TERMINAL_STATES

    def events(self, job: schema.Job) -> list[schema.JobEvent]:
        return [msgspec.convert(event, schema.JobEvent)
                for event in self.store.history(job.job_id)]

    def view(self, job_id: str, record: dict[str, str]) -> schema.Job:
        return self.from_status(job_status(job_id, record, self.stage_names))

    @staticmethod
    def from_status(status: wire.JobStatus) -> schema.Job:
        return schema.Job(
            job_id=status.job_id, state=status.state, stage=status.stage,
            pipeline=status.pipeline, params=status.params, error=status.error,
            result=status.result, created_ms=status.created_ms, updated_ms=status.updated_ms,
            progress=status.progress, stages=status.stages,
        )

    def result_file(self, job: schema.Job, kind: str | None) -> Path | None:
        """The job's result file of `kind` (default: its first), if it may be served."""
        files = job.files()
        if not files:
            return None
        path = files.get(kind) if kind else next(iter(files.values()))
        if not isinstance(path, str):
            return None
        resolved = Path(path).resolve()
        if not any(resolved.is_relative_to(root) for root in self.results_dirs):
            log.warning("job %s: result %s is outside the results dirs; not served",
                        job.job_id, path)
            return None
        return resolved

    # -- queues ------------------------------------------------------------------------

    def queues(self) -> schema.Queues:
        now_ms = self.store.now_ms()
        redis_stats = self.store.queue_stats(self.stage_names)
        broker = self.broker_queues()
        by_stage = {q.stage: q for q in broker.queues} if broker else {}
        stages = []
        for name, (depth, oldest_ms) in zip(self.stage_names, redis_stats):
            ring = by_stage.get(name)
            stages.append(schema.QueueView(
                stage=name, depth=depth,
                oldest_age_s=max(0, now_ms - oldest_ms) / 1000 if oldest_ms else 0.0,
                ring_depth=ring.depth if ring else None,
                ring_capacity=ring.capacity if ring else None,
                backlog=ring.backlog if ring else None,
                in_flight=ring.in_flight if ring else None,
                workers=ring.workers if ring else None,
            ))
        return schema.Queues(stages=stages, broker_up=broker is not None,
                             recovered=broker.recovered if broker else None,
                             totals=self.store.totals(), now_ms=now_ms)


def _results_dirs(config: Config) -> list[Path]:
    dirs = {Path(d).resolve() for d in config.gateway.results_dirs}
    for stage in config.pipeline.stages:
        if stage.kind == "decode":
            dirs.add(Path(stage.options.get("results_dir", DEFAULT_RESULTS_DIR)).resolve())
    return sorted(dirs)
