"""The dashboard's history: per stage and per `BUCKET_S`, over the last `WINDOW_S`, the
attempts that finished and failed, their run time, and the queue depth.

Kept by the gateway, so that it survives a page reload. The attempt counts come from the
Redis events stream: the metrics tail (metrics.py) starts `WINDOW_S` back in the stream and
hands every event here, so a restarted gateway has its history again as far back as the
stream holds. Queue depth is not an event: it is sampled every `BUCKET_S` from Redis, from the
gateway's start.
"""

from __future__ import annotations

import threading

import msgspec

BUCKET_S = 10
WINDOW_S = 3600
_FAILURES = ("retried", "failed", "dead", "expired")


class Point(msgspec.Struct):
    ts_ms: int  # the bucket's start
    depth: dict[str, int] = {}  # the last sample in the bucket
    done: dict[str, int] = {}  # attempts committed
    failed: dict[str, int] = {}  # attempts that failed (retried, or ended the job)
    run_ms: dict[str, int] = {}  # the committed attempts' run time, summed


class HistoryView(msgspec.Struct):
    bucket_s: int
    window_s: int
    stages: list[str]
    points: list[Point]  # oldest first; buckets with nothing in them are absent


class History:
    """Thread-safe: the tail thread writes, requests read."""

    def __init__(self, stages: list[str]):
        self.stages = stages
        self._points: dict[int, Point] = {}
        self._lock = threading.Lock()

    def _bucket(self, ts_ms: int) -> Point:
        start = ts_ms - ts_ms % (BUCKET_S * 1000)
        point = self._points.get(start)
        if point is None:
            point = self._points[start] = Point(ts_ms=start, depth={}, done={}, failed={},
                                                run_ms={})
            oldest = start - WINDOW_S * 1000
            for key in [k for k in self._points if k < oldest]:
                del self._points[key]
        return point

    def event(self, ts_ms: int, name: str, stage: str, ms: int | None) -> None:
        if stage not in self.stages:
            return
        with self._lock:
            point = self._bucket(ts_ms)
            if name in ("finished", "succeeded"):
                point.done[stage] = point.done.get(stage, 0) + 1
                point.run_ms[stage] = point.run_ms.get(stage, 0) + (ms or 0)
            elif name in _FAILURES:
                point.failed[stage] = point.failed.get(stage, 0) + 1

    def depth(self, ts_ms: int, depths: dict[str, int]) -> None:
        with self._lock:
            self._bucket(ts_ms).depth = dict(depths)

    def view(self) -> HistoryView:
        with self._lock:
            points = [msgspec.structs.replace(p, depth=dict(p.depth), done=dict(p.done),
                                              failed=dict(p.failed), run_ms=dict(p.run_ms))
                      for _, p in sorted(self._points.items())]
        return HistoryView(bucket_s=BUCKET_S, window_s=WINDOW_S, stages=self.stages,
                           points=points)
