"""Plugins by name: stage kinds and model families, built in or the user's own.

A name is either `module:Class` (imported as is: `kind = "mypkg.stages:Upscale"`) or the name
of an entry point in the plugin's group: `stagepool.stages` for stage kinds,
`stagepool.families` for model families. The built-in ones are entry points of this
distribution (pyproject.toml), so a user's package registers its own the same way, without
editing ours.
"""

from __future__ import annotations

import importlib
from importlib import metadata

from ..common.errors import ConfigError

STAGES = "stagepool.stages"
FAMILIES = "stagepool.families"


def load(group: str, name: str, base: type) -> type:
    """The class `name` stands for in `group`; ConfigError when there is none, or when it is
    not a subclass of `base`."""
    what = "stage kind" if group == STAGES else "model family"
    if ":" in name:
        module, _, attr = name.partition(":")
        try:
            found = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:
            raise ConfigError(f"cannot load {what} {name!r}: {exc}") from exc
    else:
        points = metadata.entry_points(group=group, name=name)
        if not points:
            known = sorted({p.name for p in metadata.entry_points(group=group)})
            raise ConfigError(f"unknown {what} {name!r}; known: {', '.join(known)}, "
                              f"or name one as module:Class")
        found = next(iter(points)).load()
    if not (isinstance(found, type) and issubclass(found, base)):
        raise ConfigError(f"{what} {name!r} is {found!r}, not a subclass of {base.__name__}")
    return found
