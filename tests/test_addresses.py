"""Addresses that work across hosts by default (common/addresses.py), and the broker's word
on dead and revived peers."""

from __future__ import annotations

import os

import pytest

from stagepool.common import wire
from stagepool.common.addresses import as_seen_from, endpoint_host, is_local, is_loopback, \
    redact, route_to
from stagepool.common.client import BrokerClient


@pytest.mark.parametrize("offered,broker_host,seen", [
    ("tcp://0.0.0.0:5556", "10.0.0.1", "tcp://10.0.0.1:5556"),
    ("tcp://127.0.0.1:5556", "10.0.0.1", "tcp://10.0.0.1:5556"),
    ("redis://user:pw@127.0.0.1:6379/0", "10.0.0.1", "redis://user:pw@10.0.0.1:6379/0"),
    ("rediss://localhost:6380/2", "broker.example", "rediss://broker.example:6380/2"),
    ("redis://[::1]:6379/0", "fd00::1", "redis://[fd00::1]:6379/0"),
    ("tcp://10.0.0.7:5556", "10.0.0.1", "tcp://10.0.0.7:5556"),  # routable: kept
    ("tcp://127.0.0.1:5556", "127.0.0.1", "tcp://127.0.0.1:5556"),  # one host: kept
    ("", "10.0.0.1", ""),
])
def test_an_offered_local_address_means_the_brokers_host(offered, broker_host, seen):
    assert as_seen_from(offered, broker_host) == seen


def test_local_loopback_and_routes():
    assert is_local("0.0.0.0") and is_local("127.0.0.1") and is_local("localhost")
    assert not is_local("10.1.2.3") and not is_local("example.com")
    assert is_loopback("127.0.0.5") and is_loopback("::1") and not is_loopback("0.0.0.0")
    assert route_to("127.0.0.1") == "127.0.0.1"
    assert endpoint_host("tcp://10.9.8.7:5555") == "10.9.8.7"
    assert endpoint_host("ipc:///tmp/broker") == ""


def test_a_password_never_reaches_a_log_line():
    assert redact("redis://worker:s3cret@10.0.0.1:6379/0") == "redis://worker:***@10.0.0.1:6379/0"
    assert redact("redis://10.0.0.1:6379/0") == "redis://10.0.0.1:6379/0"


@pytest.mark.cluster
def test_the_broker_tells_every_worker_of_a_dead_peer_until_it_heartbeats_again(
        cluster_factory):
    cluster = cluster_factory(workers=1)
    peer = "10.0.0.9:15000"
    with BrokerClient(cluster.broker) as client:
        cluster.wait_ready(client, 1)

        def register(worker_id: str) -> None:
            client.call(wire.Register(worker_id=worker_id, stage="denoise", host="elsewhere",
                                      pid=os.getpid()))

        for worker_id in ("consumer", "other", "producer"):
            register(worker_id)
        client.call(wire.Rewind(job_id="no-such-job", stage="denoise", attempt=1,
                                worker_id="consumer", error="pull failed", dead_peer=peer))
        ack = client.call(wire.Heartbeat(worker_id="other"))
        assert ack.dead_peers == [peer] and ack.revived_peers == []
        ack = client.call(wire.Heartbeat(worker_id="producer", session=peer))  # alive after all
        assert ack.dead_peers == [] and ack.revived_peers == [peer]
        ack = client.call(wire.Heartbeat(worker_id="other"))
        assert ack.dead_peers == [] and ack.revived_peers == [peer]
        for worker_id in ("consumer", "other", "producer"):
            client.call(wire.Unregister(worker_id=worker_id))
