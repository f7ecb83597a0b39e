"""A worker's commit policy: what it records in Redis for a batch, and what it hands on.

One path for every stage (each step one round trip for the whole batch):
  1. `start`: the stage's start is recorded, fenced on the attempt; Redis answers the params.
     A stale or duplicate attempt, or an ended job (cancelled, say), is not started: dropped;
  2. the worker runs the stage and holds its outputs;
  3. `commit`: `finish` (a next stage: Redis records the hand-on and answers its attempt) or
     `complete` (the last stage: the result, exactly once per job). A refused commit (the
     attempt was superseded, or the job ended meanwhile) hands nothing on;
  4. the worker publishes each hand-on with the attempt Redis answered.
A failed attempt is `retry`d (error mode): attempt + 1 published again into our own ring, or
the job fails after max_attempts.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import msgspec

from ..common import transitions as tx
from ..common.config import Config
from ..common.jobstore import Outcome
from ..common.dispatch import Dispatch, encode_dispatch
from ..common.errors import StagepoolError
from ..common.ring import Ring, lanes
from .session import Session

log = logging.getLogger(__name__)


@dataclass
class Ran:
    """One dispatch whose stage ran, waiting for the batch's commit."""

    dispatch: Dispatch
    output: Any  # base.StageOutput
    pull: Any = None  # the inputs' Pull (closed after the commit); None without inputs
    hand_on: Dispatch | None = None  # the next stage's dispatch, its attempt still unknown
    held: bool = False  # outputs held in our pool under the job's key
    ran_s: float = 0.0  # the pull and the run, for the attempt's log line


class Commits:
    """The transitions of one worker's stage."""

    def __init__(self, config: Config, session: Session):
        names = [s.name for s in config.pipeline.stages]
        self.stage = config.stage(session.stage)
        self.index = names.index(session.stage)
        self.next_stage = names[self.index + 1] if self.index + 1 < len(names) else ""
        self.session = session  # our identity (worker id), the job store, max_attempts
        self.settings = config.worker

    def start(self, dispatches: list[Dispatch]) -> list[bytes | None]:
        """Per dispatch, in order: its params JSON if it started, else None (dropped)."""
        state, worker = self.stage.job_state(), self.session.worker_id
        outcomes = self.session.store.run([
            tx.Start(d.job_id, self.stage.name, d.attempt, worker, state, self.index)
            for d in dispatches])
        for dispatch, outcome in zip(dispatches, outcomes):
            if not outcome.ok:
                log.info("job %s attempt %d not started: %s", dispatch.job_id, dispatch.attempt,
                         outcome.status)
        return [outcome.values[0] if outcome.ok else None for outcome in outcomes]

    def commit(self, ran: list[Ran]) -> list[tuple[Ran, Outcome]]:
        """`finish` each that has a hand-on, `complete` the others; each with its outcome."""
        worker = self.session.worker_id
        transitions = []
        for done in ran:
            d = done.dispatch
            if done.hand_on is not None:
                transitions.append(tx.Finish(d.job_id, self.stage.name, d.attempt, worker,
                                             self.next_stage, encode_dispatch(done.hand_on)))
            else:
                transitions.append(tx.Complete(d.job_id, self.stage.name, d.attempt, worker,
                                               msgspec.json.encode(done.output.result)))
        return list(zip(ran, self.session.store.run(transitions)))

    def retry(self, dispatch: Dispatch, error: str, permanent: bool = False) -> Dispatch | None:
        """Record a failed attempt; the dispatch to publish again (attempt + 1), or None: the
        job failed (a permanent error fails it at once), or its retry waits out its backoff in
        Redis, and the broker publishes it when due."""
        session = self.session
        stage = self.stage
        outcome = session.store.apply(tx.Retry(
            dispatch.job_id, stage.name, dispatch.attempt, session.worker_id, error,
            session.registered.max_attempts, "fatal" if permanent else "error",
            backoff_ms=int(stage.retry_backoff_s * 1000),
            backoff_max_ms=int(stage.retry_backoff_max_s * 1000)))
        if outcome.status == "delayed":
            log.info("job %s: attempt %s runs in %s ms (the broker publishes it then)",
                     dispatch.job_id, outcome.values[0].decode(), outcome.values[1].decode())
            return None
        if outcome.status != "retry":
            log.info("job %s after a failed attempt %d: %s", dispatch.job_id, dispatch.attempt,
                     outcome.status)
            return None
        return msgspec.structs.replace(dispatch, attempt=int(outcome.values[0]))

    def publish(self, rings: list[Ring], dispatches: list[Dispatch]) -> None:
        """Each into its priority lane of `rings`, in one go. The leases stay alive while we
        wait for room: nothing is lost if we die here."""
        items = [(lanes.lane_of(d.priority), encode_dispatch(d)) for d in dispatches]
        while items:
            try:
                items = lanes.produce_many(rings, items, self.settings.publish_wait_s)
            except StagepoolError as exc:
                log.warning("hand-on failed: %s", exc)
                time.sleep(self.settings.register_retry_s)
            if items and self.session.reattach.is_set():
                # The broker restarted: it rebuilt these dispatches from Redis already.
                log.info("broker changed during hand-on; the rebuild covers it")
                return
            if items:
                log.warning("hand-on waiting for room: %d dispatches", len(items))

    def progress(self, dispatch: Dispatch, step: int, steps: int) -> Outcome:
        return self.session.store.apply(tx.Progress(dispatch.job_id, self.stage.name,
                                                    dispatch.attempt, step, steps))


def handed_on(done: Ran, outcome: Outcome) -> Dispatch | None:
    """The hand-on to publish after a committed `finish`: its attempt is Redis's answer."""
    if not outcome.ok or done.hand_on is None:
        return None
    return msgspec.structs.replace(done.hand_on, attempt=int(outcome.values[0]))
