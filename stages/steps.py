"""What a running stage learns at each step: `job.progress(step, steps)`.

A stage that reports its steps (the denoise loop) is stopped there, by `StageStopped`, when:
  1. the broker asked it to (our lease cell's stop word: the job was cancelled, or our lease
     expired and the job was recovered): a local load on shm, no round trip;
  2. its time limit passed (the attempt is retried);
  3. its worker is stopping at once (a second SIGTERM: the job runs again elsewhere);
  4. Redis, answering the step's progress write (at most every progress_interval_ms, and the
     last step), says the job ended or another attempt owns it.
A stage without steps learns the same at its commit, which Redis refuses.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from ..common.dispatch import Dispatch
from ..common.errors import StagepoolError, StageStopped
from ..common.ring import Ring
from .commits import Commits

log = logging.getLogger(__name__)


def reporter(commits: Commits, ring: Ring, cell: int, dispatch: Dispatch, deadline: float,
             limit_s: float, stopping: threading.Event) -> Callable[[int, int], None]:
    """`job.progress` for one attempt leased in `cell` of `ring`, due by `deadline`
    (monotonic)."""
    interval_s = commits.settings.progress_interval_ms / 1000
    next_write = 0.0

    def report(step: int, steps: int) -> None:
        nonlocal next_write
        now = time.monotonic()
        if ring.stop_requested(cell):
            raise StageStopped(f"the broker stopped the attempt at step {step}/{steps} "
                               "(cancelled, or recovered after its lease expired)")
        if now > deadline:
            raise StageStopped(f"time limit of {limit_s:g} s passed at step {step}/{steps}",
                               retry=True)
        if stopping.is_set():
            raise StageStopped(f"the worker is stopping (at step {step}/{steps}): the job "
                               "runs again", retry=True)
        if now < next_write and step < steps:
            return
        next_write = now + interval_s
        try:
            outcome = commits.progress(dispatch, step, steps)
        except StagepoolError:
            log.debug("progress not recorded", exc_info=True)
            return
        if outcome.status == "terminal":
            raise StageStopped(f"the job is {outcome.values[0].decode()} (at step "
                               f"{step}/{steps})")
        if not outcome.ok:
            raise StageStopped(f"the attempt is {outcome.status} (at step {step}/{steps}): "
                               "another attempt owns the job")

    return report
