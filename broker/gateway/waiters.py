"""`GET /v1/jobs/{id}/wait`: requests parked until their job ends, woken by one subscription.

One thread follows `{ns}:ended` (jobs.lua publishes every job's end there) and wakes the
requests waiting for that job; a request registers before it reads the job's state, so an end
between the two is never missed. While Redis is away the feed reconnects; an end published
meanwhile is not seen, so a waiter also reads the state again every `RECHECK_S`.

Lifecycle: `start` with the gateway, `stop` at its end; `wait` from any request.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import defaultdict

import redis

from ...common.errors import StagepoolError
from ...common.jobstore import EndedFeed, JobStore

log = logging.getLogger(__name__)

RECHECK_S = 5.0
_RECONNECT_S = 1.0


class Waiters:
    def __init__(self, store: JobStore):
        self.store = store
        self._lock = threading.Lock()
        self._waiting: dict[str, set[asyncio.Event]] = defaultdict(set)
        self._loops: dict[asyncio.Event, asyncio.AbstractEventLoop] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="ended-feed", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)

    async def wait(self, job_id: str, timeout_s: float, ended) -> None:
        """Return once `ended()` (a blocking read of the job's state, run in a thread) says
        the job ended, or after `timeout_s`."""
        from .http import in_thread

        loop = asyncio.get_running_loop()
        event = asyncio.Event()
        with self._lock:
            self._waiting[job_id].add(event)
            self._loops[event] = loop
        try:
            deadline = loop.time() + timeout_s
            while not await in_thread(ended):
                remaining_s = deadline - loop.time()
                if remaining_s <= 0:
                    return
                try:
                    await asyncio.wait_for(event.wait(), min(remaining_s, RECHECK_S))
                except asyncio.TimeoutError:
                    pass
                event.clear()
        finally:
            with self._lock:
                self._waiting[job_id].discard(event)
                if not self._waiting[job_id]:
                    del self._waiting[job_id]
                del self._loops[event]

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                feed = EndedFeed(self.store)
                try:
                    while not self._stop.is_set():
                        item = feed.next(0.5)
                        if item is not None:
                            self._wake(item[0])
                finally:
                    feed.close()
            except (StagepoolError, redis.RedisError) as exc:
                log.warning("ended feed: %s; reconnecting", exc)
                self._stop.wait(_RECONNECT_S)
            except Exception:
                log.exception("ended feed failed; reconnecting")
                self._stop.wait(_RECONNECT_S)

    def _wake(self, job_id: str) -> None:
        with self._lock:
            events = [(e, self._loops[e]) for e in self._waiting.get(job_id, ())]
        for event, loop in events:
            loop.call_soon_threadsafe(event.set)
