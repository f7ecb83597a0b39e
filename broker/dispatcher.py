"""Publishing into stage rings from the broker, with an overflow queue for backpressure.

A dispatch goes into its stage's lane for its priority (common/ring/lanes.py).

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

from ..common.ring import Ring, lanes
from ..common.dispatch import decode_dispatch, encode_dispatch

log = logging.getLogger(__name__)


class Dispatcher:
    def __init__(self, lanes_by_stage: dict[str, list[Ring]]):
        self.lanes = lanes_by_stage
        self._pending: dict[tuple[str, int], collections.deque[bytes]] = {
            (stage, lane): collections.deque()
            for stage, rings in lanes_by_stage.items() for lane in range(len(rings))}
        self._lock = threading.Lock()

    def publish(self, stage: str, payload: bytes, priority: int | None = None) -> None:
        """Publish into the lane of the dispatch's priority now if it has room and nothing
        waits before us there; else queue it."""
        if priority is None:
            priority = decode_dispatch(payload).priority
        lane = lanes.lane_of(priority)
        with self._lock:
            pending = self._pending[(stage, lane)]
            if pending or not lanes.produce(self.lanes[stage], lane, payload):
                pending.append(payload)

    def republish(self, stage: str, stored_dispatch: bytes, attempt: int) -> None:
        """Publish a dispatch kept in Redis, stamped with its new attempt."""
        dispatch = decode_dispatch(stored_dispatch)
        self.publish(stage, encode_dispatch(msgspec.structs.replace(dispatch, attempt=attempt)),
                     dispatch.priority)

    def drain(self) -> None:
        with self._lock:
            for (stage, lane), pending in self._pending.items():
                while pending and lanes.produce(self.lanes[stage], lane, pending[0]):
                    pending.popleft()

    def backlog(self, stage: str) -> int:
        return sum(len(q) for (s, _), q in self._pending.items() if s == stage)
