"""The stage plugin interface: what a stage implementation provides to the worker runtime.

    class MyStage(Stage):
        def load(self): ...                           # once per worker process
        def run(self, job: JobContext) -> StageOutput: ...   # once per job attempt

`run` raises to fail the attempt (retried up to max_attempts, then the job fails). It may
call `job.progress(i, n)`; long runs need nothing else: the runtime keeps the lease alive.

A stage whose run costs less than a Redis round trip may say so (`cheap`): when the dispatch
carries the params, the worker then runs it first and records start and commit in one
transition (`pass`). The price: a job cancelled while queued may still run once there (its
output is discarded), so expensive stages must not claim it.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, Callable

from ..common.config import StageConfig


@dataclass
class JobContext:
    job_id: str
    attempt: int
    params: dict[str, Any]
    inputs: dict[str, Any] = field(default_factory=dict)
    progress: Callable[[int, int], None] = lambda step, steps: None


@dataclass
class StageOutput:
    """`tensors` go to the next stage; `result` is committed by the last stage."""

    tensors: dict[str, Any] = field(default_factory=dict)
    result: Any = None


class Stage(abc.ABC):
    uses_tensors = False  # True: the worker opens a transfer pool before registering

    def __init__(self, config: StageConfig):
        self.config = config

    @property
    def cheap(self) -> bool:
        """True: run before the start is recorded (see the module docstring)."""
        return False

    def load(self) -> None:
        """Load models; called once before the first job."""

    @abc.abstractmethod
    def run(self, job: JobContext) -> StageOutput:
        """Do the stage's work for one job."""


_KINDS: dict[str, Callable[[StageConfig], Stage]] = {}


def register(kind: str):
    def decorate(cls):
        _KINDS[kind] = cls
        return cls

    return decorate


def create(config: StageConfig) -> Stage:
    from . import model, noop  # noqa: F401  (registers the built-in kinds)

    try:
        factory = _KINDS[config.kind]
    except KeyError:
        raise ValueError(f"unknown stage kind {config.kind!r}; known: {sorted(_KINDS)}") from None
    return factory(config)
