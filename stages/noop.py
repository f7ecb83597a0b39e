"""The no-op stage: the control plane alone, for tests and benchmarks.

Sleeps `sleep_ms` (to simulate work), then passes through. The last stage's result records
which job and attempt produced it, so tests can check each result was committed once.
`params.fail_stage = "<stage>"` makes that stage raise a RuntimeError (retried, then the job
fails); `params.reject_stage` a ValueError (a permanent error: the job fails at once).
"""

from __future__ import annotations

import time

from .base import JobContext, Stage, StageOutput


class NoopStage(Stage):
    def run(self, job: JobContext) -> StageOutput:
        if self.config.sleep_ms:
            time.sleep(self.config.sleep_ms / 1000)
        if job.params.get("fail_stage") == self.config.name:
            raise RuntimeError(f"asked to fail in {self.config.name}")
        if job.params.get("reject_stage") == self.config.name:
            raise ValueError(f"asked to refuse the params in {self.config.name}")
        return StageOutput(result={"job_id": job.job_id, "stage": self.config.name,
                                   "attempt": job.attempt})
