"""The Redis job store: job records, transitions, events, ingress, dead letters.

Every transition runs inside `lua/jobs.lua` (read it for the record's schema), so each is
atomic, and the stage-scoped ones are fenced by the stage's attempt number. The transitions
are typed structs (common/transitions.py); `run` sends several in one round trip (a worker
committing a batch, the broker a burst of submits), `apply` one.

redis-py errors are translated to `StoreUnavailable` here, where they cross in.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from importlib import resources
from typing import Any

import msgspec
import redis

from .errors import StoreUnavailable
from .keys import INGRESS_GROUP, Keys
from .redisurl import connect
from .transitions import Transition
from .wire import TERMINAL_STATES, JobStatus

# Record fields that are a stage's, as `<stage>.<field>`; the ints among them.
STAGE_FIELDS = ("attempt", "worker", "enqueued_ms", "started_ms", "finished_ms", "retries",
                "rewinds", "step")
_TEXT_FIELDS = ("worker", "step")


@functools.cache
def _script_source() -> str:
    return resources.files("stagepool.common").joinpath("lua/jobs.lua").read_text()


@dataclass(frozen=True)
class Outcome:
    """A transition's answer: `status` is the script's first reply element."""

    status: str
    values: tuple = ()

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def _translate(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise StoreUnavailable(f"redis unavailable: {exc}") from exc

    return wrapper


class JobStore:
    """Job records in one Redis under one namespace. Safe to share between threads."""

    def __init__(self, url: str, namespace: str, *, events_maxlen: int = 100_000,
                 retention_s: float = 0.0, socket_timeout_s: float = 5.0):
        self.keys = Keys(namespace)
        self.url = url
        self.events_maxlen = events_maxlen
        self.retention_ms = int(retention_s * 1000)
        self.redis = connect(url, socket_timeout=socket_timeout_s,
                             socket_connect_timeout=socket_timeout_s, health_check_interval=30)
        self._script = self.redis.register_script(_script_source())

    @classmethod
    def from_config(cls, config) -> JobStore:
        return cls(config.redis.url, config.redis.namespace,
                   events_maxlen=config.redis.events_maxlen,
                   retention_s=config.redis.retention_s,
                   socket_timeout_s=config.redis.socket_timeout_s)

    def close(self) -> None:
        self.redis.close()

    @_translate
    def run(self, transitions: list[Transition]) -> list[Outcome]:
        """Several transitions in one round trip (one script call), in order; one Outcome
        each. Each is independent of the others' outcome."""
        if not transitions:
            return []
        k = self.keys
        keys = [k.events, k.active, k.jobs, k.results, k.dead]
        argv: list[Any] = [self.events_maxlen, self.retention_ms]
        for transition in transitions:
            args = transition.args()
            keys.append(k.job(transition.job_id))
            argv.extend((len(args) + 2, transition.command, transition.job_id, *args))
        return [Outcome(reply[0].decode(), tuple(reply[1:]))
                for reply in self._script(keys=keys, args=argv)]

    def apply(self, transition: Transition) -> Outcome:
        """One transition."""
        return self.run([transition])[0]

    # -- reads ---------------------------------------------------------------------------

    @_translate
    def get(self, job_id: str) -> dict[str, str] | None:
        raw = self.redis.hgetall(self.keys.job(job_id))
        if not raw:
            return None
        return {k.decode(): v.decode(errors="replace") for k, v in raw.items()
                if not k.endswith(b".dispatch")}

    @_translate
    def history(self, job_id: str) -> list[dict[str, Any]]:
        """The job's transitions, oldest first (the newest 200): see jobs.lua."""
        return [msgspec.json.decode(e) for e in self.redis.lrange(self.keys.log(job_id), 0, -1)]

    @_translate
    def states(self, job_ids: list[str]) -> list[str | None]:
        pipe = self.redis.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hget(self.keys.job(job_id), "state")
        return [s.decode() if s else None for s in pipe.execute()]

    @_translate
    def active_ids(self, batch: int = 1000):
        """Iterate non-terminal job ids, oldest first, by a score cursor: jobs that end (and
        leave the set) meanwhile never shift the walk past one that has not."""
        low: float | str = "-inf"
        seen_at_low: set[bytes] = set()  # members at score `low` already yielded
        while True:
            chunk = self.redis.zrangebyscore(self.keys.active, low, "+inf", start=0,
                                             num=batch + len(seen_at_low), withscores=True)
            fresh = [(m, s) for m, s in chunk if not (s == low and m in seen_at_low)]
            if not fresh:
                return
            yield from (m.decode() for m, _ in fresh)
            low = fresh[-1][1]
            seen_at_low = {m for m, s in chunk if s == low}

    # -- observability (the gateway, `stagepool top`) --------------------------------------

    @_translate
    def run_id(self) -> str:
        """The Redis server's run id: a new one means it restarted (and may have lost the
        writes after its last fsync)."""
        return self.redis.info("server")["run_id"]

    @_translate
    def now_ms(self) -> int:
        """Redis's clock: the one every timestamp in the records comes from."""
        seconds, micros = self.redis.time()
        return seconds * 1000 + micros // 1000

    @_translate
    def queue_stats(self, stages: list[str]) -> list[tuple[int, int | None]]:
        """Per stage: (jobs waiting for a worker, enqueue ms of the oldest or None)."""
        pipe = self.redis.pipeline(transaction=False)
        for stage in stages:
            pipe.zcard(self.keys.queued(stage))
            pipe.zrange(self.keys.queued(stage), 0, 0, withscores=True)
        replies = pipe.execute()
        return [(replies[i], int(replies[i + 1][0][1]) if replies[i + 1] else None)
                for i in range(0, len(replies), 2)]

    @_translate
    def fields(self, pairs: list[tuple[str, str]]) -> list[str | None]:
        """One field of each of several job records, in one round trip: [(job_id, field)]."""
        pipe = self.redis.pipeline(transaction=False)
        for job_id, field in pairs:
            pipe.hget(self.keys.job(job_id), field)
        return [v.decode() if v is not None else None for v in pipe.execute()]

    @_translate
    def totals(self) -> dict[str, int]:
        """Jobs not yet ended, jobs ever recorded, stored results, dead letters."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.zcard(self.keys.active)
        pipe.zcard(self.keys.jobs)
        pipe.zcard(self.keys.results)
        pipe.llen(self.keys.dead)
        active, jobs, results, dead = pipe.execute()
        return {"active": active, "jobs": jobs, "results": results, "dead": dead}

    @_translate
    def recent(self, limit: int, before_ms: int | None = None,
               active_only: bool = False) -> list[tuple[str, dict[str, str]]]:
        """The newest jobs created before `before_ms` (all, or only those not yet ended)."""
        key = self.keys.active if active_only else self.keys.jobs
        top = f"({before_ms}" if before_ms is not None else "+inf"
        ids = [i.decode() for i in self.redis.zrevrangebyscore(key, top, "-inf", start=0,
                                                                num=limit)]
        pipe = self.redis.pipeline(transaction=False)
        for job_id in ids:
            pipe.hgetall(self.keys.job(job_id))
        records = []
        for job_id, raw in zip(ids, pipe.execute()):
            if raw:
                records.append((job_id, {k.decode(): v.decode(errors="replace")
                                         for k, v in raw.items()
                                         if not k.endswith(b".dispatch")}))
        return records

    @_translate
    def add_transfer(self, stage: str, counts: dict[tuple[str, str], list[float]]) -> None:
        """Add a worker's transfer counters: (phase, backend) -> [bytes, seconds, ops]."""
        pipe = self.redis.pipeline(transaction=False)
        for (phase, backend), (nbytes, seconds, ops) in counts.items():
            field = f"{stage}|{phase}|{backend}|"
            pipe.hincrby(self.keys.transfer, field + "bytes", int(nbytes))
            pipe.hincrbyfloat(self.keys.transfer, field + "seconds", seconds)
            pipe.hincrby(self.keys.transfer, field + "ops", int(ops))
        pipe.execute()

    @_translate
    def autoscale_state(self) -> dict[str, int]:
        """`stagepool up`'s autoscaler: <stage>|workers, <stage>|up, <stage>|down."""
        return {k.decode(): int(v) for k, v in self.redis.hgetall(self.keys.autoscale).items()}

    @_translate
    def transfer_totals(self) -> dict[tuple[str, str, str], dict[str, float]]:
        """(stage, phase, backend) -> {"bytes", "seconds", "ops"} since the namespace began."""
        totals: dict[tuple[str, str, str], dict[str, float]] = {}
        for field, value in self.redis.hgetall(self.keys.transfer).items():
            parts = field.decode().split("|")
            if len(parts) == 4:
                totals.setdefault(tuple(parts[:3]), {})[parts[3]] = float(value)
        return totals

    @_translate
    def read_events(self, last_id: bytes | str, count: int, block_ms: int | None):
        """Events after `last_id` ("$": only new ones), waiting up to `block_ms` for some."""
        reply = self.redis.xread({self.keys.events: last_id}, count=count, block=block_ms)
        return reply[0][1] if reply else []

    # -- ingress -------------------------------------------------------------------------

    @_translate
    def add_ingress(self, body: bytes) -> None:
        """Queue a submission for whichever broker reads the ingress stream next."""
        self.redis.xadd(self.keys.ingress, {"job": body})

    @_translate
    def ensure_ingress_group(self) -> None:
        try:
            self.redis.xgroup_create(self.keys.ingress, INGRESS_GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    @_translate
    def read_ingress(self, consumer: str, count: int, block_ms: int, pending: bool):
        """Entries for `consumer`: its unacknowledged ones first (pending=True), then new."""
        reply = self.redis.xreadgroup(
            INGRESS_GROUP, consumer, {self.keys.ingress: "0" if pending else ">"},
            count=count, block=None if pending else block_ms,
        )
        return reply[0][1] if reply else []

    @_translate
    def ack_ingress(self, entry_ids: list[bytes]) -> None:
        if entry_ids:
            self.redis.xack(self.keys.ingress, INGRESS_GROUP, *entry_ids)


class EndedFeed:
    """Jobs as they end, pushed by Redis (`{ns}:ended`): wait for jobs without polling.

    Open it before submitting (or check the states once after opening it): a job that ends
    before the subscription is not announced again. Not thread-safe; `close` when done.
    """

    def __init__(self, store: JobStore):
        self._pubsub = store.redis.pubsub(ignore_subscribe_messages=True)
        self._pubsub.subscribe(store.keys.ended)

    @_translate
    def next(self, timeout_s: float) -> tuple[str, str] | None:
        """(job id, terminal state) of the next job to end, or None after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while True:
            remaining_s = deadline - time.monotonic()
            if remaining_s <= 0:
                return None
            message = self._pubsub.get_message(timeout=remaining_s)
            if message is not None and message["type"] == "message":
                job_id, _, state = message["data"].decode().partition(" ")
                return job_id, state

    def wait(self, job_ids: list[str], timeout_s: float) -> dict[str, str]:
        """The end states of `job_ids`, as they end; those still running after `timeout_s`
        are missing from the answer."""
        pending, ended = set(job_ids), {}
        deadline = time.monotonic() + timeout_s
        while pending:
            item = self.next(deadline - time.monotonic())
            if item is None:
                break
            if item[0] in pending:
                pending.discard(item[0])
                ended[item[0]] = item[1]
        return ended

    def close(self) -> None:
        self._pubsub.close()


def job_status(job_id: str, record: dict[str, str], stage_names: list[str]) -> JobStatus:
    """A Redis job record as the wire's JobStatus."""
    stages: dict[str, dict[str, Any]] = {}
    for name in stage_names:
        info = {}
        for field in STAGE_FIELDS:
            value = record.get(f"{name}.{field}")
            if value is not None:
                info[field] = value if field in _TEXT_FIELDS else int(value)
        if info:
            stages[name] = info
    result = record.get("result")
    state, stage = record.get("state", ""), record.get("stage", "")
    progress = None
    if state == "succeeded":
        progress = 1.0
    elif state not in TERMINAL_STATES and not state.startswith("queued:"):
        done, _, total = stages.get(stage, {}).get("step", "").partition("/")
        progress = int(done) / int(total) if total and int(total) else None
    return JobStatus(
        job_id=job_id, state=state, stage=stage, progress=progress,
        pipeline=record.get("pipeline", ""),
        params=msgspec.json.decode(record.get("params") or "{}"),
        error=record.get("error", ""),
        result=msgspec.json.decode(result) if result else None,
        created_ms=int(record.get("created_ms", 0)), updated_ms=int(record.get("updated_ms", 0)),
        stages=stages,
    )
