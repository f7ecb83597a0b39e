"""`tcp` backend: the broker executes the ring's one-sided operations for remote clients.

Lifecycle of one operation:
  1. the client (`TcpMemory`) sends one msgpack frame (`Read`, `Write`, `FetchAdd`, `Cas`,
     `Store`, `Wait`, `Wake`) with a request id on a DEALER socket;
  2. the server (`TcpRingServer`, a thread in the broker) executes it on the ring's shared
     memory with the same atomics the shm backend uses, so tcp and shm clients of one ring
     are atomic with respect to each other;
  3. it replies `Value`, `Data` or `OpError` with the same id. `Wait` is parked until the
     watched word changes (a watcher thread sleeps on the ring's futex and pokes the server)
     or its timeout passes.
A connection begins with `Attach` (protocol version, ring name), answered with the ring size.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid

import msgspec
import zmq

from ..errors import ProtocolError, RemoteError, TransportError
from .base import WAKE_ALL, WAKE_ANY, RemoteMemory
from .layout import OFF_ENQUEUE, OFF_WATCHERS, WAKE_WATCHERS

log = logging.getLogger(__name__)

OPS_VERSION = 1
_MAX_OP_FRAME_BYTES = 1 << 20


class Op(msgspec.Struct, tag=True, array_like=True):
    rid: int
    ring: str


class Attach(Op, tag="a"):
    version: int


class Read(Op, tag="r"):
    offset: int
    nbytes: int


class Write(Op, tag="w"):
    offset: int
    data: bytes


class Store(Op, tag="s"):
    offset: int
    value: int


class FetchAdd(Op, tag="f"):
    offset: int
    delta: int


class Cas(Op, tag="c"):
    offset: int
    expected: int
    desired: int


class Wait(Op, tag="W"):
    offset: int
    expected: int
    timeout_ms: int


class Wake(Op, tag="k"):
    offset: int
    count: int = WAKE_ALL
    mask: int = WAKE_ANY


class Value(msgspec.Struct, tag="v", array_like=True):
    rid: int
    value: int


class Data(msgspec.Struct, tag="d", array_like=True):
    rid: int
    data: bytes


class OpError(msgspec.Struct, tag="e", array_like=True):
    rid: int
    code: str
    message: str


AnyOp = Attach | Read | Write | Store | FetchAdd | Cas | Wait | Wake
AnyReply = Value | Data | OpError


class TcpMemory(RemoteMemory):
    """A client of one ring on a `TcpRingServer`. Thread-safe (one lock, one socket)."""

    def __init__(self, endpoint: str, ring: str, *, timeout_s: float = 5.0,
                 context: zmq.Context | None = None):
        self.endpoint = endpoint
        self.ring = ring
        self.timeout_s = timeout_s
        self._ctx = context or zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.connect(endpoint)
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(AnyReply)
        self._rid = 0
        self._lock = threading.Lock()
        self.nbytes = self._call(Attach(0, ring, OPS_VERSION)).value

    def _call(self, op: Op, timeout_s: float | None = None):
        with self._lock:
            if self._sock is None:
                raise TransportError("ring connection is closed")
            self._rid += 1
            op.rid = self._rid
            self._sock.send(self._encoder.encode(op))
            deadline = time.monotonic() + (timeout_s or self.timeout_s)
            while True:
                remaining_ms = int((deadline - time.monotonic()) * 1000)
                if remaining_ms <= 0 or not self._sock.poll(remaining_ms):
                    raise TransportError(f"ring op timed out against {self.endpoint}")
                try:
                    reply = self._decoder.decode(self._sock.recv())
                except msgspec.DecodeError as exc:
                    raise TransportError(f"bad reply from ring server: {exc}") from None
                if reply.rid == op.rid:
                    break  # older rids are replies to calls that timed out: drop them
        if isinstance(reply, OpError):
            raise RemoteError(reply.code, reply.message)
        return reply

    def read(self, offset: int, nbytes: int) -> bytes:
        return self._call(Read(0, self.ring, offset, nbytes)).data

    def write(self, offset: int, data: bytes) -> None:
        self._call(Write(0, self.ring, offset, bytes(data)))

    def load(self, offset: int) -> int:
        return int.from_bytes(self.read(offset, 8), "little")

    def store(self, offset: int, value: int) -> None:
        self._call(Store(0, self.ring, offset, value))

    def fetch_add(self, offset: int, delta: int) -> int:
        return self._call(FetchAdd(0, self.ring, offset, delta)).value

    def compare_and_swap(self, offset: int, expected: int, desired: int) -> int:
        return self._call(Cas(0, self.ring, offset, expected, desired)).value

    def wait(self, offset: int, expected_u32: int, timeout_s: float,
             mask: int = WAKE_ANY) -> bool:
        # Parked at the server, answered by its watcher on any change: `mask` needs no wire.
        op = Wait(0, self.ring, offset, expected_u32, int(timeout_s * 1000))
        return bool(self._call(op, timeout_s=timeout_s + self.timeout_s).value)

    def wake(self, offset: int, count: int = WAKE_ALL, mask: int = WAKE_ANY) -> None:
        self._call(Wake(0, self.ring, offset, count, mask))

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close(linger=0)
                self._sock = None


class _Parked:
    __slots__ = ("identity", "op", "deadline")

    def __init__(self, identity: bytes, op: Wait, deadline: float):
        self.identity = identity
        self.op = op
        self.deadline = deadline


class TcpRingServer:
    """Serves ring operations on `endpoint` for the regions in `regions` (name -> Region).

    Runs in its own thread (`start`/`stop`); owns its sockets and one watcher thread per ring.
    A bad frame gets an `OpError` reply and a log line; the loop never dies of one.
    """

    def __init__(self, endpoint: str, regions: dict, sizes: dict[str, int]):
        self._regions = regions
        self._sizes = sizes
        self._ctx = zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.MAXMSGSIZE, _MAX_OP_FRAME_BYTES)
        if endpoint.endswith(":0"):
            port = self._sock.bind_to_random_port(endpoint.rsplit(":", 1)[0])
            endpoint = f"{endpoint.rsplit(':', 1)[0]}:{port}"
        else:
            self._sock.bind(endpoint)
        self.endpoint = endpoint
        self._poke_addr = f"inproc://ring-poke-{uuid.uuid4().hex}"
        self._poke_in = self._ctx.socket(zmq.PULL)
        self._poke_in.bind(self._poke_addr)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._parked: list[_Parked] = []
        # Set while a remote `Wait` is parked on the ring: only then does its watcher sleep
        # on the ring's futex (and so get woken by, and cost, every publish).
        self._watched = {name: threading.Event() for name in regions}
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(AnyOp)

    def start(self) -> None:
        serve = threading.Thread(target=self._serve, name="ring-tcp", daemon=True)
        self._threads.append(serve)
        for name, region in self._regions.items():
            watch = threading.Thread(
                target=self._watch, args=(region, self._watched[name]),
                name=f"ring-watch-{name}", daemon=True)
            self._threads.append(watch)
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=2)

    def _watch(self, region, watched: threading.Event) -> None:
        # While remote `Wait`s are parked, counted as a sleeper, so producers wake it; it
        # forwards each change of the enqueue word to the server loop, which answers them.
        # Otherwise it is not a sleeper, and a publish wakes no thread of ours.
        poke = self._ctx.socket(zmq.PUSH)
        poke.setsockopt(zmq.LINGER, 0)
        poke.setsockopt(zmq.SNDHWM, 4)
        poke.connect(self._poke_addr)

        def forward() -> None:
            try:
                poke.send(b"", zmq.NOBLOCK)
            except zmq.Again:
                pass  # the server has pokes queued already

        try:
            while not self._stop.is_set():
                if not watched.wait(0.1):
                    continue
                region.fetch_add(OFF_WATCHERS, 1)
                try:
                    # A publish before we counted woke nobody: have the parked waits checked.
                    forward()
                    while watched.is_set() and not self._stop.is_set():
                        word = region.load(OFF_ENQUEUE) & 0xFFFFFFFF
                        region.wait(OFF_ENQUEUE, word, 0.1, WAKE_WATCHERS)
                        if region.load(OFF_ENQUEUE) & 0xFFFFFFFF != word:
                            forward()
                finally:
                    region.fetch_add(OFF_WATCHERS, -1)
        finally:
            poke.close(linger=0)

    def _serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        poller.register(self._poke_in, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                timeout_ms = 100
                if self._parked:
                    soonest = min(p.deadline for p in self._parked) - time.monotonic()
                    timeout_ms = max(0, min(timeout_ms, int(soonest * 1000) + 1))
                events = dict(poller.poll(timeout_ms))
                if self._poke_in in events:
                    while self._poke_in.poll(0):
                        self._poke_in.recv()
                if self._sock in events:
                    for _ in range(256):  # bounded batch, then check parked waits
                        try:
                            frames = self._sock.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        self._handle(frames)
                if self._parked:
                    self._check_parked()
        finally:
            self._sock.close(linger=0)
            self._poke_in.close(linger=0)

    def _handle(self, frames: list[bytes]) -> None:
        if len(frames) != 2:
            log.warning("ring server: dropped a message of %d frames", len(frames))
            return
        identity, frame = frames
        rid = 0
        try:
            op = self._decoder.decode(frame)
            rid = op.rid
            reply = self._execute(identity, op)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.warning("ring server: undecodable op from %s: %s", identity.hex(), exc)
            reply = OpError(rid, "bad_request", f"undecodable ring op: {exc}")
        except (IndexError, ValueError, OverflowError, ProtocolError) as exc:
            log.warning("ring server: refused op from %s: %s", identity.hex(), exc)
            reply = OpError(rid, "bad_request", str(exc))
        if reply is not None:
            self._sock.send_multipart([identity, self._encoder.encode(reply)])

    def _execute(self, identity: bytes, op: Op):
        region = self._regions.get(op.ring)
        if region is None:
            return OpError(op.rid, "not_found", f"no ring {op.ring!r}")
        match op:
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
            case Wait(rid=rid, offset=offset, expected=expected, timeout_ms=timeout_ms):
                if region.load(offset) & 0xFFFFFFFF != expected:
                    return Value(rid, 1)
                deadline = time.monotonic() + min(timeout_ms, 60_000) / 1000
                self._parked.append(_Parked(identity, op, deadline))
                self._watched[op.ring].set()
                return None
            case Attach(rid=rid, version=version):
                if version != OPS_VERSION:
                    return OpError(rid, "version_mismatch", f"ring ops v{OPS_VERSION} only")
                return Value(rid, self._sizes[op.ring])
        raise ProtocolError(f"unknown op {type(op).__name__}")

    def _check_parked(self) -> None:
        now = time.monotonic()
        still = []
        for parked in self._parked:
            region = self._regions[parked.op.ring]
            changed = region.load(parked.op.offset) & 0xFFFFFFFF != parked.op.expected
            if changed or now >= parked.deadline:
                reply = Value(parked.op.rid, int(changed))
                self._sock.send_multipart([parked.identity, self._encoder.encode(reply)])
            else:
                still.append(parked)
        self._parked = still
        for name, watched in self._watched.items():
            if watched.is_set() and not any(p.op.ring == name for p in still):
                watched.clear()
