"""Priority lanes: a worker takes the highest priority first, and the lower lanes still get
their turn. Real clusters, real Redis."""

from __future__ import annotations

import pytest

from stagepool.common.client import BrokerClient
from stagepool.common.jobstore import JobStore
from stagepool.common.ring import lanes

from .conftest import wait_ended
from .test_stop import STEPS, _hold_denoise

pytestmark = pytest.mark.cluster


def _denoise_started_ms(store: JobStore, job_ids: list[str]) -> dict[str, int]:
    return {job_id: int(store.get(job_id)["denoise.started_ms"]) for job_id in job_ids}


def test_queued_jobs_start_in_priority_order(cluster_factory, redis_server, namespace):
    cluster = cluster_factory(workers=1, stage_extra=STEPS, lease_ms=5000)
    store = JobStore(redis_server.url, namespace)
    with BrokerClient(cluster.broker) as client:
        cluster.wait_ready(client, 1)
        _hold_denoise(client, store, "blocker", 60, 20)
        for job_id, priority in [("low", -3), ("normal", 0), ("high", 7)]:
            client.submit({}, job_id=job_id, priority=priority)
        assert set(wait_ended(store, ["blocker", "low", "normal", "high"], 60)) == {"succeeded"}
    started = _denoise_started_ms(store, ["high", "normal", "low"])
    assert started["high"] <= started["normal"] <= started["low"], started


def test_a_stream_of_urgent_jobs_does_not_starve_a_low_one(cluster_factory, redis_server,
                                                           namespace):
    cluster = cluster_factory(workers=1, stage_extra=STEPS, lease_ms=5000)
    store = JobStore(redis_server.url, namespace)
    urgent = [f"urgent-{i}" for i in range(2 * lanes.LOW_FIRST_EVERY)]
    with BrokerClient(cluster.broker) as client:
        cluster.wait_ready(client, 1)
        _hold_denoise(client, store, "blocker", 40, 20)
        client.submit({}, job_id="low", priority=-1)
        for job_id in urgent:
            client.submit({"slow_stage": "denoise", "steps": 2, "step_ms": 20}, job_id=job_id,
                          priority=1)
        assert set(wait_ended(store, ["blocker", "low", *urgent], 60)) == {"succeeded"}
    started = _denoise_started_ms(store, ["low", *urgent])
    before_low = sum(started[u] < started["low"] for u in urgent)
    assert before_low < lanes.LOW_FIRST_EVERY, f"{before_low} urgent jobs went first"
