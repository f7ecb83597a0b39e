"""`tcp` backend, client side: a remote ring whose protocol steps run at the broker.

Plain TCP, frames of a u32 length then msgpack: a round trip costs two socket hops, as a
Redis command does (ZMQ's I/O threads cost about as much again on a busy host).

A byte-level backend would cost a network round trip per one-sided operation (a publish is
seven of them). Over tcp the broker's ring server (tcpserver.py) runs each protocol step on
its own memory instead, with the same atomics its shm clients use, so tcp, shm and verbs
clients of one ring stay atomic with respect to each other. One round trip each:

    publish (a batch)    ProduceMany  try_produce each record into its lane, in order, until
                                      one is full, and wake the lanes' main ring once
    claim (and wait)     ClaimAny   up to `most` claims from the lanes in order; with none, the
                                    server parks the request and answers when a record lands
    lease + release      Leases     for a batch: take each cell (fenced CAS from the word the
                                    holder last set, cells.py) and free each slot
    unlease a batch      Drops      drop each lease (fenced CAS from the holder's word)
and the byte-level ops (Read, Write, Store, FetchAdd, Cas, Wake) for everything else (a beat
is one Cas; the owner's scans never cross the network; a raw `wait` polls).
A connection begins with `Attach` (protocol version, ring name), answered with the ring size.
"""

from __future__ import annotations

import hmac
import os
import socket
import threading
import time
from urllib.parse import urlsplit

import msgspec

from ..errors import PayloadTooLarge, ProtocolError, RemoteError, RingError, TransportError
from ..frames import DECODE_ERRORS
from ..security import NONCE_BYTES, FrameSeal
from .base import WAKE_ALL, WAKE_ANY, RemoteMemory
from .cells import HELD, state_of
from .layout import JOB_ID_MAX_BYTES
from .protocol import Claim, Ring
from .tcpops import (
    ANSWERS, FRAME_HEADER, LOST, MAX_OP_FRAME_BYTES, OPS_VERSION, AnyReply, Attach, Cas,
    ClaimAny, Drops, FetchAdd, LeaseItem, Leases, Op, OpError, ProduceMany, Read, Store, Wake,
    Write, framed,
)

def split_endpoint(endpoint: str) -> tuple[str, int]:
    """("host", port) of a "tcp://host:port" endpoint."""
    parts = urlsplit(endpoint)
    if parts.scheme != "tcp" or not parts.hostname or parts.port is None:
        raise RingError(f"a tcp ring endpoint is tcp://host:port, got {endpoint!r}")
    return parts.hostname, parts.port


