"""Hostile input against a real broker: 5,000 generated control frames and 2,000 ingress
entries, interleaved with valid jobs. The broker never exits, every frame gets an answer,
every entry is acknowledged, and every valid job succeeds."""

from __future__ import annotations

import json
import random
import time

import msgspec
import pytest
import zmq

from stagepool.common import wire
from stagepool.common.client import BrokerClient
from stagepool.common.jobstore import JobStore

from .conftest import wait_ended

pytestmark = pytest.mark.cluster

SEED = 20261125
FRAMES = 5000
ENTRIES = 2000
VALID_JOBS = 100

_VALID = [
    {"type": "submit", "params": {"prompt": "x"}, "job_id": "fuzz-valid"},
    {"type": "status", "job_id": "a"},
    {"type": "cancel", "job_id": "a"},
    {"type": "queues"},
    {"type": "workers"},
    {"type": "heartbeat", "worker_id": "w"},
    {"type": "register", "worker_id": "w", "stage": "encode", "host": "h", "pid": 1},
    {"type": "rewind", "job_id": "a", "stage": "denoise", "attempt": 1, "worker_id": "w"},
]


def _nested(depth: int, as_json: bool) -> bytes:
    if as_json:
        return b'{"type": "submit", "params": {"a": ' + b"[" * depth + b"]" * depth + b"}}"
    return (msgspec.msgpack.encode({"type": "submit", "params": {"a": 0}})[:-1]
            + b"\x91" * depth + b"\x00")


def _frame(rng: random.Random) -> bytes:
    kind = rng.randrange(10)
    base = dict(rng.choice(_VALID))
    as_json = rng.random() < 0.5
    encode = msgspec.json.encode if as_json else msgspec.msgpack.encode
    if kind == 0:
        return rng.randbytes(rng.randrange(0, 200))
    if kind == 1:  # a valid frame with a few bytes flipped
        frame = bytearray(encode(base))
        for _ in range(rng.randrange(1, 4)):
            frame[rng.randrange(len(frame))] = rng.randrange(256)
        return bytes(frame)
    if kind == 2:  # invalid UTF-8 inside a string
        frame = encode({**base, "job_id": "PLACEHOLDER"})
        return frame.replace(b"PLACEHOLDER", b"ab\xff\xfe\xc0cd"[:rng.randrange(3, 7)] + b"xxxxx")
    if kind == 3:
        return _nested(rng.choice([100, 1000, 5000, 50000]), as_json)
    if kind == 4:  # integers past 64 bits
        big = rng.choice([2**64, 2**70, -(2**70)])
        return msgspec.json.encode({"type": "submit", "params": {}, "priority": big,
                                    "deadline_ms": big, "rid": big})
    if kind == 5:  # an Ext value in params
        return msgspec.msgpack.encode({"type": "submit",
                                       "params": {"x": msgspec.msgpack.Ext(5, b"\x00" * 8)}})
    if kind == 6:  # wrong types
        return encode({**base, "job_id": rng.choice([7, [], {}, None, 1.5]),
                       "params": rng.choice([[1], "p", 3])})
    if kind == 7:  # huge fields (below the frame limit, above the params limit)
        return encode({"type": "submit", "params": {"p": "x" * rng.choice([70_000, 900_000])}})
    if kind == 8:  # unknown tags and fields
        return encode({**base, "type": rng.choice(["nope", "", "submitx", 5])})
    return encode(base)


def _entry(rng: random.Random) -> bytes:
    kind = rng.randrange(6)
    if kind == 0:
        return rng.randbytes(rng.randrange(0, 100))
    if kind == 1:
        return b'{"job_id": "ok-\xff\xfe", "params": {}}'
    if kind == 2:
        return b'{"params": ' + b"[" * 50000 + b"]" * 50000 + b"}"
    if kind == 3:
        return json.dumps({"params": {}, "priority": 2**70}).encode()
    if kind == 4:
        return json.dumps({"params": [1, 2], "job_id": 5}).encode()
    return b'{"job_id": "bad id with spaces"}'


def test_fuzzed_frames_and_entries_never_stop_the_broker_and_valid_jobs_succeed(
        cluster_factory, redis_server, namespace, capsys):
    rng = random.Random(SEED)
    cluster = cluster_factory(workers=1)
    broker_pid = cluster.pids()["broker"]
    store = JobStore(redis_server.url, namespace)
    ctx = zmq.Context.instance()
    greeted, stranger = ctx.socket(zmq.DEALER), ctx.socket(zmq.DEALER)
    valid: list[str] = []
    sent = replies = 0
    try:
        for sock in (greeted, stranger):
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(cluster.broker)
        greeted.send(msgspec.msgpack.encode(wire.Hello(version=wire.PROTOCOL_VERSION, client="fuzz",
                                                       schema=wire.schema_hash())))
        assert greeted.poll(10_000) and isinstance(
            msgspec.msgpack.decode(greeted.recv(), type=wire.Reply), wire.Welcome)
        with BrokerClient(cluster.broker, timeout_s=30) as client:
            cluster.wait_ready(client, 1)
            for chunk in range(FRAMES // 100):
                for _ in range(100):  # before and after hello
                    (greeted if rng.random() < 0.5 else stranger).send(_frame(rng))
                    sent += 1
                job_id = f"valid-{chunk}"
                client.submit({"seed": chunk}, job_id=job_id)
                valid.append(job_id)
            for i in range(ENTRIES):
                if i % (ENTRIES // VALID_JOBS) == 0:
                    job_id = f"ingress-valid-{i}"
                    body = json.dumps({"job_id": job_id, "params": {"seed": i}}).encode()
                    valid.append(job_id)
                else:
                    body = _entry(rng)
                store.redis.xadd(store.keys.ingress, {"job": body})
            deadline = time.monotonic() + 60
            poller = zmq.Poller()
            poller.register(greeted, zmq.POLLIN)
            poller.register(stranger, zmq.POLLIN)
            while replies < sent and time.monotonic() < deadline:
                for sock, _ in poller.poll(1000):
                    sock.recv()
                    replies += 1
            states = wait_ended(store, valid, 120)
            assert client.queues().queues  # the broker still answers
            deadline = time.monotonic() + 60
            while store.redis.xpending(store.keys.ingress, "stagepool")["pending"]:
                assert time.monotonic() < deadline, "ingress entries left unacknowledged"
                time.sleep(0.1)
    finally:
        greeted.close(0)
        stranger.close(0)
    rejected = sum(1 for _, f in store.redis.xrange(store.keys.events)
                   if f.get(b"event") == b"rejected")
    with capsys.disabled():  # the figures, in the test output
        print(f"\nfuzz: {sent} frames sent, {replies} answered; {ENTRIES} ingress entries, "
              f"{rejected} rejected; {len(valid)} valid jobs, "
              f"{states.count('succeeded')} succeeded; broker pid {broker_pid} -> "
              f"{cluster.pids()['broker']}")
    assert replies == sent
    assert states.count("succeeded") == len(valid)
    assert cluster.pids()["broker"] == broker_pid, "the broker was restarted"
    assert rejected >= (ENTRIES - VALID_JOBS) * 0.9
    assert store.redis.xlen(store.keys.ingress_rejected) == rejected  # kept for inspection
