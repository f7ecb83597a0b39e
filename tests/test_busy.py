"""A deployment full to the brim refuses new jobs as busy (ZMQ "busy", HTTP 429 with
Retry-After) and creates none of them; the ingress stream's jobs wait in the stream instead,
and run once there is room. Nothing accepted is lost."""

from __future__ import annotations

import concurrent.futures
import json

import httpx
import pytest

from stagepool.common.client import BrokerClient
from stagepool.common.errors import Code, RemoteError
from stagepool.common.jobstore import JobStore

from .conftest import wait_ended

pytestmark = pytest.mark.cluster


def test_a_full_first_ring_and_backlog_refuse_submits_as_busy_and_ingress_waits(
        cluster_factory, redis_server, namespace, monkeypatch):
    monkeypatch.setenv("STAGEPOOL_RING_CAPACITY", "16")
    monkeypatch.setenv("STAGEPOOL_BROKER_MAX_BACKLOG", "8")
    monkeypatch.setenv("STAGEPOOL_BROKER_BUSY_RETRY_AFTER_S", "0.5")
    cluster = cluster_factory(workers=1, sleep_ms=100)
    store = JobStore(redis_server.url, namespace)
    with BrokerClient(cluster.broker, timeout_s=30) as client:
        cluster.wait_ready(client, 1)
        answers = client.submit_many([{"job_id": f"z-{i}", "params": {}} for i in range(60)])
        accepted = [f"z-{i}" for i, a in enumerate(answers) if not isinstance(a, RemoteError)]
        busy = [a for a in answers if isinstance(a, RemoteError)]
        # At most the ring, the backlog and a claimed slot or two take jobs; the rest are busy.
        assert 16 + 8 <= len(accepted) <= 16 + 8 + 4, len(accepted)
        assert busy and all(a.code == Code.BUSY and a.retry_after_s == 0.5 for a in busy)
        assert "submit again later" in busy[0].message
        # Twenty at once over HTTP: a slot the worker frees meanwhile takes one or two, the
        # rest are refused (however slowly this machine answers each).
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            posts = list(pool.map(lambda i: (f"h-{i}", httpx.post(
                f"{cluster.gateway}/v1/jobs", json={"params": {}, "job_id": f"h-{i}"},
                timeout=30)), range(20)))
        accepted += [job_id for job_id, http in posts if http.status_code == 201]
        refused_http = [(job_id, http) for job_id, http in posts if http.status_code != 201]
        assert refused_http, "no HTTP submit was refused while the pipeline was full"
        for _, http in refused_http:
            assert http.status_code == 429 and http.headers["Retry-After"] == "1"
            assert http.json()["code"] == "busy"
        for i in range(10):  # from any language, while it is busy: they wait in the stream
            store.redis.xadd(store.keys.ingress, {"job": json.dumps({"job_id": f"in-{i}"})})
        ingress = [f"in-{i}" for i in range(10)]
        states = wait_ended(store, accepted + ingress, 120)
    assert set(states) == {"succeeded"}
    refused = {f"z-{i}" for i, a in enumerate(answers) if isinstance(a, RemoteError)}
    refused.update(job_id for job_id, _ in refused_http)
    assert all(store.get(job_id) is None for job_id in refused)  # nothing half-created
