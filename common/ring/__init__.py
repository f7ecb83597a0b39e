"""Rings: the scheduling hot path (layout.py has the numbers, protocol.py the protocol).

`protocol.Ring` is the queue, written once against `base.RemoteMemory`; `shm`, `tcp` and
`verbs` are the backends. `open_memory` picks one from a broker's `RingAttach`.
"""

from __future__ import annotations

import socket

from ..errors import RingError
from .base import RemoteMemory
from .layout import Layout
from .cells import Lease
from .protocol import Claim, Ring

__all__ = ["Claim", "Layout", "Lease", "RemoteMemory", "Ring", "open_memory"]


def open_memory(attach, transport: str, *, verbs_connect=None, verbs_device: str = "",
                key: bytes | None = None) -> RemoteMemory:
    """Open a ring's memory by `transport` ("auto" = shm when on the broker's host, else tcp)."""
    if transport == "auto":
        transport = "shm" if attach.host == socket.gethostname() and attach.shm_name else "tcp"
    if transport == "shm":
        from .shm import ShmMemory

        return ShmMemory(attach.shm_name)
    if transport == "tcp":
        from .tcp import TcpMemory

        if not attach.tcp_endpoint:
            raise RingError("the broker offers no tcp ring endpoint (ring.tcp_bind is off)")
        return TcpMemory(attach.tcp_endpoint, attach.stage, key=key)
    if transport == "verbs":
        from .verbs import VerbsMemory

        if not attach.verbs:
            raise RingError("the broker offers no verbs endpoint (ring.verbs_device is unset)")
        return VerbsMemory(verbs_device or attach.verbs["device"], attach.stage, verbs_connect)
    raise RingError(f"unknown ring transport {transport!r}")
