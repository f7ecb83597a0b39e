"""Network surfaces beyond loopback: CURVE on ZMQ, a keyed MAC on the tcp ring, and refusal
to bind wide without keys."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import msgspec
import pytest

from stagepool.broker.cluster import free_port
from stagepool.common.client import BrokerClient
from stagepool.common.config import Config, TransferConfig
from stagepool.common.errors import ConfigError, TransportError
from stagepool.common.ring import Layout, Ring
from stagepool.common.ring.shm import ShmMemory
from stagepool.common.ring.tcp import TcpMemory
from stagepool.common.ring.tcpserver import TcpRingServer
from stagepool.common.security import Keys, generate, require
from stagepool.common.transfer import Exchange


@pytest.fixture
def keys(tmp_path):
    generate(tmp_path / "keys")
    return Keys.load(tmp_path / "keys")


def test_keys_generate_writes_two_pairs_with_private_secrets_and_never_overwrites(tmp_path):
    out = subprocess.run([sys.executable, "-m", "stagepool.broker.cli", "keys", "generate",
                          str(tmp_path / "k")], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    names = sorted(p.name for p in (tmp_path / "k").iterdir())
    assert names == ["client.key", "client.key_secret", "server.key", "server.key_secret"]
    for name in ("client.key_secret", "server.key_secret"):
        assert stat.S_IMODE(os.stat(tmp_path / "k" / name).st_mode) == 0o600
    again = subprocess.run([sys.executable, "-m", "stagepool.broker.cli", "keys", "generate",
                            str(tmp_path / "k")], capture_output=True, text=True, timeout=60)
    assert again.returncode == 1 and "not overwritten" in again.stderr


@pytest.mark.parametrize("what,address", [("broker.endpoint", "tcp://0.0.0.0:5555"),
                                          ("ring.tcp_bind", "tcp://10.1.2.3:0"),
                                          ("the release-notice socket", "192.168.1.5")])
def test_a_bind_beyond_loopback_without_keys_is_refused_unless_insecure(what, address, keys):
    with pytest.raises(ConfigError, match="beyond loopback"):
        require(what, address, None, insecure=False)
    require(what, address, None, insecure=True)
    require(what, address, keys, insecure=False)
    require(what, "tcp://127.0.0.1:5555", None, insecure=False)


def test_a_worker_pool_on_a_routable_address_needs_keys_for_its_release_notices(keys):
    config = TransferConfig(backend="local", pool_mb=1, host="0.0.0.0")
    with pytest.raises(ConfigError, match="release-notice"):
        Exchange(config)
    exchange = Exchange(config, keys)
    exchange.close()


@pytest.mark.cluster
def test_the_broker_speaks_curve_only_to_clients_with_the_key(tmp_path, keys, redis_server,
                                                               namespace):
    port = free_port()
    config = tmp_path / "p.toml"
    config.write_text(f"""
