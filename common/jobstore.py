"""The Redis job store: job records, transitions, events, ingress, dead letters.

Every transition is one call of `lua/jobs.lua` (read it for the record's schema), so each is
atomic, and the stage-scoped ones are fenced by the stage's attempt number:

  submit    -> queued (idempotent on job id)
  start     -> the stage's state; at most one start per (stage, attempt)
  finish    -> commits a non-final stage once and records the hand-on for the next stage;
               answers the next stage's attempt (attempts only grow)
  complete  -> succeeded: the result commit, exactly once per job
  retry     -> a failed or expired attempt: attempt + 1, or failed / dead after max_attempts;
               for a stage committed by a worker that died before handing on: republish
  rewind    -> a stage's inputs died with their producer: the previous stage runs again
  progress  -> "step i/n" of the running attempt, and a progress event
  rebuild   -> after a broker restart: the job's current stage with a fresh attempt
  cancel    -> cancelled

redis-py errors are translated to `StoreUnavailable` here, where they cross in.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from importlib import resources
from typing import Any

import msgspec
import redis

from .errors import StoreUnavailable
from .keys import INGRESS_GROUP, Keys


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
                 socket_timeout_s: float = 5.0):
        self.keys = Keys(namespace)
        self.url = url
        self.events_maxlen = events_maxlen
        self.redis = redis.Redis.from_url(
            url, socket_timeout=socket_timeout_s, socket_connect_timeout=socket_timeout_s,
            health_check_interval=30,
        )
        self._script = self.redis.register_script(_script_source())

    @classmethod
    def from_config(cls, config) -> JobStore:
        return cls(config.redis.url, config.redis.namespace,
                   events_maxlen=config.redis.events_maxlen,
                   socket_timeout_s=config.redis.socket_timeout_s)

    def close(self) -> None:
        self.redis.close()

    def _call(self, command: str, job_id: str, *args: Any) -> Outcome:
        k = self.keys
        reply = self._script(
            keys=[k.job(job_id), k.events, k.active, k.jobs, k.results, k.dead],
            args=[command, self.events_maxlen, job_id, *args],
        )
        status = reply[0].decode()
        return Outcome(status, tuple(reply[1:]))

    # -- transitions ---------------------------------------------------------------------

    @_translate
    def submit(self, job_id: str, pipeline: str, params_json: bytes, first_stage: str,
               dispatch: bytes, priority: int = 0) -> Outcome:
        return self._call("submit", job_id, pipeline, params_json, first_stage, dispatch, priority)

    @_translate
    def start(self, job_id: str, stage: str, attempt: int, worker: str, state: str,
              stage_index: int) -> Outcome:
        """ok -> values[0] is the params JSON; anything else: drop the dispatch."""
        return self._call("start", job_id, stage, attempt, worker, state, stage_index)

    @_translate
    def finish(self, job_id: str, stage: str, attempt: int, worker: str, next_stage: str,
               next_dispatch: bytes) -> Outcome:
        return self._call("finish", job_id, stage, attempt, worker, next_stage, next_dispatch)

    @_translate
    def rewind(self, job_id: str, stage: str, attempt: int, worker: str, error: str,
               prev_stage: str, prev_state: str, prev_index: int, max_attempts: int) -> Outcome:
        """retry -> (prev attempt, prev dispatch); failed; or a fence refusal."""
        return self._call("rewind", job_id, stage, attempt, worker, error[:2000], prev_stage,
                          prev_state, prev_index, max_attempts)

    @_translate
    def progress(self, job_id: str, stage: str, attempt: int, step: int, steps: int) -> Outcome:
        return self._call("progress", job_id, stage, attempt, step, steps)

    @_translate
    def complete(self, job_id: str, stage: str, attempt: int, worker: str,
                 result: Any) -> Outcome:
        return self._call("complete", job_id, stage, attempt, worker, msgspec.json.encode(result))

    @_translate
    def retry(self, job_id: str, stage: str, attempt: int, worker: str, error: str,
              max_attempts: int, *, crash: bool, next_stage: str = "") -> Outcome:
        """retry -> (attempt, dispatch); republish -> (stage, attempt, dispatch)."""
        mode = "crash" if crash else "error"
        return self._call("retry", job_id, stage, attempt, worker, error[:2000], max_attempts,
                          mode, next_stage)

    @_translate
    def rebuild(self, job_id: str, stage_names: list[str]) -> Outcome:
        """retry -> (attempt, dispatch, stage)."""
        return self._call("rebuild", job_id, *stage_names)

    @_translate
    def cancel(self, job_id: str) -> Outcome:
        return self._call("cancel", job_id)

    @_translate
    def reject(self, job_id: str, error: str) -> Outcome:
        return self._call("reject", job_id, error[:2000])

    # -- reads ---------------------------------------------------------------------------

    @_translate
    def get(self, job_id: str) -> dict[str, str] | None:
        raw = self.redis.hgetall(self.keys.job(job_id))
        if not raw:
            return None
        return {k.decode(): v.decode(errors="replace") for k, v in raw.items()
                if not k.endswith(b".dispatch")}

    @_translate
    def states(self, job_ids: list[str]) -> list[str | None]:
        pipe = self.redis.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hget(self.keys.job(job_id), "state")
        return [s.decode() if s else None for s in pipe.execute()]

    @_translate
    def active_ids(self, batch: int = 1000):
        """Iterate non-terminal job ids, oldest first."""
        start = 0
        while True:
            chunk = self.redis.zrange(self.keys.active, start, start + batch - 1)
            if not chunk:
                return
            yield from (job_id.decode() for job_id in chunk)
            start += batch

    # -- ingress -------------------------------------------------------------------------

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
