"""A pipeline file checked before anything starts: `stagepool check`, and `up`, `broker` and
`worker` before they start a process.

For each stage: its kind resolves to a Stage class (stages/plugins.py); its `options` decode
into that class's `Options` schema (unknown keys and wrong types refused, the field's path
named); a model stage's family resolves, and (where `models` says so: not on a broker's host,
which loads no model) its `model_path` is a Diffusers directory. Torch is never imported.
"""

from __future__ import annotations

from pathlib import Path

import msgspec

from ..common.config import Config
from ..common.errors import ConfigError
from . import base, plugins


def check(config: Config, models: bool | set[str] = True) -> None:
    """ConfigError naming the first bad field. `models`: check model directories of every
    stage (True), of these stages (a set), or of none (False)."""
    for index, stage in enumerate(config.pipeline.stages):
        where = f"pipeline.stages[{index}] ({stage.name})"
        try:
            cls = plugins.load(plugins.STAGES, stage.kind, base.Stage)
        except ConfigError as exc:
            raise ConfigError(f"{where}.kind: {exc}") from None
        if cls.Options is None:
            continue
        try:
            options = msgspec.convert(stage.options, cls.Options)
        except msgspec.ValidationError as exc:
            # msgspec names the field: "unknown field `model_pth`", "... - at `$.threads`"
            raise ConfigError(f"{where}.options: {exc}") from None
        family_name = getattr(options, "family", None)
        if family_name is None:
            continue
        from .families import Family

        try:
            family = plugins.load(plugins.FAMILIES, family_name, Family)
        except ConfigError as exc:
            raise ConfigError(f"{where}.options.family: {exc}") from None
        wanted = models is True or (isinstance(models, set) and stage.name in models)
        path = Path(options.model_path)
        if wanted and family.needs_model_dir and not (path / "model_index.json").is_file():
            raise ConfigError(f"{where}.options.model_path: no Diffusers model at "
                              f"{str(path)!r} for the {family_name} family (`stagepool models "
                              "init-tiny DIR` builds the tiny ones)")
        loras = getattr(options, "loras", [])
        if loras and not options.lora_dir:
            raise ConfigError(f"{where}.options.loras: set lora_dir, where they are")
        for name in loras if wanted else ():
            if not (Path(options.lora_dir) / f"{name}.safetensors").is_file():
                raise ConfigError(f"{where}.options.loras: no {name}.safetensors in "
                                  f"{options.lora_dir!r}")

