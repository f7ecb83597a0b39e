"""What a deployment serves: its stages and its jobs' params schema, with their defaults.

`stagepool pipeline --config FILE [--json]` prints it from the config alone (no broker needed);
the gateway serves the same at `GET /v1/pipeline`. `params` is a JSON Schema (from the model
family's msgspec Struct, the one the broker checks every submit against), so a client in any
language can build and validate a request before it sends one.
"""

from __future__ import annotations

from typing import Any

import msgspec

from ..common.config import Config
from ..stages.families import pipeline_schema

# A pipeline whose stages name no family checks no params beyond these.
_ANY_PARAMS = {"type": "object", "description": "params are passed to the stages unchecked",
               "properties": {"time_limit_s": {"type": "number", "exclusiveMinimum": 0}}}


def describe(config: Config) -> dict[str, Any]:
    schema = pipeline_schema(config.pipeline.stages)
    stages = []
    for stage in config.pipeline.stages:
        entry = {"name": stage.name, "state": stage.job_state(), "kind": stage.kind,
                 "workers": stage.workers, "devices": stage.devices,
                 "max_attempts": stage.max_attempts, "time_limit_s": stage.time_limit_s,
                 "lease_ms": stage.lease_ms, "max_batch": stage.max_batch}
        if "family" in stage.options:
            entry["family"] = stage.options["family"]
        stages.append(entry)
    return {"name": config.pipeline.name, "stages": stages,
            "max_time_limit_s": max(s.time_limit_s for s in config.pipeline.stages),
            "params": msgspec.json.schema(schema) if schema is not None else _ANY_PARAMS}


def render(description: dict[str, Any]) -> str:
    """The description for a terminal: stages, then each param with its type and default."""
    lines = [f"pipeline {description['name']}"]
    for s in description["stages"]:
        family = f", family {s['family']}" if "family" in s else ""
        devices = f", GPUs {','.join(s['devices'])}" if s["devices"] else ""
        lines.append(f"  {s['name']:<10} kind {s['kind']}{family}, {s['workers']} worker(s)"
                     f"{devices}, time limit {s['time_limit_s']:g} s")
    params = description["params"]
    root = params.get("$defs", {}).get(params.get("$ref", "").rsplit("/", 1)[-1], params)
    lines.append("params")
    for name, prop in root.get("properties", {}).items():
        kind = prop.get("type") or "/".join(
            str(p.get("type", p.get("const", "?"))) for p in prop.get("anyOf", [])) or "enum"
        default = (f" = {prop['default']!r}" if "default" in prop
                   else "  (required)" if name in root.get("required", []) else "")
        lines.append(f"  {name:<20} {kind}{default}")
    return "\n".join(lines)
