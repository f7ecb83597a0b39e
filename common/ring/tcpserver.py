"""`tcp` backend, server side: the broker runs remote clients' ring steps on its own memory.

Lifecycle of one request (tcp.py has the ops and the framing):
  1. a client's connection carries one frame with a request id;
  2. this server (one thread of the broker) runs it on the ring's shared memory through a
     `Ring` of its own, with the atomics every shm client uses: a step is a few microseconds
     here, where it would be several network round trips from the client;
  3. it answers with the same id. A `ClaimAny` that finds nothing is parked until a record
     lands or its timeout passes: a publish served here retries the parked claims at once,
     and a watcher thread per ring (asleep on the ring's futex only while claims are parked)
     pokes the loop when a shm client or the broker publishes.
One thread serves every connection (a selector loop: each step is microseconds of work, and
the GIL would serialise more threads anyway). A client that disconnects takes its parked
requests with it; a claim answered to a connection that has just gone is published again and
its slot freed: nothing waits for the reaper. A bad frame gets an `OpError` and a log line; a
frame past the size limit closes its connection; the loop never dies of either.
"""

from __future__ import annotations

import hmac
import logging
import os
import selectors
import socket
import threading
import time

import msgspec

from ..errors import CellLost, ProtocolError, StagepoolError, TransportError
from ..frames import DECODE_ERRORS
from ..security import NONCE_BYTES, FrameSeal
from .base import WAKE_ALL, WAKE_ANY
from .layout import OFF_ENQUEUE, OFF_WATCHERS, WAKE_WATCHERS
from .protocol import Claim, Ring, claim_waiting
from .shm import RegionMemory
from .tcp import split_endpoint
from .tcpops import (
    ANSWER_CODES, FRAME_HEADER, LEASED, LOST, MAX_OP_FRAME_BYTES, OPS_VERSION, AnyOp, Attach,
    Cas, ClaimAny, Claimed, Data, Drops, FetchAdd, Leases, Op, OpError, ProduceMany, Read,
    Store, Value, Wake, Words, Write, framed,
)

log = logging.getLogger(__name__)

_MAX_PARK_MS = 60_000


class _Conn:
    """One client connection: bytes read but not yet a whole frame, bytes not yet sent."""

    __slots__ = ("sock", "inbox", "outbox", "peer", "seal", "nonce")

    def __init__(self, sock: socket.socket, peer: str, seal: FrameSeal | None):
        self.sock = sock
        self.inbox = bytearray()
        self.outbox = bytearray()
        self.peer = peer
        self.seal = seal  # with a ring key: None until the handshake is through
        self.nonce = b""  # ours, while the handshake is on


class _Parked:
    __slots__ = ("conn", "op", "deadline")

    def __init__(self, conn: _Conn, op: ClaimAny, deadline: float):
        self.conn = conn
        self.op = op
        self.deadline = deadline


