"""Finding jobs: the filters of `stagepool jobs`, `GET /v1/jobs` and the dashboard, over Redis.

Redis keeps no index by state, so a query walks the jobs newest first (`{ns}:active` when only
unfinished jobs can match, `{ns}:jobs` otherwise) in pages, reading three fields of each, and
stops once `limit` match or `SCAN_CAP` jobs were read. With records kept for `retention_s`
this is a bounded walk; a page ends after every job created in the same millisecond as its
last one, so `next_before_ms` never skips a job.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ProtocolError
from .jobstore import JobStore, job_status
from .wire import TERMINAL_STATES, JobStatus

GROUPS = ("queued", "running", "active", "ended")
SCAN_CAP = 50_000  # job records read by one query at most
_PAGE = 500


@dataclass(frozen=True)
class JobFilter:
    state: str = ""  # a state, queued:<stage>, or a group (GROUPS)
    stage: str = ""
    since_ms: int = 0  # created at or after (epoch ms); 0: no bound
    before_ms: int = 0  # created before; 0: no bound
    limit: int = 50

    def check(self, stage_names: list[str], running_states: list[str]) -> None:
        """Refuse names no job can have, listing the ones it can."""
        states = [*GROUPS, *(f"queued:{s}" for s in stage_names), *running_states,
                  *sorted(TERMINAL_STATES)]
        if self.state and self.state not in states:
            raise ProtocolError(f"no state {self.state!r}: one of {', '.join(states)}")
        if self.stage and self.stage not in stage_names:
            raise ProtocolError(f"no stage {self.stage!r}: one of {', '.join(stage_names)}")
        if not 1 <= self.limit <= 1000:
            raise ProtocolError(f"limit must be in [1, 1000], got {self.limit}")

    def matches(self, state: str, stage: str) -> bool:
        if self.stage and stage != self.stage:
            return False
        match self.state:
            case "":
                return True
            case "queued":
                return state.startswith("queued:")
            case "active":
                return state not in TERMINAL_STATES
            case "running":
                return state not in TERMINAL_STATES and not state.startswith("queued:")
            case "ended":
                return state in TERMINAL_STATES
        return state == self.state


def find(store: JobStore, query: JobFilter, stage_names: list[str]) -> tuple[list[JobStatus], int]:
    """The jobs that match, newest first, and the `before_ms` of the next page (0: none)."""
    unfinished = query.state in ("queued", "running", "active") or (
        query.state and query.state not in TERMINAL_STATES and query.state != "ended")
    key = store.keys.active if unfinished else store.keys.jobs
    top = f"({query.before_ms}" if query.before_ms else "+inf"
    bottom = query.since_ms or "-inf"
    found: list[tuple[str, int]] = []
    offset, next_ms, last_ms = 0, 0, 0
    redis = store.redis
    while not next_ms:
        if offset >= SCAN_CAP:  # read enough: the next page goes on from here
            next_ms = found[-1][1] if found else last_ms
            break
        page = redis.zrevrangebyscore(key, top, bottom, start=offset, num=_PAGE, withscores=True)
        if not page:
            break
        offset += len(page)
        last_ms = int(page[-1][1])
        pipe = redis.pipeline(transaction=False)
        for member, _ in page:
            pipe.hmget(store.keys.job(member.decode()), "state", "stage")
        for (member, score), (state, stage) in zip(page, pipe.execute()):
            if state is None:
                continue  # expired or purged meanwhile
            if len(found) >= query.limit and int(score) != found[-1][1]:
                next_ms = found[-1][1]
                break
            if query.matches(state.decode(), (stage or b"").decode()):
                found.append((member.decode(), int(score)))
    pipe = redis.pipeline(transaction=False)
    for job_id, _ in found:
        pipe.hgetall(store.keys.job(job_id))
    jobs = [job_status(job_id, {k.decode(): v.decode(errors="replace") for k, v in raw.items()},
                       stage_names)
            for (job_id, _), raw in zip(found, pipe.execute()) if raw]
    return jobs, next_ms
