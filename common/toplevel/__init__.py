"""stagepool: a job system for multi-stage GPU inference.

This directory is the `stagepool` package itself (pyproject.toml maps it here, since the
repository's top level is broker/, stages/ and common/, its subpackages). What users import:

    from stagepool import Client, AsyncClient   # jobs through the HTTP gateway (common/api.py)
    from stagepool import BrokerClient          # the broker's ZMQ control socket (common/client.py)

Loaded on first use, so that a worker or the broker importing its own modules pays nothing.
"""

from importlib import import_module

_EXPORTS = {
    "Client": "stagepool.common.api",
    "AsyncClient": "stagepool.common.api",
    "BrokerClient": "stagepool.common.client",
    "StagepoolError": "stagepool.common.errors",
    "RemoteError": "stagepool.common.errors",
    "TransportError": "stagepool.common.errors",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'stagepool' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
