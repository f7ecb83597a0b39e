"""Malformed frames and ingress entries get clear errors and change nothing else."""

from __future__ import annotations

import json
import time

import msgspec
import pytest
import zmq

from stagepool.common import wire
from stagepool.common.client import BrokerClient
from stagepool.common.jobstore import JobStore

pytestmark = pytest.mark.cluster


@pytest.fixture
def raw(cluster):
    """A plain DEALER on the broker, as a client in another language would hold one."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 5000)
    sock.connect(cluster.broker)
    yield sock
    sock.close()


def _json_call(sock, message: dict) -> dict:
    sock.send(json.dumps(message).encode())
    return json.loads(sock.recv())


@pytest.fixture
def cluster(cluster_factory):
    cluster = cluster_factory(workers=1)
    with BrokerClient(cluster.broker) as client:
        cluster.wait_ready(client, 1)
    return cluster


BAD_FRAMES = [
    (b"\xc1\xc1 not msgpack", "bad_request", "undecodable msgpack"),
    (b'{"type": "submit", "params": 7}', "bad_request", "Expected `object`"),
    (b'{"type": "launch_missiles"}', "bad_request", "Invalid value 'launch_missiles'"),
    (b"{not json", "bad_request", "undecodable JSON"),
    (b"\x80" * (wire.MAX_FRAME_BYTES + 1), "too_large", "limit"),
]


@pytest.mark.parametrize("frame,code,text", BAD_FRAMES)
def test_a_malformed_frame_gets_a_clear_error_and_the_broker_keeps_serving(cluster, raw, frame,
                                                                           code, text):
    sock = raw
    sock.send(frame)
    reply = msgspec.msgpack.decode(sock.recv()) if frame[:1] != b"{" else json.loads(sock.recv())
    assert reply["type"] == "error" and reply["code"] == code and text in reply["message"]
    with BrokerClient(cluster.broker) as client:
        assert client.submit({}, job_id="after-bad-frame").created


def test_requests_before_hello_are_refused(raw):
    sock = raw
    reply = _json_call(sock, {"type": "submit", "params": {}})
    assert reply["code"] == "handshake_required"


def test_a_wrong_protocol_version_is_refused(raw):
    sock = raw
    reply = _json_call(sock, {"type": "hello", "version": 99})
    assert reply["code"] == "version_mismatch"


def test_a_json_client_is_answered_in_json(raw):
    sock = raw
    assert _json_call(sock, {"type": "hello", "version": 1})["type"] == "welcome"
    reply = _json_call(sock, {"type": "submit", "params": {"prompt": "x"}, "job_id": "js-1",
                              "rid": 7})
    assert reply == {"type": "submitted", "job_id": "js-1", "created": True, "rid": 7}


@pytest.mark.parametrize("job_id", ["has space", "x" * 65, "semi;colon", ""])
def test_a_bad_job_id_is_refused_with_the_rule(raw, job_id):
    sock = raw
    _json_call(sock, {"type": "hello", "version": 1})
    reply = _json_call(sock, {"type": "submit", "params": {}, "job_id": job_id})
    assert reply["code"] == "bad_request" and "job id must match" in reply["message"]


def test_json_that_opens_with_whitespace_is_answered_in_json_even_when_it_is_bad(raw):
    raw.send(b'\n  {"type": "hello", "version": "one"}')
    assert raw.poll(5000)
    reply = json.loads(raw.recv())
    assert reply["type"] == "error" and reply["code"] == "bad_request"


def test_oversize_params_are_refused(raw):
    sock = raw
    _json_call(sock, {"type": "hello", "version": 1})
    reply = _json_call(sock, {"type": "submit", "params": {"p": "x" * (wire.MAX_PARAMS_BYTES)}})
    assert reply["code"] == "bad_request" and "params of" in reply["message"]


def test_multi_part_messages_are_refused(raw):
    sock = raw
    sock.send_multipart([b'{"type": "hello", "version": 1}', b"extra"])
    reply = msgspec.msgpack.decode(sock.recv())  # no JSON seen: the broker answers msgpack
    assert reply["code"] == "bad_request" and "exactly one frame" in reply["message"]


def test_bad_ingress_entries_are_reported_and_good_ones_still_run(cluster, redis_server,
                                                                  namespace):
    store = JobStore(redis_server.url, namespace)
    ingress = store.keys.ingress
    store.redis.xadd(ingress, {"nojob": "x"})
    store.redis.xadd(ingress, {"job": "{broken"})
    store.redis.xadd(ingress, {"job": json.dumps({"job_id": "typed-wrong", "params": 5})})
    store.redis.xadd(ingress, {"job": json.dumps({"job_id": "bad id!", "params": {}})})
    store.redis.xadd(ingress, {"job": json.dumps({"job_id": "good", "params": {}})})
    deadline = time.monotonic() + 30
    while store.states(["good"]) != ["succeeded"]:
        assert time.monotonic() < deadline, store.get("good")
        time.sleep(0.1)
    record = store.get("typed-wrong")
    assert record["state"] == "failed" and "rejected at ingress" in record["error"]
    rejected = [f for _, f in store.redis.xrange(store.keys.events) if f[b"event"] == b"rejected"]
    assert len(rejected) == 4
    assert store.redis.xpending(ingress, "stagepool")["pending"] == 0


def test_a_request_that_does_not_decode_is_answered_to_the_call_that_sent_it(cluster):
    """A submit whose params are not an object fails its own call at once (its error carries
    the request's rid), rather than leaving the client waiting for a reply that never
    matches."""
    import time

    from stagepool.common.errors import RemoteError

    with BrokerClient(cluster.broker, timeout_s=10) as client:
        started = time.monotonic()
        with pytest.raises(RemoteError) as refused:
            client.submit([1, 2], job_id="not-an-object")
        assert time.monotonic() - started < 5
        assert refused.value.code == "bad_request" and "Expected `object`" in str(refused.value)
        assert client.submit({}, job_id="after-it").created


@pytest.mark.parametrize("params,text", [("[1,2]", "must be a JSON object"),
                                         ("{bad", "is not JSON")])
def test_the_cli_refuses_params_it_cannot_send_with_a_clear_error(cluster, params, text):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "stagepool.broker.cli", "submit", "--broker",
                          cluster.broker, "--params", params], capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 1 and text in out.stderr and "Traceback" not in out.stderr
