"""How the gateway stores a job's input images (broker/gateway/inputs.py), on a real Redis:
one or several (a list, or LightX2V's comma-separated `image_path`) where the pipeline takes
them; by URL only where the operator allows URLs, only from listed hosts or public addresses,
never following a redirect, within the size and time limits (a real HTTP server on
loopback)."""

from __future__ import annotations

import base64
import http.server
import re
import socket
import threading
import time

import msgspec
import pytest

from stagepool.broker.gateway.inputs import Inputs
from stagepool.common.blobs import BlobStore, ref_of
from stagepool.common.config import Config, InputsConfig
from stagepool.common.errors import InvalidParams
from stagepool.common.jobstore import JobStore

from .test_inputs import png
from .test_models import conditioning_image

IMAGE = png(conditioning_image())


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/fox.png":
            self._send(200, IMAGE)
        elif self.path == "/big.png":
            self._send(200, IMAGE + b"\0" * 4096)
        elif self.path == "/moved.png":  # to an internal address the check would refuse
            self.send_response(302)
            self.send_header("Location", "http://169.254.169.254/latest/meta-data/")
            self.end_headers()
        elif self.path == "/slow.png":  # a byte at a time: each read within the timeout
            self.send_response(200)
            self.send_header("Content-Length", str(len(IMAGE)))
            self.end_headers()
            for i in range(len(IMAGE)):
                self.wfile.write(IMAGE[i:i + 1])
                self.wfile.flush()
                time.sleep(0.05)
        else:
            self._send(404, b"no")

    def _send(self, status: int, body: bytes):
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass  # a client that gave up mid-body (the slow case)


@pytest.fixture(scope="module")
def server():
    httpd = _Server(("127.0.0.1", 0), _Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def store(redis_server, namespace):
    store = JobStore(redis_server.url, namespace)
    yield store
    store.close()


def _inputs(store, images_per_job: int = 1, **settings) -> Inputs:
    config = msgspec.structs.replace(Config(), inputs=InputsConfig(**settings))
    return Inputs(config, store, images_per_job=images_per_job, pipeline="edit")


def test_a_url_from_a_listed_host_is_fetched_and_stored(server, store):
    inputs = _inputs(store, allow_urls=True, url_hosts=["127.0.0.1"])
    ref = inputs.store(f"{server}/fox.png", "image_path")
    assert BlobStore(store, 60).get(ref) == IMAGE


@pytest.mark.parametrize("path, settings, reason", [
    ("/fox.png", {"allow_urls": False}, "URLs are off"),
    ("/fox.png", {"url_hosts": ["images.example.com"]}, "not one of the hosts"),
    ("/fox.png", {"url_hosts": []}, "non-public address (127.0.0.1)"),
    ("/big.png", {"max_bytes": len(IMAGE) + 100}, "is over"),
    ("/moved.png", {}, "could not fetch"),  # a redirect is never followed
    ("/missing.png", {}, "could not fetch"),
    ("/slow.png", {"url_timeout_s": 1.0}, "took over 1 s"),
])
def test_a_url_is_refused_with_its_reason(server, store, path, settings, reason):
    settings = {"allow_urls": True, "url_hosts": ["127.0.0.1"], **settings}
    inputs = _inputs(store, **settings)
    started = time.monotonic()
    with pytest.raises(InvalidParams, match=reason.replace("(", r"\(").replace(")", r"\)")):
        inputs.store(f"{server}{path}", "image_path")
    assert time.monotonic() - started < 5
    assert not store.redis.keys(f"{store.keys.prefix}blob:*")


@pytest.mark.parametrize("url", ["http://localhost/x.png", "http://169.254.169.254/latest/",
                                 "http://10.1.2.3/x.png", "http://[::1]/x.png"])
def test_internal_addresses_are_refused_unless_listed(store, url):
    with pytest.raises(InvalidParams, match="non-public address"):
        _inputs(store, allow_urls=True).store(url, "image_path")


def test_several_images_are_stored_where_the_pipeline_takes_several(store):
    other = png(conditioning_image(shift=4))
    a, b = (base64.b64encode(data).decode() for data in (IMAGE, other))
    inputs = _inputs(store, images_per_job=3)
    refs = inputs.store([a, "data:image/png;base64," + b], "params.image")
    assert refs == [ref_of(IMAGE), ref_of(other)]
    # LightX2V's comma-separated image_path; a data URL's own comma is not a separator
    assert inputs.store(f"{a}, data:image/png;base64,{b}", "image_path") == refs
    assert inputs.store(a, "image_path") == ref_of(IMAGE)  # one stays one
    blobs = BlobStore(store, 60)
    assert [blobs.get(ref) for ref in refs] == [IMAGE, other]


@pytest.mark.parametrize("images_per_job, value, reason", [
    (1, ["x"], "one image per job"),
    (1, "a.png,b.png", "one image per job"),
    (3, ["a", "b", "c", "d"], "4 images; a job takes 1 to 3"),
    (3, [], "0 images"),
    (3, ["a", 7], "expected an image"),
    (3, {"url": "a"}, "expected an image"),
    (0, "a.png", "takes no image"),
])
def test_image_lists_a_pipeline_cannot_take_are_refused(store, images_per_job, value, reason):
    with pytest.raises(InvalidParams, match=re.escape(reason)):
        _inputs(store, images_per_job=images_per_job).store(value, "image_path")
    assert not store.redis.keys(f"{store.keys.prefix}blob:*")


class _Recording(_Handler):
    """Serves as _Handler does, and notes each request's (server address, Host header)."""

    seen: list[tuple[str, str]] = []

    def do_GET(self):
        self.seen.append((self.server.server_address[0], self.headers.get("Host", "")))
        super().do_GET()


def test_the_fetch_connects_to_the_address_the_check_approved(store, monkeypatch):
    """DNS rebinding: the name resolves to a public address for the check, then to an
    internal one. The fetch goes to the approved address, naming the host it asked for.
    (Here 127.0.0.2 stands for the public address, 127.0.0.1 for the internal service.)"""
    from stagepool.broker.gateway import inputs as inputs_mod

    public = _Server(("127.0.0.2", 0), _Recording)
    port = public.server_address[1]
    servers = [public, _Server(("127.0.0.1", port), _Recording)]  # the internal one: same port
    for httpd in servers:
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
    real, answers = socket.getaddrinfo, iter(["127.0.0.2"])

    def rebinding(host, *args, **kwargs):
        if host == "images.test":  # the check's answer, then the attacker's
            host = next(answers, "127.0.0.1")
        return real(host, *args, **kwargs)

    _Recording.seen.clear()
    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    monkeypatch.setattr(inputs_mod, "is_public", lambda address: address == "127.0.0.2")
    try:
        ref = _inputs(store, allow_urls=True).store(f"http://images.test:{port}/fox.png",
                                                    "image_path")
    finally:
        for httpd in servers:
            httpd.shutdown()
            httpd.server_close()
    assert BlobStore(store, 60).get(ref) == IMAGE
    assert _Recording.seen == [("127.0.0.2", f"images.test:{port}")]


def test_a_pinned_request_keeps_its_host_for_the_header_and_the_tls_name():
    from stagepool.broker.gateway.inputs import pinned

    assert pinned("https://user:pw@images.example:8443/a.png?x=1", "2001:db8::1") == (
        "https://user:pw@[2001:db8::1]:8443/a.png?x=1", {"Host": "images.example:8443"},
        {"sni_hostname": "images.example"})
    assert pinned("http://images.example/a.png", "93.184.215.14") == (
        "http://93.184.215.14/a.png", {"Host": "images.example"}, {})