class TcpRingServer:
    """Serves ring requests on `endpoint` for `regions` (ring name -> the broker's Region).

    Runs in its own thread (`start`/`stop`); owns its sockets and one watcher thread per ring.
    """

    def __init__(self, endpoint: str, regions: dict, sizes: dict[str, int],
                 key: bytes | None = None):
        """`key`: the ring key (security.Keys.ring_key): every client must prove it holds it,
        and every frame then carries a MAC."""
        self._key = key
        self._regions = regions
        self._sizes = sizes
        self._rings = {name: Ring.attach(RegionMemory(region, sizes[name]))
                       for name, region in regions.items()}
        for ring in self._rings.values():
            ring.wakes_watchers = False  # a publish served here checks the parked claims
        host, port = split_endpoint(endpoint)
        self._listener = socket.create_server((host, port), reuse_port=False)
        self._listener.setblocking(False)
        self.endpoint = f"tcp://{host}:{self._listener.getsockname()[1]}"
        self._poke_in, self._poke_out = socket.socketpair()
        self._poke_in.setblocking(False)
        self._poke_out.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._parked: list[_Parked] = []
        # Set while a request is parked on the ring: only then does its watcher sleep on the
        # ring's futex (and so get woken by, and cost, every publish).
        self._watched = {name: threading.Event() for name in regions}
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(AnyOp)

    def start(self) -> None:
        serve = threading.Thread(target=self._serve, name="ring-tcp", daemon=True)
        self._threads.append(serve)
        for name, region in self._regions.items():
            watch = threading.Thread(target=self._watch, args=(region, self._watched[name]),
                                     name=f"ring-watch-{name}", daemon=True)
            self._threads.append(watch)
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=2)

    # -- threads ---------------------------------------------------------------------------

    def _watch(self, region, watched: threading.Event) -> None:
        # While requests are parked, counted as a watcher, so publishers wake it (a lane's
        # publish wakes its main ring's watchers too); it pokes the server loop, which looks
        # at the parked requests again. Otherwise a publish wakes no thread of ours.
        def forward() -> None:
            try:
                self._poke_out.send(b"\0")
            except BlockingIOError:
                pass  # the server has pokes queued already
            except OSError:
                return  # stopping

        try:
            while not self._stop.is_set():
                if not watched.wait(0.1):
                    continue
                region.fetch_add(OFF_WATCHERS, 1)
                try:
                    forward()  # a publish before we counted woke nobody: look again
                    while watched.is_set() and not self._stop.is_set():
                        word = region.load(OFF_ENQUEUE) & 0xFFFFFFFF
                        woken = region.wait(OFF_ENQUEUE, word, 0.1, WAKE_WATCHERS)
                        if woken or region.load(OFF_ENQUEUE) & 0xFFFFFFFF != word:
                            forward()
                finally:
                    region.fetch_add(OFF_WATCHERS, -1)
        except Exception:  # noqa: BLE001 - a watcher must not die silently
            log.exception("ring watcher failed")

    def _serve(self) -> None:
        selector = self._selector
        selector.register(self._listener, selectors.EVENT_READ, None)
        selector.register(self._poke_in, selectors.EVENT_READ, None)
        try:
            while not self._stop.is_set():
                timeout_s = 0.1
                if self._parked:
                    soonest = min(p.deadline for p in self._parked) - time.monotonic()
                    timeout_s = max(0.0, min(timeout_s, soonest + 0.001))
                for key, events in selector.select(timeout_s):
                    if key.fileobj is self._listener:
                        self._accept()
                    elif key.fileobj is self._poke_in:
                        try:
                            while self._poke_in.recv(4096):
                                pass
                        except BlockingIOError:
                            pass
                    else:
                        conn = key.data
                        if events & selectors.EVENT_READ:
                            self._read(conn)
                        if events & selectors.EVENT_WRITE and conn.sock.fileno() >= 0:
                            self._flush(conn)
                if self._parked:
                    self._check_parked()
        finally:
            for key in list(selector.get_map().values()):
                key.fileobj.close()
            selector.close()
            self._poke_out.close()

    def _accept(self) -> None:
        try:
            sock, address = self._listener.accept()
        except OSError:
            return
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = _Conn(sock, f"{address[0]}:{address[1]}", None)
        self._selector.register(sock, selectors.EVENT_READ, conn)
        if self._key is not None:
            conn.nonce = os.urandom(NONCE_BYTES)
            conn.outbox += framed(conn.nonce)
            self._flush(conn)

    def _read(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(1 << 16)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._close(conn)
            return
        conn.inbox += data
        while len(conn.inbox) >= FRAME_HEADER.size:
            (length,) = FRAME_HEADER.unpack_from(conn.inbox)
            if length > MAX_OP_FRAME_BYTES:
                log.warning("ring server: a frame of %d bytes from %s; closing it", length,
                            conn.peer)
                self._close(conn)
                return
            end = FRAME_HEADER.size + length
            if len(conn.inbox) < end:
                break
            frame = bytes(conn.inbox[FRAME_HEADER.size:end])
            del conn.inbox[:end]
            if self._key is not None:
                try:
                    if conn.seal is None:
                        self._handshake(conn, frame)
                        continue
                    frame = conn.seal.open(frame)
                except TransportError as exc:
                    log.warning("ring server: %s from %s; closing it", exc, conn.peer)
                    self._close(conn)
                    return
            self._handle(conn, frame)
            if conn.sock.fileno() < 0:
                return

    def _handshake(self, conn: _Conn, frame: bytes) -> None:
        seal = FrameSeal(self._key, client=False)
        client_nonce, proof = frame[:NONCE_BYTES], frame[NONCE_BYTES:]
        if not hmac.compare_digest(proof, seal.proof(b"client", conn.nonce, client_nonce)):
            raise TransportError("a client without the ring key")
        answer = seal.proof(b"server", conn.nonce, client_nonce)
        conn.outbox += framed(answer)
        seal.start(conn.nonce, client_nonce)
        conn.seal = seal
        self._flush(conn)

    def _close(self, conn: _Conn) -> None:
        if conn.sock.fileno() >= 0:
            self._selector.unregister(conn.sock)
            conn.sock.close()
        self._parked = [p for p in self._parked if p.conn is not conn]

    def _send(self, conn: _Conn, reply) -> bool:
        """Queue `reply` on `conn` and send what the socket takes; False if it has gone."""
        if conn.sock.fileno() < 0:
            return False
        body = self._encoder.encode(reply)
        if conn.seal is not None:
            body = conn.seal.seal(body)
        conn.outbox += framed(body)
        return self._flush(conn)

    def _flush(self, conn: _Conn) -> bool:
        try:
            sent = conn.sock.send(conn.outbox)
        except BlockingIOError:
            sent = 0
        except OSError:
            self._close(conn)
            return False
        del conn.outbox[:sent]
        self._selector.modify(conn.sock, selectors.EVENT_READ | (
            selectors.EVENT_WRITE if conn.outbox else 0), conn)
        return True

    # -- requests --------------------------------------------------------------------------

    def _handle(self, conn: _Conn, frame: bytes) -> None:
        rid = 0
        try:
            op = self._decoder.decode(frame)
            rid = op.rid
            reply = self._execute(conn, op)
        except DECODE_ERRORS as exc:  # msgspec.ValidationError is a DecodeError
            log.warning("ring server: undecodable op from %s: %s", conn.peer, exc)
            reply = OpError(rid, "bad_request", f"undecodable ring op: {exc}")
        except (IndexError, ValueError, OverflowError, KeyError, ProtocolError,
                StagepoolError) as exc:
            log.warning("ring server: refused op from %s: %s", conn.peer, exc)
            reply = OpError(rid, "bad_request", str(exc))
        if reply is not None:
            self._send(conn, reply)

    def _ring(self, name: str) -> Ring:
        ring = self._rings.get(name)
        if ring is None:
            raise ProtocolError(f"no ring {name!r}")
        return ring

    def _execute(self, conn: _Conn, op: Op):
        if op.ring not in self._rings:
            return OpError(op.rid, "not_found", f"no ring {op.ring!r}")
        region = self._regions[op.ring]
        match op:
            case ProduceMany(rid=rid, items=items, wake=wake):
                done = self._rings[op.ring].produce_many(
                    [(self._ring(name), payload) for name, payload in items],
                    self._ring(wake) if wake else None)
                if done and self._parked:
                    self._check_parked()
                return Value(rid, done)
            case Drops(rid=rid, items=items):
                return Words(rid, [self._drop(self._rings[op.ring], cell, word)
                                   for cell, word in items])
            case ClaimAny(rid=rid, lanes=names, most=most, timeout_ms=timeout_ms):
                rings = [self._ring(name) for name in names]
                if not 1 <= most <= 4096 or not rings:
                    raise ProtocolError("a claim takes 1..4096 records from at least one ring")
                found = self._claimed(rings, most)
                if found or timeout_ms <= 0:
                    return Claimed(rid, found)
                self._park(conn, op, timeout_ms)
                return None
            case Leases(rid=rid, items=items):
                ring = self._rings[op.ring]
                return Words(rid, [self._lease(ring, item) for item in items])
            case Read(rid=rid, offset=offset, nbytes=nbytes):
                return Data(rid, region.read(offset, nbytes))
            case Write(rid=rid, offset=offset, data=data):
                region.write(offset, data)
                return Value(rid, 0)
            case Store(rid=rid, offset=offset, value=value):
                region.store(offset, value)
                return Value(rid, 0)
            case FetchAdd(rid=rid, offset=offset, delta=delta):
                return Value(rid, region.fetch_add(offset, delta))
            case Cas(rid=rid, offset=offset, expected=expected, desired=desired):
                return Value(rid, region.cas(offset, expected, desired))
            case Wake(rid=rid, offset=offset, count=count, mask=mask):
                if not (1 <= count <= WAKE_ALL and 1 <= mask <= WAKE_ANY):
                    raise ProtocolError("wake needs 1 <= count < 2**31 and a nonzero u32 mask")
                region.wake(offset, count, mask)
                return Value(rid, 0)
            case Attach(rid=rid, version=version):
                if version != OPS_VERSION:
                    return OpError(rid, "version_mismatch", f"ring ops v{OPS_VERSION} only")
                return Value(rid, self._sizes[op.ring])
        raise ProtocolError(f"unknown op {type(op).__name__}")

    def _lease(self, ring: Ring, item) -> tuple[int, int]:
        answer, word = ring.lease_from(item.cell, item.word, self._ring(item.lane),
                                       Claim(item.ticket, b""), item.attempt, item.job_id,
                                       item.lease_ms)
        return ANSWER_CODES[answer], word

    @staticmethod
    def _drop(ring: Ring, cell: int, word: int) -> tuple[int, int]:
        try:
            return LEASED, ring.drop(cell, word)
        except CellLost:
            return LOST, 0

    @staticmethod
    def _claimed(rings: list[Ring], most: int) -> list[tuple[int, int, bytes]]:
        return [(index, c.ticket, c.payload) for index, c in claim_waiting(rings, most)]

    def _park(self, conn: _Conn, op: ClaimAny, timeout_ms: int) -> None:
        deadline = time.monotonic() + min(timeout_ms, _MAX_PARK_MS) / 1000
        self._parked.append(_Parked(conn, op, deadline))
        self._watched[op.ring].set()

    def _check_parked(self) -> None:
        now = time.monotonic()
        still = []
        for parked in self._parked:
            op = parked.op
            rings = [self._rings[name] for name in op.lanes]
            found = self._claimed(rings, op.most)
            if found or now >= parked.deadline:
                if not self._send(parked.conn, Claimed(op.rid, found)):
                    self._give_back(rings, found)
                continue
            still.append(parked)
        self._parked = still
        for name, watched in self._watched.items():
            if watched.is_set() and not any(p.op.ring == name for p in still):
                watched.clear()

    @staticmethod
    def _give_back(rings: list[Ring], found: list[tuple[int, int, bytes]]) -> None:
        """Claims for a client that has gone: publish each again, then free its slot (or,
        with the ring full, leave it claimed: the reaper reclaims it)."""
        for index, ticket, payload in found:
            ring = rings[index]
            if ring.try_produce(payload):
                ring.release(Claim(ticket, b""))
            else:
                log.warning("ring server: a claim for a gone client waits for the reaper")

