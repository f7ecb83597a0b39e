"""Faults under load, counted: a Redis killed and restarted from its append-only file, with
jobs in every stage. Every job acknowledged before the kill succeeds."""

from __future__ import annotations

import time

import pytest
import redis

from stagepool.broker.cluster import start_redis
from stagepool.common.client import BrokerClient
from stagepool.common.errors import RemoteError
from stagepool.common.jobstore import JobStore

from .conftest import Cluster, wait_ended

OUTAGE_S = 15.0


class DurableRedis:
    """redis-server with `appendfsync always` (an acknowledged write survives a SIGKILL),
    started again on the same port and files."""

    def __init__(self, data_dir):
        self.dir = data_dir
        self.process, self.url = start_redis(data_dir, True, "always")
        self.port = int(self.url.rsplit(":", 1)[1].split("/")[0])

    def start(self) -> None:
        self.process, _ = start_redis(self.dir, True, "always", self.port)

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(10)


@pytest.mark.cluster
def test_every_acknowledged_job_succeeds_across_a_redis_kill_and_restart(tmp_path, namespace,
                                                                        capsys):
    server = DurableRedis(tmp_path / "redis-data")
    cluster = Cluster(tmp_path, server.url, namespace, workers=2, sleep_ms=20)
    try:
        with BrokerClient(cluster.broker, timeout_s=30) as client:
            cluster.wait_ready(client, 2)
            answers = client.submit_many([{"job_id": f"r-{i}", "params": {}}
                                          for i in range(300)])
        acknowledged = [f"r-{i}" for i, a in enumerate(answers) if not isinstance(a, RemoteError)]
        time.sleep(0.5)  # jobs in every stage
        server.kill()
        time.sleep(OUTAGE_S)
        server.start()
        store = JobStore(server.url, namespace)
        states = wait_ended(store, acknowledged, 120)
        stuck = {j: s for j, s in zip(acknowledged, states) if s != "succeeded"}
        with capsys.disabled():  # the figures, in the test output
            print(f"\nredis kill ({OUTAGE_S:g} s): {len(acknowledged)} acknowledged, "
                  f"{states.count('succeeded')} succeeded, stuck: "
                  f"{dict(list(stuck.items())[:5])}")
        assert len(acknowledged) == 300 and not stuck
        commits = [int(store.get(j)["commits"]) for j in acknowledged]
        assert max(commits) == 1  # exactly-once commit held through it
        store.close()
    finally:
        cluster.stop()
        server.kill()


@pytest.mark.cluster
def test_a_broker_killed_under_a_deep_backlog_loses_no_job(cluster_factory, redis_server,
                                                            namespace, capsys):
    """Thousands of jobs waiting in the broker's overflow (the ring holds 256) when it dies:
    the restarted broker's rebuild walks them all while the workers end others."""
    import os
    import signal

    cluster = cluster_factory(workers=2)
    store = JobStore(redis_server.url, namespace)
    job_ids = [f"d-{i}" for i in range(6000)]
    with BrokerClient(cluster.broker, timeout_s=60) as client:
        cluster.wait_ready(client, 2)
        answers = client.submit_many([{"job_id": j, "params": {}} for j in job_ids])
        assert not [a for a in answers if isinstance(a, RemoteError)]
        backlog = sum(q.backlog for q in client.queues().queues)
        os.kill(cluster.pids()["broker"], signal.SIGKILL)
    states = wait_ended(store, job_ids, 240)
    with capsys.disabled():  # the figures, in the test output
        print(f"\nbroker kill: backlog {backlog} at the kill, {len(job_ids)} acknowledged, "
              f"{states.count('succeeded')} succeeded")
    assert backlog >= 1000
    assert states.count("succeeded") == len(job_ids)


@pytest.mark.parametrize("fsync", ["everysec", "always"])
def test_the_redis_that_up_starts_fsyncs_as_configured(tmp_path, fsync):
    process, url = start_redis(tmp_path, True, fsync)
    try:
        client = redis.Redis.from_url(url)
        assert client.config_get("appendfsync") == {"appendfsync": fsync}
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        client.close()
    finally:
        process.kill()
        process.wait(10)
