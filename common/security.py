"""Who may talk to a deployment's network surfaces: CURVE for ZMQ, a MAC for the tcp ring.

`stagepool keys generate DIR` writes two CURVE key pairs with pyzmq (libsodium):
    DIR/server.key, DIR/server.key_secret   every socket that binds: the broker's control
                                           socket, each worker's release-notice socket
    DIR/client.key, DIR/client.key_secret   every socket that connects to them
Every host of a deployment gets the same directory (a Kubernetes Secret, a file copied with
0600). With keys (security.keys_dir, or STAGEPOOL_SECURITY_KEYS_DIR), every ZMQ socket runs
CURVE: encrypted, and a server accepts only the client key (ZAP). The tcp ring (plain TCP,
tcp.py) authenticates both ends with HMAC-SHA256 over fresh nonces from a key derived from
the client secret, then seals every frame with a MAC under a per-connection key and a counter:
a peer without the keys can neither connect nor alter or replay a frame (ring frames carry
job ids and tensor descriptors, no params: they are authenticated, not encrypted).

A surface that binds beyond loopback without keys refuses to start (`require`), unless
`security.insecure = true` says the network itself is private.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import zmq

from .addresses import endpoint_host, is_loopback
from .errors import ConfigError, TransportError

ENV_KEYS_DIR = "STAGEPOOL_SECURITY_KEYS_DIR"
NONCE_BYTES = 16
TAG_BYTES = 16

_auth_lock = threading.Lock()
_authenticators: dict[int, object] = {}  # zmq context id -> its ZAP authenticator


@dataclass(frozen=True)
class Keys:
    directory: str
    server_public: bytes
    server_secret: bytes
    client_public: bytes
    client_secret: bytes

    @classmethod
    def load(cls, directory: str | os.PathLike) -> Keys:
        import zmq.auth

        try:
            server_public, server_secret = zmq.auth.load_certificate(
                Path(directory) / "server.key_secret")
            client_public, client_secret = zmq.auth.load_certificate(
                Path(directory) / "client.key_secret")
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read the keys in {directory} ({exc}): make them with "
                              "`stagepool keys generate DIR`") from None
        if not (server_secret and client_secret):
            raise ConfigError(f"{directory} lacks a secret key: `stagepool keys generate DIR`")
        return cls(str(directory), server_public, server_secret, client_public, client_secret)

    @classmethod
    def from_config(cls, config) -> Keys | None:
        """The keys a process uses: security.keys_dir, else the environment, else None."""
        directory = config.security.keys_dir or os.environ.get(ENV_KEYS_DIR, "")
        return cls.load(directory) if directory else None

    @classmethod
    def from_env(cls) -> Keys | None:
        directory = os.environ.get(ENV_KEYS_DIR, "")
        return cls.load(directory) if directory else None

    @property
    def ring_key(self) -> bytes:
        return hashlib.sha256(b"stagepool ring v1" + self.client_secret).digest()


def generate(directory: str | os.PathLike) -> list[Path]:
    """Write the server and client key pairs (secrets 0600); refuses to overwrite."""
    import zmq.auth

    target = Path(directory)
    target.mkdir(parents=True, exist_ok=True)
    for name in ("server", "client"):
        if (target / f"{name}.key_secret").exists():
            raise ConfigError(f"{target / name}.key_secret exists: keys are not overwritten")
    made = []
    for name in ("server", "client"):
        public, secret = zmq.auth.create_certificates(target, name)
        os.chmod(secret, 0o600)
        made += [Path(public), Path(secret)]
    return made


def require(what: str, address: str, keys: Keys | None, insecure: bool) -> None:
    """Refuse a bind beyond loopback (`address`: an endpoint or a host) without keys."""
    host = endpoint_host(address) if "://" in address else address
    if keys is None and not insecure and not is_loopback(host):
        raise ConfigError(
            f"{what} binds {address}, beyond loopback, without keys: make them "
            "(`stagepool keys generate DIR`, then security.keys_dir or "
            f"{ENV_KEYS_DIR}), or set security.insecure = true on a private network")


def serve_curve(sock: zmq.Socket, keys: Keys | None) -> None:
    """Make a binding socket a CURVE server that accepts only the client key."""
    if keys is None:
        return
    _authenticator(sock.context, keys)
    sock.curve_secretkey = keys.server_secret
    sock.curve_publickey = keys.server_public
    sock.curve_server = True


def connect_curve(sock: zmq.Socket, keys: Keys | None) -> None:
    """Make a connecting socket a CURVE client of our servers (before `connect`)."""
    if keys is None:
        return
    sock.curve_secretkey = keys.client_secret
    sock.curve_publickey = keys.client_public
    sock.curve_serverkey = keys.server_public


def _authenticator(context: zmq.Context, keys: Keys) -> None:
    from zmq.auth.thread import ThreadAuthenticator

    with _auth_lock:
        if id(context) in _authenticators:
            return
        auth = ThreadAuthenticator(context, log=None)
        auth.start()
        # configure_curve reads every *.key in the directory: our two public keys.
        auth.configure_curve(domain="*", location=keys.directory)
        _authenticators[id(context)] = auth


class FrameSeal:
    """One tcp-ring connection's MAC: `handshake` proves both ends hold the key; `seal` and
    `open` tag each frame with HMAC(session key, direction, counter, body)."""

    def __init__(self, key: bytes, client: bool):
        self._key = key
        self._client = client
        self._session = b""
        self._sent = 0
        self._received = 0

    def proof(self, role: bytes, server_nonce: bytes, client_nonce: bytes) -> bytes:
        return hmac.digest(self._key, role + server_nonce + client_nonce, "sha256")

    def start(self, server_nonce: bytes, client_nonce: bytes) -> None:
        self._session = hmac.digest(self._key, b"session" + server_nonce + client_nonce,
                                    "sha256")

    def seal(self, body: bytes) -> bytes:
        side = b"c" if self._client else b"s"
        tag = hmac.digest(self._session, side + self._sent.to_bytes(8, "little") + body,
                          "sha256")[:TAG_BYTES]
        self._sent += 1
        return body + tag

    def open(self, frame: bytes) -> bytes:
        body, tag = frame[:-TAG_BYTES], frame[-TAG_BYTES:]
        side = b"s" if self._client else b"c"
        want = hmac.digest(self._session, side + self._received.to_bytes(8, "little") + body,
                           "sha256")[:TAG_BYTES]
        if len(frame) < TAG_BYTES or not hmac.compare_digest(tag, want):
            raise TransportError("a ring frame failed its MAC")
        self._received += 1
        return body
