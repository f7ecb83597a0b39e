"""The job-state transitions, one typed struct per command of `lua/jobs.lua`.

A struct's fields, in order, are its command's arguments (the job id first): this module is
the one definition of the script's argument order, and every caller builds its transitions
here. `JobStore.apply` runs one; `JobStore.run` several in one round trip.

    Submit    -> ok (created) | exists
    Start     -> ok, params JSON | missing | terminal | duplicate | stale
    Finish    -> ok, next stage's attempt (a non-final stage's commit, once per stage)
    Complete  -> ok (the result commit: exactly once per job)
    Retry     -> retry, attempt, dispatch | delayed, attempt, ms | republish, stage, attempt,
                 dispatch | failed | dead
    Due       -> ok, then job id, stage, attempt, dispatch for each delayed retry now due
    Rewind    -> retry, prev attempt, prev dispatch | failed
    Progress  -> ok | stale | terminal, state | missing: anything but ok stops the stage
    Rebuild   -> retry, attempt, dispatch, stage | terminal | missing
    Cancel    -> ok, "cancelled" | terminal, state | missing
    Reject    -> ok, "failed" | exists, state
    Revive    -> retry, attempt, dispatch, stage | refused, state | missing
    Purge     -> ok | kept, state | missing
    Trim      -> ok, count
Any stage-scoped command may also answer missing, terminal, duplicate or stale (its fence).
"""

from __future__ import annotations

from typing import ClassVar, Literal

import msgspec

MAX_ERROR_CHARS = 2000  # an error message is cut to this before it is stored


class Transition(msgspec.Struct):
    """Base of every transition; `command` names the script's branch."""

    command: ClassVar[str]
    job_id: str

    def args(self) -> tuple:
        """The command's arguments after the job id, in the script's order."""
        return msgspec.structs.astuple(self)[1:]


class _Erring(Transition):
    def __post_init__(self):
        self.error = self.error[:MAX_ERROR_CHARS]


class Submit(Transition):
    command = "submit"
    pipeline: str
    params_json: bytes
    first_stage: str
    dispatch: bytes  # the first stage's Dispatch, kept for republishing
    priority: int = 0
    deadline_ms: int = 0  # epoch ms; 0: none


class Start(Transition):
    command = "start"
    stage: str
    attempt: int
    worker: str
    state: str  # the job's state while in this stage
    stage_index: int


class Finish(Transition):
    command = "finish"
    stage: str
    attempt: int
    worker: str
    next_stage: str
    next_dispatch: bytes


class Complete(Transition):
    command = "complete"
    stage: str
    attempt: int
    worker: str
    result_json: bytes


class Retry(_Erring):
    """A failed (`error`) or expired (`crash`) attempt: attempt + 1, or failed (error) / dead
    (crash) after max_attempts; a permanent error (`fatal`) fails the job at once. For a stage
    already committed by a worker that died before handing on (crash, with `next_stage`):
    republish the hand-on."""

    command = "retry"
    stage: str
    attempt: int
    worker: str
    error: str
    max_attempts: int
    mode: Literal["error", "crash", "fatal"]
    next_stage: str = ""
    # An `error` retry waits backoff_ms * 2^(retries - 1) (at most backoff_max_ms) in the
    # delayed set before its dispatch is published again; 0: at once.
    backoff_ms: int = 0
    backoff_max_ms: int = 0


class Due(Transition):
    """The delayed retries whose backoff is over (the job id is "": the set is global)."""

    command = "due"


class Rewind(_Erring):
    """The stage's inputs died with their producer: `prev_stage` runs again."""

    command = "rewind"
    stage: str
    attempt: int
    worker: str
    error: str
    prev_stage: str
    prev_index: int
    max_attempts: int


class Progress(Transition):
    command = "progress"
    stage: str
    attempt: int
    step: int
    steps: int


class Rebuild(Transition):
    """After a broker restart: the job's first uncommitted stage, with a fresh attempt."""

    command = "rebuild"
    stages: list[str]  # in pipeline order

    def args(self) -> tuple:
        return tuple(self.stages)


class Cancel(Transition):
    command = "cancel"


class Revive(Transition):
    """`stagepool retry`: an ended job (not succeeded) runs again from the stage it ended in."""

    command = "revive"


class Purge(Transition):
    """Delete an ended job's record if its state is `state` ("": any ended state) and it ended
    before `before_ms` (epoch ms)."""

    command = "purge"
    state: str
    before_ms: int


class Trim(Transition):
    """Forget the ids of expired records (the job id is "": the sets are global)."""

    command = "trim"


class Reject(_Erring):
    """An ingress entry with a usable job id but a body that does not decode."""

    command = "reject"
    error: str