class TcpMemory(RemoteMemory):
    """A client of one ring on a `TcpRingServer`: one TCP connection, frames of a u32 length
    then msgpack. Thread-safe (one lock). A timeout or a broken connection closes it (a late
    reply must not be read as the next one's); the next call connects again."""

    def __init__(self, endpoint: str, ring: str, *, timeout_s: float = 5.0,
                 key: bytes | None = None):
        """`key`: the deployment's ring key (security.Keys.ring_key) where the server has one."""
        self.endpoint = endpoint
        self._key = key
        self._seal: FrameSeal | None = None
        self.ring = ring
        self.timeout_s = timeout_s
        self._address = split_endpoint(endpoint)
        self._sock: socket.socket | None = None
        self._closed = False
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(AnyReply)
        self._rid = 0
        self._lock = threading.Lock()
        self.nbytes = self.call(Attach(0, ring, OPS_VERSION)).value

    @property
    def ring_class(self):
        return TcpRing

    def call(self, op: Op, timeout_s: float | None = None):
        """Send `op` and wait for its reply; RemoteError for the server's refusal."""
        with self._lock:
            if self._closed:
                raise TransportError("ring connection is closed")
            deadline = time.monotonic() + (timeout_s or self.timeout_s)
            try:
                sock = self._connected(deadline)
                self._rid += 1
                op.rid = self._rid
                sock.settimeout(max(0.001, deadline - time.monotonic()))
                self._send_frame(sock, self._encoder.encode(op))
                while True:
                    reply = self._decoder.decode(self._recv_reply(sock, deadline))
                    if reply.rid == op.rid:
                        break
            except (OSError, TransportError, *DECODE_ERRORS) as exc:  # a keyed server's nonce
                # decodes as garbage for a client without the key
                self._drop()
                raise TransportError(f"ring op against {self.endpoint} failed: {exc}") from None
        if isinstance(reply, OpError):
            raise RemoteError(reply.code, reply.message)
        return reply

    def _connected(self, deadline: float) -> socket.socket:
        if self._sock is None:
            sock = socket.create_connection(self._address,
                                            timeout=max(0.001, deadline - time.monotonic()))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._sock = sock
            self._seal = None
            if self._key is not None:
                self._handshake(sock, deadline)
            if self._rid:  # a connection again: say which ring first
                self._rid += 1
                self._send_frame(sock, self._encoder.encode(
                    Attach(self._rid, self.ring, OPS_VERSION)))
                reply = self._decoder.decode(self._recv_reply(sock, deadline))
                if isinstance(reply, OpError):
                    raise TransportError(f"{reply.code}: {reply.message}")
        return self._sock

    def _handshake(self, sock: socket.socket, deadline: float) -> None:
        """Both ends prove they hold the ring key over fresh nonces (security.FrameSeal)."""
        seal = FrameSeal(self._key, client=True)
        try:
            server_nonce = self._recv_frame(sock, deadline)
        except TransportError:
            raise TransportError("the ring server did not start a keyed handshake (does it "
                                 "run without keys?)") from None
        client_nonce = os.urandom(NONCE_BYTES)
        sock.sendall(framed(client_nonce + seal.proof(b"client", server_nonce, client_nonce)))
        try:
            proof = self._recv_frame(sock, deadline)
        except TransportError:
            raise TransportError("the ring server refused our key") from None
        if not hmac.compare_digest(proof, seal.proof(b"server", server_nonce, client_nonce)):
            raise TransportError("the ring server does not hold our key")
        seal.start(server_nonce, client_nonce)
        self._seal = seal

    def _send_frame(self, sock: socket.socket, body: bytes) -> None:
        sock.sendall(framed(self._seal.seal(body) if self._seal is not None else body))

    def _recv_reply(self, sock: socket.socket, deadline: float) -> bytes:
        frame = self._recv_frame(sock, deadline)
        return self._seal.open(frame) if self._seal is not None else frame

    def _recv_frame(self, sock: socket.socket, deadline: float) -> bytes:
        header = self._recv_exact(sock, FRAME_HEADER.size, deadline)
        (length,) = FRAME_HEADER.unpack(header)
        if length > MAX_OP_FRAME_BYTES:
            raise TransportError(f"a reply of {length} bytes")
        return self._recv_exact(sock, length, deadline)

    @staticmethod
    def _recv_exact(sock: socket.socket, nbytes: int, deadline: float) -> bytes:
        chunks, got = [], 0
        while got < nbytes:
            remaining_s = deadline - time.monotonic()
            if remaining_s <= 0:
                raise TransportError("timed out")
            sock.settimeout(remaining_s)
            chunk = sock.recv(nbytes - got)
            if not chunk:
                raise TransportError("connection closed by the ring server")
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)

    def _drop(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def read(self, offset: int, nbytes: int) -> bytes:
        return self.call(Read(0, self.ring, offset, nbytes)).data

    def write(self, offset: int, data: bytes) -> None:
        self.call(Write(0, self.ring, offset, bytes(data)))

    def load(self, offset: int) -> int:
        return int.from_bytes(self.read(offset, 8), "little")

    def store(self, offset: int, value: int) -> None:
        self.call(Store(0, self.ring, offset, value))

    def fetch_add(self, offset: int, delta: int) -> int:
        return self.call(FetchAdd(0, self.ring, offset, delta)).value

    def compare_and_swap(self, offset: int, expected: int, desired: int) -> int:
        return self.call(Cas(0, self.ring, offset, expected, desired)).value

    def wake(self, offset: int, count: int = WAKE_ALL, mask: int = WAKE_ANY) -> None:
        self.call(Wake(0, self.ring, offset, count, mask))

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._drop()


class TcpRing(Ring):
    """A `Ring` whose publish, claim and lease steps each take one round trip."""

    mem: TcpMemory

    def try_produce(self, payload: bytes, wake: Ring | None = None) -> bool:
        return self.produce_many([(self, payload)], wake) == 1

    def produce_many(self, items: list[tuple[Ring, bytes]], wake: Ring | None = None) -> int:
        for _, payload in items:
            if len(payload) > self.layout.payload_max:
                raise PayloadTooLarge(f"record of {len(payload)} bytes > slot payload of "
                                      f"{self.layout.payload_max}")
        if not items:
            return 0
        op = ProduceMany(0, self.mem.ring, [(ring.mem.ring, payload) for ring, payload in items],
                         wake.mem.ring if wake is not None else "")
        return self.mem.call(op).value

    def unlease_many(self, cells: list[int]) -> bool:
        with self._cells_lock:
            held = [cell for cell in cells if cell not in self._lost
                    and state_of(self._word(cell)) == HELD]
            if held:
                self._answered(held, self.mem.call(Drops(
                    0, self.mem.ring, [(cell, self._words[cell]) for cell in held])).words)
            return not any(cell in self._lost for cell in cells)

    def _answered(self, cells: list[int], words: list[tuple[int, int]]) -> dict[int, int]:
        """The server's (status, word) for each of `cells` into our cache (under the cells'
        lock); returns each cell's status."""
        for cell, (status, word) in zip(cells, words):
            if status == LOST:
                self._lost.add(cell)
            else:
                self._words[cell] = word
        return {cell: status for cell, (status, _) in zip(cells, words)}

    def try_claim(self) -> Claim | None:
        found = self._claim([self], 1, 0.0)
        return found[0][1] if found else None

    def claim_any(self, rings: list[Ring], timeout_s: float,
                  spin_s: float = 0.0) -> tuple[Ring, Claim] | None:
        found = self._claim(rings, 1, timeout_s)
        return found[0] if found else None

    def claim_many(self, rings: list[Ring], most: int, timeout_s: float,
                   spin_s: float = 0.0) -> list[tuple[Ring, Claim]]:
        return self._claim(rings, most, timeout_s)

    def _claim(self, rings: list[Ring], most: int, timeout_s: float):
        op = ClaimAny(0, self.mem.ring, [ring.mem.ring for ring in rings], most,
                      int(timeout_s * 1000))
        reply = self.mem.call(op, timeout_s=timeout_s + self.mem.timeout_s)
        try:
            return [(rings[index], Claim(ticket, payload))
                    for index, ticket, payload in reply.items]
        except IndexError:
            raise ProtocolError("ring server answered a lane it was not asked") from None

    def lease_claims(self, items: list[tuple[int, Ring, Claim, int, str, int]]) -> list[str]:
        with self._cells_lock:
            wire_items = []
            for cell, ring, claim, attempt, job_id, lease_ms in items:
                if len(job_id.encode()) > JOB_ID_MAX_BYTES:
                    raise PayloadTooLarge(f"job id longer than {JOB_ID_MAX_BYTES} bytes")
                if cell not in self._lost:
                    wire_items.append(LeaseItem(cell, self._word(cell), ring.mem.ring,
                                                claim.ticket, attempt, job_id, lease_ms))
            status = {}
            if wire_items:
                status = self._answered([item.cell for item in wire_items], self.mem.call(
                    Leases(0, self.mem.ring, wire_items)).words)
            return ["lost" if cell in self._lost else ANSWERS[status[cell]]
                    for cell, *_ in items]
