"""What a worker writes to Redis, and what its ring records carry: the transitions as data.

The worker runtime (worker.py) decides when to send; this module decides what. Every
transition is a `JobStore.run_batch` tuple: (command, job id, *args), see common/lua/jobs.lua.

A record may carry transitions still on their way to Redis, for its consumer to apply first:
  Dispatch.submit   the broker published a lone job before its submit landed: the submit
  Dispatch.carried  a cheap stage handed a lone job on before its commit landed: that commit,
                    and whatever its own record carried
Each is fenced and idempotent (the submit on its token, `pass` on attempt and `done`), so a
late original is a no-op. A record handed on early names the next stage's first attempt, which
Redis confirms or the worker corrects once its commit answers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec

from ..common.config import StageConfig
from ..common.jobstore import JobStore
from ..common.wire import Dispatch, encode_dispatch
from . import base

FIRST_ATTEMPT = 1


@dataclass
class Ran:
    """One dispatch whose stage ran, waiting for the batch's commit."""

    dispatch: Dispatch
    params_json: bytes
    output: base.StageOutput
    pull: Any  # the inputs' Pull, released after the commit; None without inputs
    ran_ms: int
    ahead: bool  # run before its start was recorded: commit with `pass`
    hand_on: Dispatch | None = None
    held_key: str = ""
    early: bool = False  # the hand-on went out before the commit, carrying it


class Transitions:
    """The transitions of one stage's worker."""

    def __init__(self, pipeline: str, stage: StageConfig, stage_index: int):
        self.pipeline = pipeline
        self.stage = stage
        self.stage_index = stage_index

    def start(self, dispatch: Dispatch, worker: str) -> tuple:
        return ("start", dispatch.job_id, self.stage.name, dispatch.attempt, worker,
                self.stage.job_state(), self.stage_index)

    def commit(self, done: Ran, worker: str, next_stage: str, payload: bytes) -> tuple:
        """`pass` for a stage run ahead of its start, else `finish` (with a next stage: the
        payload is its dispatch) or `complete` (the payload is the result JSON)."""
        d, name = done.dispatch, self.stage.name
        if done.ahead:
            return JobStore.pass_args(d.job_id, name, d.attempt, worker, self.stage.job_state(),
                                      self.stage_index, done.ran_ms, next_stage, payload)
        if next_stage:
            return ("finish", d.job_id, name, d.attempt, worker, next_stage, payload)
        return ("complete", d.job_id, name, d.attempt, worker, payload)

    def prefix(self, dispatch: Dispatch) -> list[tuple]:
        """The transitions a record carries, to apply before the consumer's own."""
        prefix = []
        if dispatch.submit:
            stored = encode_dispatch(msgspec.structs.replace(dispatch, submit="", carried=[]))
            prefix.append(("submit", dispatch.job_id, self.pipeline, dispatch.params,
                           self.stage.name, stored, dispatch.priority, dispatch.submit))
        for command, job_id, *args in dispatch.carried:
            prefix.append((command.decode(), job_id.decode(), *args))
        return prefix


def fitted(hand_on: Dispatch, payload_max: int) -> tuple[Dispatch, bytes]:
    """The hand-on and its record, without the params if they make it overflow its slot
    (the next stage then reads them from Redis)."""
    payload = encode_dispatch(hand_on)
    if len(payload) > payload_max:
        hand_on = msgspec.structs.replace(hand_on, params=None)
        payload = encode_dispatch(hand_on)
    return hand_on, payload


def early_record(hand_on: Dispatch, carried: list[tuple], payload_max: int) -> bytes | None:
    """The record of a hand-on published before its commit lands, carrying `carried`; None
    when that does not fit a slot."""
    as_bytes = [[x if isinstance(x, bytes) else str(x).encode() for x in t] for t in carried]
    payload = encode_dispatch(msgspec.structs.replace(hand_on, attempt=FIRST_ATTEMPT,
                                                      carried=as_bytes))
    return payload if len(payload) <= payload_max else None
