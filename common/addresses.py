"""Addresses that work across hosts by default.

A worker on another host must tell its peers an address they can reach (its Mooncake
session, its release-notice socket), and must reach what the broker offers it (the tcp ring,
Redis). Two rules cover it with nothing set by hand beyond the broker's endpoint:
  - what a worker advertises is the local address of its route to the broker host
    (`route_to`: the kernel's choice for a socket connected there; no packet is sent),
    unless `transfer.host` says otherwise;
  - an endpoint the broker offers on a loopback or wildcard address means "on the broker's
    host": the worker reaches it at the address it reaches the broker at (`as_seen_from`).
    Binds may be wildcards; what the broker says is an address on its own host.
"""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit, urlunsplit

LOOPBACK = "127.0.0.1"


def endpoint_host(endpoint: str) -> str:
    """The host of a ZMQ `tcp://host:port` endpoint or a URL; "" for ipc/inproc."""
    parts = urlsplit(endpoint)
    if parts.scheme in ("ipc", "inproc"):
        return ""
    return parts.hostname or ""


def is_local(host: str) -> bool:
    """Loopback or wildcard (an address that means "this host" only to this host)."""
    if host in ("", "*", "localhost"):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return address.is_loopback or address.is_unspecified


def is_loopback(host: str) -> bool:
    """Reachable from this host only (a bind here needs no authentication)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def route_to(host: str) -> str:
    """Our local address on the route to `host` (loopback for a local one)."""
    if is_local(host):
        return LOOPBACK
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.connect((host, 9))  # a datagram socket's connect sends nothing
            return sock.getsockname()[0]
    except OSError:
        return LOOPBACK


def as_seen_from(offered: str, broker_host: str) -> str:
    """`offered` (an endpoint or URL on the broker's host) as a worker that reaches the
    broker at `broker_host` must dial it: a loopback or wildcard host becomes `broker_host`."""
    if not offered or is_local(broker_host):
        return offered
    parts = urlsplit(offered)
    if parts.hostname is None or not is_local(parts.hostname):
        return offered
    netloc = parts.netloc.rpartition("@")
    host = f"[{broker_host}]" if ":" in broker_host else broker_host
    port = f":{parts.port}" if parts.port else ""
    return urlunsplit(parts._replace(netloc=f"{netloc[0]}{netloc[1]}{host}{port}"))


def redact(url: str) -> str:
    """`url` with its password (a Redis ACL user's) replaced by ***, for logs and errors."""
    parts = urlsplit(url)
    if not parts.password:
        return url
    userinfo, _, hostport = parts.netloc.rpartition("@")
    user = userinfo.partition(":")[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{hostport}"))
