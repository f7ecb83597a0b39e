"""The local autoscaler: `stagepool up` sizes each stage's pool from its queue, by the policy
that deploy/k8s/components/keda gives KEDA, so that a user sees it work before a cluster.

Per autoscaled stage (`autoscale = {min, max, target_depth, cooldown_s}`), every tick:

    load    = jobs waiting for the stage + jobs its workers hold   (Redis, the broker)
    desired = ceil(load / target_depth), within [min, max]

Up at once (a queue is work waiting now). Down one worker at a time, once `desired` has stayed
below the pool for `cooldown_s` (a burst's gaps must not cost a model load each); the worker
leaves by draining (SIGTERM: it finishes its job first), an idle one first. Counting the held
jobs keeps a busy pool from being scaled in under its running jobs. While the broker is
unreachable, nothing changes (KEDA's `fallback` does the same).

`Autoscaler.decide` is the policy alone (pure, unit-tested); `Cluster` applies it.
"""

from __future__ import annotations

import logging
import math
import signal
import time
from dataclasses import dataclass, field

from ..common.client import BrokerClient
from ..common.config import AutoscaleConfig
from ..common.errors import StagepoolError
from ..common.jobstore import JobStore
from ..common.security import Keys

log = logging.getLogger(__name__)


@dataclass
class Decision:
    stage: str
    current: int
    desired: int
    load: int

    @property
    def direction(self) -> str:
        return "up" if self.desired > self.current else "down"


@dataclass
class _StageState:
    below_since: float | None = None  # monotonic: since when the desired size is below the pool
    last: int = 0  # the last desired size, for the metric


@dataclass
class Autoscaler:
    policies: dict[str, AutoscaleConfig]
    _state: dict[str, _StageState] = field(default_factory=dict)

    def target(self, stage: str, load: int) -> int:
        policy = self.policies[stage]
        return max(policy.min, min(policy.max, math.ceil(load / policy.target_depth)))

    def decide(self, stage: str, current: int, waiting: int, in_flight: int,
               now: float) -> Decision | None:
        """What to do with `stage`'s pool of `current` workers: a Decision to move it (up to
        the target at once, down by one), or None to hold."""
        state = self._state.setdefault(stage, _StageState())
        load = waiting + in_flight
        desired = self.target(stage, load)
        state.last = desired
        if desired > current:
            state.below_since = None
            return Decision(stage, current, desired, load)
        if desired == current:
            state.below_since = None
            return None
        if state.below_since is None:
            state.below_since = now
        if now - state.below_since < self.policies[stage].cooldown_s:
            return None
        state.below_since = now  # the next step down waits a full cooldown again
        return Decision(stage, current, current - 1, load)


class PoolScaler:
    """Applies an Autoscaler to a `Cluster`'s pools once a second: reads each stage's waiting
    jobs (Redis) and held jobs (the broker), adds workers or drains one, and records each
    decision (a log line; `{ns}:autoscale` in Redis, which the gateway's /metrics reports)."""

    TICK_S = 1.0

    def __init__(self, cluster, autoscaler: Autoscaler):
        self.cluster = cluster
        self.autoscaler = autoscaler
        self.policies = autoscaler.policies
        self._next = 0.0
        self._store: JobStore | None = None
        self._client: BrokerClient | None = None
        self._recorded: dict[str, int] = {}  # the pool sizes last written to Redis

    def tick(self, info: dict) -> bool:
        """One look at the queues, when due; True when a pool changed."""
        now = time.monotonic()
        if now < self._next:
            return False
        self._next = now + self.TICK_S
        config = self.cluster.config
        stages = list(self.policies)
        try:
            if self._store is None:
                self._store = JobStore(self.cluster.redis_url, config.redis.namespace)
            if self._client is None:
                self._client = BrokerClient(info["broker"], timeout_s=2, name="up-autoscaler",
                                            keys=Keys.from_config(config))
            waiting = dict(zip(stages, (depth for depth, _ in self._store.queue_stats(stages))))
            held = {q.stage: q.in_flight for q in self._client.queues().queues}
        except StagepoolError as exc:  # the broker or Redis is away: hold every pool
            log.debug("autoscale: no reading (%s); holding", exc)
            self.close()
            return False
        changed = False
        for stage in stages:
            pool = self.cluster.pool(stage)
            decision = self.autoscaler.decide(stage, len(pool), waiting[stage],
                                              held.get(stage, 0), now)
            if decision is None:
                continue
            policy = self.policies[stage]
            log.info("autoscale %s: %d -> %d workers (load %d: %d waiting, %d held; target "
                     "%g per worker, range %d-%d)", stage, decision.current, decision.desired,
                     decision.load, waiting[stage], held.get(stage, 0), policy.target_depth,
                     policy.min, policy.max)
            if decision.direction == "up":
                for _ in range(decision.desired - decision.current):
                    self.cluster.add_worker(stage)
            else:
                leaving = self._idlest(pool)
                leaving.retiring = True
                leaving.signal(signal.SIGTERM)  # drains: its job in hand finishes first
            self._record(f"{stage}|{decision.direction}")
            changed = True
        sizes = {f"{stage}|workers": len(self.cluster.pool(stage)) for stage in stages}
        if sizes != self._recorded:  # the gauge's source, written when a pool changed
            self._store.redis.hset(self._store.keys.autoscale, mapping=sizes)
            self._recorded = sizes
        return changed

    def _idlest(self, pool: list) -> object:
        """An idle worker if the broker knows one, else the newest."""
        try:
            busy = {w.pid for w in self._client.workers().workers if w.busy}
        except StagepoolError:
            busy = set()
        idle = [c for c in pool if c.process and c.process.pid not in busy]
        return (idle or pool)[-1]

    def _record(self, field: str) -> None:
        self._store.redis.hincrby(self._store.keys.autoscale, field, 1)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
        if self._store is not None:
            self._store.close()
            self._store = None
        self._recorded = {}  # a new connection (Redis may have restarted): write again
