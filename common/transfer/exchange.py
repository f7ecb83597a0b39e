"""A worker's side of the data plane: its pool, the outputs it holds, release notices.

Lifecycle of a held output:
  1. `put(key, tensors)`: the producer copies its stage outputs into its pool and keeps them
     under `key` (`<job id>/<stage>`); the descriptors and `endpoint` go in the next Dispatch;
  2. the consumer `pull`s them: in place from a same-host pool (`local`), or one batched
     Mooncake read into its own pool; either way verified against the checksums;
  3. after the consumer's stage has committed, it sends `Release(key)` to the producer's
     notice socket (`notify_release`), and the producer frees the blocks;
  4. a notice can be lost (a consumer killed between commit and notice): the worker checks its
     old holds against Redis (`held()`) and releases the ones nobody can need any more.
Until released, a killed consumer's replacement pulls the same outputs again: no re-run.

GPU tensors are staged through the host pool here (a device-to-host copy at `put`); a device
pool registered with Mooncake's CUDA build, or CUDA IPC on one host, fits behind the same
`Backend` interface.
"""

from __future__ import annotations

import logging
import threading
import time
import os

import msgspec
import zmq

from ..addresses import LOOPBACK
from ..config import TransferConfig
from ..security import Keys, connect_curve, require, serve_curve
from ..errors import TransferError
from ..dispatch import Release, TensorDesc
from ..frames import DECODE_ERRORS
from .base import Endpoint, Failure, FailedPull, FailureKind, Pull, host_identity
from .local import LocalBackend
from .pool import ALIGN_BYTES, Pool, PoolFull, dtype_name

log = logging.getLogger(__name__)

_NOTICE_POLL_MS = 200
_NOTICE_HWM = 1000


