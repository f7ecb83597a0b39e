"""Prometheus metrics (`/metrics`), all named `stagepool_*`, for the whole system.

Two sources, so that any gateway replica reports every worker and stage:
  - at scrape time, from Redis and the broker (the Observer): queue depth and oldest age per
    stage, ring occupancy, dispatch backlog, leases in flight, live workers, active jobs, dead
    letters, and the transfer counters workers add to `{ns}:transfer`;
  - continuously, from the Redis events stream (a tail thread started with the gateway):
    histograms of enqueue-to-start and stage run time, counters of retries, rewinds and ended
    jobs. jobs.lua puts the durations in the events, so the tail does no lookups. Like any
    counter they start at zero when the gateway starts; use rate() and sum one replica.
    The same tail keeps the dashboard's history (history.py).
"""

from __future__ import annotations

import logging
import threading
import time

from prometheus_client import (
    CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ...common.errors import StagepoolError
from . import history
from ...common.wire import TERMINAL_STATES
from .observe import Observer

log = logging.getLogger(__name__)

DURATION_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                      10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
_TAIL_BLOCK_MS = 1000
_TAIL_BATCH = 1000
_TAIL_RETRY_S = 1.0


class Metrics:
    """Owns its registry and the events tail thread: `start`, `render` per scrape, `stop`."""

    def __init__(self, observer: Observer):
        disable_created_metrics()  # `_created` series are noise for dashboards
        self.observer = observer
        self.history = history.History(observer.stage_names)
        self.registry = CollectorRegistry(auto_describe=False)
        labels = ["stage"]
        self.queue_wait = Histogram(
            "stagepool_queue_wait_seconds", "Time from a stage's dispatch to its start",
            labels, buckets=DURATION_BUCKETS_S, registry=self.registry)
        self.stage_duration = Histogram(
            "stagepool_stage_duration_seconds", "Time from a stage's start to its commit",
            labels, buckets=DURATION_BUCKETS_S, registry=self.registry)
        self.retries = Counter("stagepool_stage_retries", "Failed or expired attempts retried",
                               labels, registry=self.registry)
        self.rewinds = Counter("stagepool_stage_rewinds",
                               "Stages run again because their outputs were lost", labels,
                               registry=self.registry)
        self.ended = Counter("stagepool_jobs_ended", "Jobs that reached a terminal state",
                             ["state"], registry=self.registry)
        self.submitted = Counter("stagepool_jobs_submitted", "Jobs created",
                                 registry=self.registry)
        for stage in observer.stage_names:  # every series exists from the first scrape
            self.queue_wait.labels(stage)
            self.stage_duration.labels(stage)
            self.retries.labels(stage)
            self.rewinds.labels(stage)
        for state in sorted(TERMINAL_STATES):
            self.ended.labels(state)
        self._scraped = _Families()
        self.registry.register(self._scraped)
        self._render_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._tail, name="events-tail", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    # -- scrape ------------------------------------------------------------------------

    def render(self) -> bytes:
        """The exposition text: the tail's series plus a fresh read of Redis and the broker."""
        families = self._gather()
        with self._render_lock:
            self._scraped.families = families
            return generate_latest(self.registry)

    def _gather(self) -> list:
        obs = self.observer
        queues = obs.queues()

        def gauge(name, doc, labels=()):
            return GaugeMetricFamily(name, doc, labels=list(labels))

        depth = gauge("stagepool_queue_depth", "Jobs waiting for a worker of the stage",
                      ["stage"])
        oldest = gauge("stagepool_queue_oldest_age_seconds",
                       "How long the oldest waiting job of the stage has waited", ["stage"])
        ring_depth = gauge("stagepool_ring_depth", "Dispatches in the stage's ring", ["stage"])
        ring_capacity = gauge("stagepool_ring_capacity", "Slots in the stage's ring", ["stage"])
        occupancy = gauge("stagepool_ring_occupancy_ratio", "ring_depth / ring_capacity",
                          ["stage"])
        backlog = gauge("stagepool_dispatch_backlog",
                        "Dispatches waiting in the broker for ring space", ["stage"])
        in_flight = gauge("stagepool_in_flight", "Leases held by the stage's workers", ["stage"])
        workers = gauge("stagepool_workers", "Live workers registered for the stage", ["stage"])
        for q in queues.stages:
            depth.add_metric([q.stage], q.depth)
            oldest.add_metric([q.stage], q.oldest_age_s)
            if q.ring_depth is not None:
                ring_depth.add_metric([q.stage], q.ring_depth)
                ring_capacity.add_metric([q.stage], q.ring_capacity)
                occupancy.add_metric([q.stage], q.ring_depth / max(1, q.ring_capacity))
                backlog.add_metric([q.stage], q.backlog)
                in_flight.add_metric([q.stage], q.in_flight)
                workers.add_metric([q.stage], q.workers)
        broker_up = gauge("stagepool_broker_up", "1 if the broker answered this scrape")
        broker_up.add_metric([], 1 if queues.broker_up else 0)
        active = gauge("stagepool_jobs_active", "Jobs not yet ended")
        active.add_metric([], queues.totals["active"])
        dead = gauge("stagepool_dead_letters", "Jobs in the dead-letter list")
        dead.add_metric([], queues.totals["dead"])
        families = [depth, oldest, ring_depth, ring_capacity, occupancy, backlog, in_flight,
                    workers, broker_up, active, dead]
        if queues.recovered is not None:
            recovered = CounterMetricFamily(
                "stagepool_reaper_recovered", "Dispatches the broker's reaper recovered")
            recovered.add_metric([], queues.recovered)
            families.append(recovered)
        families.extend(self._transfer_families())
        families.extend(self._worker_families())
        families.extend(self._autoscale_families())
        return families

    def _autoscale_families(self) -> list:
        """`stagepool up`'s autoscaled pools (broker/autoscale.py), where it runs."""
        workers = GaugeMetricFamily("stagepool_autoscale_workers",
                                    "Workers the local autoscaler keeps for the stage",
                                    labels=["stage"])
        decisions = CounterMetricFamily("stagepool_autoscale_decisions",
                                        "Pool changes by the local autoscaler",
                                        labels=["stage", "direction"])
        for field, value in sorted(self.observer.store.autoscale_state().items()):
            stage, _, what = field.rpartition("|")
            if what == "workers":
                workers.add_metric([stage], value)
            elif what in ("up", "down"):
                decisions.add_metric([stage, what], value)
        return [workers, decisions]

    def _worker_families(self) -> list:
        """Per worker (from the broker's registry): busy, jobs done, and its GPU's figures."""
        listing = self.observer.broker_workers()
        labels = ["stage", "worker"]
        gpu_labels = labels + ["gpu"]

        def gauge(name, doc, names):
            return GaugeMetricFamily(name, doc, labels=names)

        busy = gauge("stagepool_worker_busy", "1 while the worker runs a job", labels)
        done = CounterMetricFamily("stagepool_worker_jobs_done",
                                   "Attempts the worker committed since it started", labels=labels)
        used = gauge("stagepool_gpu_memory_used_bytes",
                     "Memory in use on the worker's GPU, by every process (NVML)", gpu_labels)
        total = gauge("stagepool_gpu_memory_total_bytes", "The worker's GPU's memory (NVML)",
                      gpu_labels)
        util = gauge("stagepool_gpu_utilization_ratio",
                     "The worker's GPU's utilisation over NVML's last sample period", gpu_labels)
        reserved = gauge("stagepool_worker_gpu_reserved_bytes",
                         "GPU memory the worker's torch allocator holds", gpu_labels)
        for w in listing.workers if listing else ():
            busy.add_metric([w.stage, w.worker_id], 1 if w.busy else 0)
            done.add_metric([w.stage, w.worker_id], w.jobs_done)
            if w.gpu is not None:
                key = [w.stage, w.worker_id, str(w.gpu.index)]
                used.add_metric(key, w.gpu.memory_used_mib * 2**20)
                total.add_metric(key, w.gpu.memory_total_mib * 2**20)
                util.add_metric(key, w.gpu.utilization_pct / 100)
                reserved.add_metric(key, w.gpu.process_reserved_mib * 2**20)
        return [busy, done, used, total, util, reserved]

    def _transfer_families(self) -> list:
        labels = ["stage", "phase", "backend"]
        nbytes = CounterMetricFamily("stagepool_transfer_bytes",
                                     "Tensor bytes moved, by phase (put: into the producer's "
                                     "pool; pull: to the consumer, verified)", labels=labels)
        seconds = CounterMetricFamily("stagepool_transfer_seconds",
                                      "Time spent moving tensor bytes, by phase", labels=labels)
        ops = CounterMetricFamily("stagepool_transfer_ops", "Puts and pulls, by phase",
                                  labels=labels)
        for key, totals in sorted(self.observer.store.transfer_totals().items()):
            nbytes.add_metric(list(key), totals.get("bytes", 0))
            seconds.add_metric(list(key), totals.get("seconds", 0))
            ops.add_metric(list(key), totals.get("ops", 0))
        return [nbytes, seconds, ops]

    # -- the events tail ---------------------------------------------------------------

    def _tail(self) -> None:
        """Follow the events stream. It starts the history's window back, so the dashboard's
        history comes back with a restarted gateway; events from before this gateway's start
        feed the history only (counters start at zero, as counters do). Queue depth is
        sampled into the history every bucket."""
        store = self.observer.store
        started_ms = None
        last_id: bytes | str = "$"
        next_sample = 0.0
        while not self._stop.is_set():
            try:
                if started_ms is None:
                    started_ms = store.now_ms()
                    last_id = f"{started_ms - history.WINDOW_S * 1000}-0"
                if time.monotonic() >= next_sample:
                    next_sample = time.monotonic() + history.BUCKET_S / 2
                    depths = store.queue_stats(self.observer.stage_names)
                    self.history.depth(store.now_ms(), {
                        stage: depth for stage, (depth, _) in
                        zip(self.observer.stage_names, depths)})
                events = store.read_events(last_id, _TAIL_BATCH, _TAIL_BLOCK_MS)
            except StagepoolError as exc:
                log.warning("events tail: %s; retrying", exc)
                self._stop.wait(_TAIL_RETRY_S)
                continue
            for entry_id, fields in events:
                last_id = entry_id
                try:
                    self.observe(fields, live=int(entry_id.split(b"-")[0]) >= started_ms)
                except (ValueError, KeyError):
                    log.warning("events tail: skipped a malformed event %r", entry_id)

    def observe(self, fields: dict[bytes, bytes], live: bool = True) -> None:
        """Update the history, and (for an event after our start) the series, from one event
        of the stream."""
        name = fields.get(b"event", b"").decode()
        stage = fields.get(b"stage", b"").decode()
        ms = fields.get(b"ms", b"")
        ts_ms = fields.get(b"ts_ms", b"")
        if ts_ms:
            self.history.event(int(ts_ms), name, stage, int(ms) if ms else None)
        if not live:
            return
        if name == "submitted":
            self.submitted.inc()
        elif name == "started" and ms:
            self.queue_wait.labels(stage).observe(int(ms) / 1000)
        elif name in ("finished", "succeeded") and ms:
            self.stage_duration.labels(stage).observe(int(ms) / 1000)
        elif name == "retried":
            self.retries.labels(stage).inc()
        elif name == "rewound":
            self.rewinds.labels(stage).inc()
        if name in TERMINAL_STATES:
            self.ended.labels(name).inc()


class _Families:
    """A collector that yields what the last scrape gathered."""

    def __init__(self):
        self.families: list = []

    def collect(self):
        return iter(self.families)
