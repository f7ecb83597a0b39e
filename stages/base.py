"""The stage plugin interface: what a stage implementation provides to the worker runtime.

    class MyStage(Stage):
        def load(self): ...                           # once per worker process
        def run(self, job: JobContext) -> StageOutput: ...   # once per job attempt

`run` raises to fail the attempt: a `ValueError` or `TypeError` (bad params, the model code
refusing them) fails the job at once, anything else is retried up to max_attempts. A long run
calls `job.progress(i, n)` at each step: it records the step, and it raises `StageStopped`
when the run must stop there (the job was cancelled, the attempt superseded, or the stage's
time limit passed). Let it propagate: the runtime frees the job and moves on. The runtime
keeps the lease alive meanwhile; a run that reaches no step long past its time limit makes
the worker exit.

A stage's `kind` names its class (stages/plugins.py): a built-in kind ("noop", "encode",
"denoise", "decode"), an entry point in the `stagepool.stages` group, or `module:Class`.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, Callable

from ..common.config import StageConfig
from . import plugins

# Exceptions that will fail every time for these params: the job fails without a retry.
PERMANENT_ERRORS = (ValueError, TypeError)


@dataclass
class JobContext:
    job_id: str
    attempt: int
    params: dict[str, Any]
    inputs: dict[str, Any] = field(default_factory=dict)
    progress: Callable[[int, int], None] = lambda step, steps: None
    # The bytes of an input file the job's params name (`blob:<sha256>`, common/blobs.py).
    read_input: Callable[[str], bytes] = lambda ref: b""


@dataclass
class StageOutput:
    """`tensors` go to the next stage; `result` is committed by the last stage."""

    tensors: dict[str, Any] = field(default_factory=dict)
    result: Any = None


class Stage(abc.ABC):
    uses_tensors = False  # True: the worker opens a transfer pool before registering
    device = "cpu"  # the torch device it runs on, once loaded ("cuda", "cuda:1"): reported
    # The schema of the stage's `options` (a msgspec Struct, forbid_unknown_fields): checked
    # with the config before any process starts (stages/check.py). None: unchecked.
    Options: type | None = None

    def __init__(self, config: StageConfig):
        self.config = config

    def load(self) -> None:
        """Load models; called once before the first job."""

    @abc.abstractmethod
    def run(self, job: JobContext) -> StageOutput:
        """Do the stage's work for one job."""


def create(config: StageConfig) -> Stage:
    return plugins.load(plugins.STAGES, config.kind, Stage)(config)
