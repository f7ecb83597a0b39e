"""Plugins defined outside stagepool, as a user's package would: named by `module:Class`.

`Gradient` is a model family with no weights: encode turns the prompt's bytes into a vector
(plus `embed_kb` of padding, to fill pools), denoise blends it toward a seeded target over
`infer_steps` (`step_ms` each), decode paints a gradient frame.
`Shout` is a stage kind: the prompt, upper-cased, as the result. `Steps` runs, in the stage
named by `params.slow_stage`, `params.steps` steps of `params.step_ms` each, reporting each
(a denoise loop without a model), and one step elsewhere; `Hang` never reaches a step there
(a hung kernel); `Flaky` fails its first attempts there.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import torch

from stagepool.stages.base import JobContext, Stage, StageOutput
from stagepool.stages.families import Family, Tensors


class Gradient(Family):
    name = "gradient"
    defaults = {"prompt": "", "seed": 0, "height": 8, "width": 12, "infer_steps": 3}
    needs_model_dir = False

    def load(self, stage: str) -> None:
        self.stage = stage

    def encode(self, params: dict[str, Any]) -> Tensors:
        p = self.params(params)
        raw = p["prompt"].encode()[:16].ljust(16, b" ")
        out = {"embedding": torch.tensor(list(raw), dtype=torch.float32) / 255}
        if p.get("embed_kb"):
            out["padding"] = torch.zeros(int(p["embed_kb"]) * 256)
        return out

    def denoise(self, params: dict[str, Any], inputs: Tensors,
                progress: Callable[[int, int], None]) -> Tensors:
        p = self.params(params)
        x = inputs["embedding"].clone()
        target = torch.rand(16, generator=self.generator(p))
        steps = int(p["infer_steps"])
        for i in range(steps):
            time.sleep(float(p.get("step_ms", 0)) / 1000)
            x = x + (target - x) / (steps - i)
            progress(i + 1, steps)
        return {"latents": x}

    def decode(self, params: dict[str, Any], inputs: Tensors):
        p = self.params(params)
        level = float(inputs["latents"].mean())
        ramp = torch.linspace(0, 1, p["width"]).expand(p["height"], p["width"])
        frame = torch.stack([ramp, torch.full_like(ramp, level), 1 - ramp], dim=-1)
        return frame[None].numpy()


class Shout(Stage):
    def run(self, job: JobContext) -> StageOutput:
        return StageOutput(result={"shout": str(job.params.get("prompt", "")).upper()})


class Steps(Stage):
    def run(self, job: JobContext) -> StageOutput:
        slow = job.params.get("slow_stage") == self.config.name
        steps = int(job.params.get("steps", 1)) if slow else 1
        for i in range(steps):
            time.sleep(float(job.params.get("step_ms", 10)) / 1000)
            job.progress(i + 1, steps)
        return StageOutput(result={"steps": steps})


class Hang(Stage):
    def run(self, job: JobContext) -> StageOutput:
        if job.params.get("slow_stage") == self.config.name:
            time.sleep(3600)
        return StageOutput(result={})


class Flaky(Stage):
    """Fails (a RuntimeError: transient) its first `params.fail_attempts` attempts in the stage
    named by `params.flaky_stage`."""

    def run(self, job: JobContext) -> StageOutput:
        if (job.params.get("flaky_stage") == self.config.name
                and job.attempt <= int(job.params.get("fail_attempts", 0))):
            raise RuntimeError(f"transient failure of attempt {job.attempt}")
        return StageOutput(result={"attempt": job.attempt})
