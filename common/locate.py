"""Finding a running deployment: the addresses a client uses, from the flags and environment
it was given or from the `cluster.json` that `stagepool up` writes in its state dir.

    STAGEPOOL_STATE_DIR         the state dir (default ./.stagepool)
    STAGEPOOL_BROKER_ENDPOINT   the broker's control socket
    STAGEPOOL_GATEWAY_URL       the HTTP gateway
    STAGEPOOL_REDIS_URL         Redis (the ingress stream, redis-cli)

`stagepool env` prints these for the running cluster, so that every example in the docs
(redis-cli, Node, Python) runs as written after `eval "$(stagepool env)"`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

DEFAULT_STATE_DIR = ".stagepool"
DEFAULT_GATEWAY_URL = "http://127.0.0.1:8000"


def state_dir(given: str | os.PathLike | None = None) -> Path:
    return Path(given or os.environ.get("STAGEPOOL_STATE_DIR") or DEFAULT_STATE_DIR)


def running(given: str | os.PathLike | None = None) -> dict | None:
    """The `cluster.json` of the cluster running in the state dir, or None."""
    path = state_dir(given) / "cluster.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def gateway_url(given_state_dir: str | os.PathLike | None = None) -> str:
    if os.environ.get("STAGEPOOL_GATEWAY_URL"):
        return os.environ["STAGEPOOL_GATEWAY_URL"]
    info = running(given_state_dir)
    return (info or {}).get("gateway") or DEFAULT_GATEWAY_URL