[pipeline]
name = "noop"
[[pipeline.stages]]
name = "work"
[redis]
url = "{redis_server.url}"
namespace = "{namespace}"
[broker]
endpoint = "tcp://0.0.0.0:{port}"
[security]
keys_dir = "{keys.directory}"
""")
    log = open(tmp_path / "broker.log", "wb")
    broker = subprocess.Popen([sys.executable, "-m", "stagepool.broker.cli", "broker",
                               "--config", str(config)], stdout=log, stderr=subprocess.STDOUT)
    try:
        endpoint = f"tcp://127.0.0.1:{port}"
        client = None
        for _ in range(100):
            try:
                client = BrokerClient(endpoint, timeout_s=1, keys=keys)
                break
            except TransportError:
                assert broker.poll() is None, (tmp_path / "broker.log").read_text()
        assert client is not None
        assert client.submit({}, job_id="curve-1").job_id == "curve-1"
        client.close()
        with pytest.raises(TransportError):
            BrokerClient(endpoint, timeout_s=1, keys=None)  # plain: the handshake never ends
        other = tmp_path / "other"
        generate(other)
        with pytest.raises(TransportError):
            BrokerClient(endpoint, timeout_s=1, keys=Keys.load(other))  # another deployment
    finally:
        broker.terminate()
        broker.wait(30)
        log.close()


@pytest.mark.parametrize("body", [b"\x92\xa1\xff\x01",  # a tag of bad UTF-8
                                  b"\x91" * 3000 + b"\xc0"])  # nesting past the limit
def test_a_ring_reply_that_does_not_decode_is_a_transport_error(body):
    """What a keyed server's random nonce looks like to a client without the key: whatever
    it decodes to, the client says TransportError (once it raised UnicodeDecodeError)."""
    import socket
    import threading

    from stagepool.common.ring.tcpops import framed

    listener = socket.create_server(("127.0.0.1", 0))

    def serve():
        conn, _ = listener.accept()
        with conn:
            conn.sendall(framed(body))
            conn.recv(1)  # until the client hangs up

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with pytest.raises(TransportError):
            TcpMemory(f"tcp://127.0.0.1:{listener.getsockname()[1]}", "ring", timeout_s=2)
    finally:
        thread.join(5)
        listener.close()


def test_the_tcp_ring_serves_only_clients_that_hold_its_key(tmp_path, keys):
    layout = Layout(capacity=8, slot_bytes=256, cells=2)
    memory = ShmMemory(f"stagepool-test-keyed-{os.getpid()}", layout.nbytes, create=True)
    Ring.format(memory, layout)
    server = TcpRingServer("tcp://127.0.0.1:0", {"ring": memory._region},
                           {"ring": memory.nbytes}, key=keys.ring_key)
    server.start()
    try:
        ring = Ring.attach(TcpMemory(server.endpoint, "ring", key=keys.ring_key, timeout_s=2))
        assert ring.try_produce(b"signed")
        assert ring.try_claim().payload == b"signed"
        with pytest.raises(TransportError):
            TcpMemory(server.endpoint, "ring", timeout_s=1)  # no key
        generate(tmp_path / "other")
        with pytest.raises(TransportError):
            TcpMemory(server.endpoint, "ring", timeout_s=1,
                      key=Keys.load(tmp_path / "other").ring_key)
        ring.mem.close()
    finally:
        server.stop()
        memory.close()


def test_a_security_section_is_part_of_the_config():
    config = msgspec.convert({"pipeline": {"stages": [{"name": "a"}]},
                              "security": {"keys_dir": "/k", "insecure": True}}, Config)
    assert config.security.keys_dir == "/k" and config.security.insecure


@pytest.mark.cluster
def test_jobs_run_over_redis_tls_with_an_acl_user(tmp_path, namespace):
    """`rediss://user:password@host/…?ssl_ca_certs=…`: the broker, every worker and the
    gateway reach Redis over TLS as an ACL user (the default user is off)."""
    import shutil
    import time

    import tests.conftest as conftest
    from stagepool.common.jobstore import JobStore

    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed (it makes the test's certificate)")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout",
                    str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    acl = tmp_path / "users.acl"
    acl.write_text("user default off\nuser stagepool on >tls-secret ~* &* +@all\n")
    port = free_port()
    redis = subprocess.Popen(
        ["redis-server", "--port", "0", "--tls-port", str(port), "--tls-cert-file", str(cert),
         "--tls-key-file", str(key), "--tls-ca-cert-file", str(cert), "--tls-auth-clients",
         "no", "--save", "", "--appendonly", "no", "--aclfile", str(acl)],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"rediss://stagepool:tls-secret@127.0.0.1:{port}/0?ssl_ca_certs={cert}"
    store = JobStore(url, namespace)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                store.run_id()
                break
            except Exception:
                assert time.monotonic() < deadline, "redis over TLS did not start"
                time.sleep(0.05)
        cluster = conftest.Cluster(tmp_path, url, namespace, workers=1)
        try:
            with BrokerClient(cluster.broker) as client:
                cluster.wait_ready(client, 1)
                ids = [client.submit({}, job_id=f"tls-{i}").job_id for i in range(20)]
            assert conftest.wait_ended(store, ids, 60) == ["succeeded"] * 20
        finally:
            cluster.stop()
    finally:
        store.close()
        redis.terminate()
        redis.wait(10)
