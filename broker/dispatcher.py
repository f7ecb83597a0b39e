"""Publishing into stage rings from the broker, with an overflow queue for backpressure.

The broker publishes a job's first dispatch on submit, and re-publishes dispatches that the
reaper recovers. When a ring is full the record waits here, in order, and `drain` (run by the
reaper thread every tick) moves it in as slots free. The job is already durable in Redis, so a
broker that dies with records here loses nothing: `Broker.rebuild` publishes them again.
"""

from __future__ import annotations

import collections
import logging
import threading

import msgspec

from ..common.ring import Ring
from ..common.wire import decode_dispatch, encode_dispatch

log = logging.getLogger(__name__)


class Dispatcher:
    def __init__(self, rings: dict[str, Ring]):
        self.rings = rings
        self._pending: dict[str, collections.deque[bytes]] = {s: collections.deque() for s in rings}
        self._lock = threading.Lock()

    def publish(self, stage: str, payload: bytes) -> None:
        """Publish now if the ring has room and nothing waits before us; else queue it."""
        with self._lock:
            pending = self._pending[stage]
            if pending or not self.rings[stage].try_produce(payload):
                pending.append(payload)

    def republish(self, stage: str, stored_dispatch: bytes, attempt: int) -> None:
        """Publish a dispatch kept in Redis, stamped with its new attempt."""
        dispatch = decode_dispatch(stored_dispatch)
        self.publish(stage, encode_dispatch(msgspec.structs.replace(dispatch, attempt=attempt)))

    def drain(self) -> None:
        with self._lock:
            for stage, pending in self._pending.items():
                ring = self.rings[stage]
                while pending and ring.try_produce(pending[0]):
                    pending.popleft()

    def backlog(self, stage: str) -> int:
        return len(self._pending[stage])