class Exchange:
    def __init__(self, config: TransferConfig, keys: Keys | None = None, insecure: bool = False):
        """`keys`: CURVE for the release notices (required where `config.host` is beyond
        loopback, unless `insecure`)."""
        self.config = config
        self.keys = keys
        host = config.host or LOOPBACK  # a worker sets it from its route to the broker
        require("the release-notice socket", host, keys, insecure)
        self.pool = Pool(config.pool_mb << 20)
        self.largest_put_bytes = 0  # the most one `put` has taken (aligned): admission's unit
        self.local = LocalBackend() if config.backend in ("auto", "local") else None
        self.mooncake = None
        if config.backend in ("auto", "mooncake"):
            try:
                from .mooncake import MooncakeBackend

                self.mooncake = MooncakeBackend(
                    self.pool, host=host, protocol=config.protocol, device=config.device,
                    timeout_s=config.timeout_s, retries=config.retries,
                    backoff_s=config.backoff_s, dead_s=config.dead_peer_s)
            except TransferError:
                if config.backend == "mooncake":
                    raise
                log.warning("Mooncake unavailable; same-host transfers only", exc_info=True)
        if self.local is None and self.mooncake is None:
            raise TransferError(f"unknown transfer backend {config.backend!r}")
        self._held: dict[str, tuple[float, list[tuple[int, int]]]] = {}
        self._lock = threading.Lock()
        self._counts: dict[tuple[str, str], list[float]] = {}
        self._ctx = zmq.Context.instance()
        self._notices = self._ctx.socket(zmq.PULL)
        self._notices.setsockopt(zmq.LINGER, 0)
        serve_curve(self._notices, keys)
        port = self._notices.bind_to_random_port(f"tcp://{host}")
        self._peers: dict[str, zmq.Socket] = {}
        self._decoder = msgspec.msgpack.Decoder(Release)
        self._encoder = msgspec.msgpack.Encoder()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve_notices, name="release-notices",
                                        daemon=True)
        self._thread.start()
        self.endpoint = Endpoint(
            host=host_identity(), pid=os.getpid(), fd=self.pool.fd, token=self.pool.token,
            base=self.pool.base, nbytes=self.pool.nbytes,
            session=self.mooncake.session() if self.mooncake else "",
            notify=f"tcp://{host}:{port}",
        ).encode()

    # -- producer ------------------------------------------------------------------------

    def put(self, key: str, tensors: dict) -> list[TensorDesc]:
        """Copy `tensors` into the pool and hold them under `key`. Raises PoolFull."""
        self.release(key)  # a re-run of the same stage replaces what it held
        started = time.perf_counter()
        blocks, descs = [], []
        try:
            for name, tensor in tensors.items():
                nbytes = tensor.numel() * tensor.element_size()
                offset = self.pool.alloc(nbytes)
                blocks.append((offset, nbytes))
                digest = self.pool.write(offset, tensor)
                descs.append(TensorDesc(name, dtype_name(tensor.dtype), list(tensor.shape),
                                        nbytes, self.pool.base + offset, digest))
        except BaseException:
            for offset, nbytes in blocks:
                self.pool.free(offset, nbytes)
            raise
        with self._lock:
            self._held[key] = (time.monotonic(), blocks)
        aligned = sum(-(-n // ALIGN_BYTES) * ALIGN_BYTES for _, n in blocks)
        self.largest_put_bytes = max(self.largest_put_bytes, aligned)
        self.count("put", "pool", sum(n for _, n in blocks), time.perf_counter() - started)
        return descs

    def release(self, key: str) -> bool:
        """Free what `key` holds; False if it held nothing (already released)."""
        with self._lock:
            entry = self._held.pop(key, None)
        if entry is None:
            return False
        for offset, nbytes in entry[1]:
            self.pool.free(offset, nbytes)
        return True

    def held(self, older_than_s: float = 0.0) -> list[str]:
        """Keys held for longer than `older_than_s`."""
        cutoff = time.monotonic() - older_than_s
        with self._lock:
            return [key for key, (since, _) in self._held.items() if since <= cutoff]

    # -- consumer ------------------------------------------------------------------------

    def pull(self, endpoint: str, descs: list[TensorDesc]) -> Pull:
        """Start pulling; same host -> in place, otherwise Mooncake. Never raises."""
        try:
            peer = Endpoint.decode(endpoint)
        except DECODE_ERRORS as exc:
            return FailedPull(Failure(FailureKind.BAD_DESCRIPTOR, f"bad endpoint: {exc}"))
        for backend in (self.local, self.mooncake):
            if backend is not None and backend.reaches(peer):
                pull = backend.pull(peer, descs)
                pull.backend = backend.name
                return pull
        return FailedPull(Failure(FailureKind.PRODUCER_GONE,
                                  "no backend reaches the producer (another host without "
                                  "Mooncake, or transfer.backend = 'local')"))

    def dead_peer(self, endpoint: str) -> str:
        """The Mooncake session of `endpoint` if pulls from it are failing now, else ""."""
        try:
            session = Endpoint.decode(endpoint).session
        except DECODE_ERRORS:
            return ""
        return session if self.mooncake is not None and self.mooncake.dead(session) else ""

    @property
    def session(self) -> str:
        return self.mooncake.session() if self.mooncake is not None else ""

    def peers_news(self, dead: list[str], revived: list[str]) -> None:
        """The broker's word on producers other workers found dead, or alive again."""
        if self.mooncake is not None:
            self.mooncake.mark_dead(dead)
            self.mooncake.mark_alive(revived)

    # -- counters (flushed to Redis by the worker for /metrics) -----------------------------

    def count(self, phase: str, backend: str, nbytes: int, seconds: float) -> None:
        with self._lock:
            entry = self._counts.setdefault((phase, backend), [0, 0.0, 0])
            entry[0] += nbytes
            entry[1] += seconds
            entry[2] += 1

    def take_counts(self) -> dict[tuple[str, str], list[float]]:
        """The counters since the last call: (phase, backend) -> [bytes, seconds, ops]."""
        with self._lock:
            counts, self._counts = self._counts, {}
        return counts

    def notify_release(self, endpoint: str, key: str) -> None:
        """Tell the producer it may free `key`. Best effort: a lost notice is swept later."""
        try:
            address = Endpoint.decode(endpoint).notify
        except DECODE_ERRORS:
            return
        sock = self._peers.get(address)
        if sock is None:
            if len(self._peers) >= 256:
                self._peers.pop(next(iter(self._peers))).close(0)
            sock = self._ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 1000)
            sock.setsockopt(zmq.SNDHWM, _NOTICE_HWM)
            connect_curve(sock, self.keys)
            sock.connect(address)
            self._peers[address] = sock
        try:
            sock.send(self._encoder.encode(Release(key=key)), zmq.NOBLOCK)
        except zmq.Again:
            log.debug("release notice for %s dropped (peer not reading)", key)

    def _serve_notices(self) -> None:
        while not self._stop.is_set():
            try:
                if not self._notices.poll(_NOTICE_POLL_MS):
                    continue
                frame = self._notices.recv(zmq.NOBLOCK)
            except zmq.ZMQError:
                if self._stop.is_set():
                    return
                log.warning("release notice socket error", exc_info=True)
                continue
            try:
                notice = self._decoder.decode(frame)
            except DECODE_ERRORS:
                log.warning("dropped an undecodable release notice (%d bytes)", len(frame))
                continue
            self.release(notice.key)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self._notices.close(0)
        for sock in self._peers.values():
            sock.close(0)
        for backend in (self.local, self.mooncake):
            if backend is not None:
                backend.close()
        self.pool.close()


__all__ = ["Exchange", "PoolFull"]
