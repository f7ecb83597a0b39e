"""Mooncake Transfer Engine backend: one batched read from the producer's pool into ours.

What this engine does that the design works around:
  - `*_sync_*` calls spin a core until done: every transfer runs on one engine thread (the
    GIL is released), so a worker loses at most one core to it and `Pull.poll()` never
    blocks the caller;
  - a frozen peer blocks a read for `MC_TRANSFER_TIMEOUT` seconds: we set it from
    `transfer.timeout_s` before the engine starts;
  - retrying within about a millisecond of a failure can leave the link to that peer failing
    for good: after a failure we wait at least `backoff_s` (>= 0.2 s) before the next read
    from the same peer;
  - polling a finished or unknown batch id crashes the process: we never poll batch ids,
    we use the synchronous batch read on the engine thread;
  - each engine takes two ports (its RPC port and the tcp transport's);
  - starting, it writes glog lines straight to fd 2, one at ERROR ("Local segment descriptor
    not found", before its own segment exists): we capture fd 2 while it starts and log what
    it wrote through our logger, less those two known lines;
  - a dead or silent peer costs a timeout per read: a peer that failed a read is marked dead
    for `dead_s` (as are peers other workers found dead, `mark_dead`), and pulls from it fail
    at once, so every job that needs it goes back a stage without waiting.
Metadata is exchanged peer to peer (`P2PHANDSHAKE`): no etcd or metadata server.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

from ..errors import TransferError
from ..dispatch import TensorDesc
from .base import Backend, Endpoint, Failure, FailedPull, FailureKind, Pull, PullStatus, \
    check_descs
from .pool import Pool, PoolFull

log = logging.getLogger(__name__)

MIN_BACKOFF_S = 0.2


class MooncakePull(Pull):
    def __init__(self, pool: Pool, future: Future, blocks: list[tuple[int, int]]):
        self.tensors = {}
        self._pool = pool
        self._future = future
        self._blocks = blocks

    def poll(self) -> PullStatus:
        if not self._future.done():
            return PullStatus.PENDING
        self.tensors, self.failure, self.nbytes = self._future.result()
        return PullStatus.FAILED if self.failure else PullStatus.DONE

    def wait(self, timeout_s: float) -> PullStatus:
        try:
            self._future.exception(timeout=timeout_s)
        except TimeoutError:
            return PullStatus.PENDING
        return self.poll()

    def close(self) -> None:
        if not self._future.done():
            self._future.result()  # the engine is writing into these blocks: let it finish
        self.tensors = {}
        for offset, nbytes in self._blocks:
            self._pool.free(offset, nbytes)
        self._blocks = []


class MooncakeBackend(Backend):
    name = "mooncake"

    def __init__(self, pool: Pool, *, host: str = "127.0.0.1", protocol: str = "tcp",
                 device: str = "", timeout_s: float = 10.0, retries: int = 2,
                 backoff_s: float = 0.5, dead_s: float = 30.0):
        # Read when the engine library loads and starts, not per call.
        os.environ.setdefault("MC_TRANSFER_TIMEOUT", str(max(1, int(timeout_s))))
        # The engine logs INFO per connection, ahead of any glog setup (GLOG_* is ignored):
        # its own knob keeps it to errors unless the environment asks for more.
        os.environ.setdefault("MC_LOG_LEVEL", "ERROR")
        try:
            from mooncake.engine import TransferEngine
        except ImportError as exc:
            raise TransferError("the Mooncake backend needs mooncake-transfer-engine "
                                "(pip install 'stagepool[transfer]')") from exc
        self.pool = pool
        self.retries = retries
        self.dead_s = dead_s
        self.backoff_s = max(MIN_BACKOFF_S, backoff_s)
        self._engine = TransferEngine()
        with _engine_stderr():
            started = self._engine.initialize(host, "P2PHANDSHAKE", protocol, device) == 0
            registered = started and self._engine.register_memory(pool.base, pool.nbytes) == 0
        if not started:
            raise TransferError(f"Mooncake engine failed to start ({protocol} on {host})")
        if not registered:
            raise TransferError("Mooncake could not register the pool")
        self._session = f"{host}:{self._engine.get_rpc_port()}"
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="mooncake")
        self._failed_at: dict[str, float] = {}  # peer -> monotonic time of its last failure
        self._dead_until: dict[str, float] = {}  # peer -> monotonic end of its dead spell
        self._lock = threading.Lock()

    def session(self) -> str:
        return self._session

    def reaches(self, endpoint: Endpoint) -> bool:
        return bool(endpoint.session)

    def mark_dead(self, peers: list[str]) -> None:
        """Treat `peers` as dead for `dead_s` (another worker failed to reach them)."""
        until = time.monotonic() + self.dead_s
        with self._lock:
            for peer in peers:
                self._dead_until[peer] = max(until, self._dead_until.get(peer, 0.0))

    def mark_alive(self, peers: list[str]) -> None:
        with self._lock:
            for peer in peers:
                self._dead_until.pop(peer, None)

    def dead(self, peer: str) -> bool:
        with self._lock:
            until = self._dead_until.get(peer)
            if until is not None and until <= time.monotonic():
                del self._dead_until[peer]
                until = None
        return until is not None

    def pull(self, endpoint: Endpoint, descs: list[TensorDesc]) -> Pull:
        bad = check_descs(endpoint, descs)
        if bad:
            return FailedPull(bad)
        if self.dead(endpoint.session):
            return FailedPull(Failure(FailureKind.PRODUCER_GONE,
                                      f"{endpoint.session} failed lately: counted as dead"))
        blocks: list[tuple[int, int]] = []
        try:
            for desc in descs:
                blocks.append((self.pool.alloc(desc.nbytes), desc.nbytes))
        except PoolFull as exc:
            for offset, nbytes in blocks:
                self.pool.free(offset, nbytes)
            return FailedPull(Failure(FailureKind.NO_ROOM, str(exc)))
        return MooncakePull(self.pool, self._thread.submit(self._read, endpoint, descs, blocks),
                            blocks)

    def read_raw(self, session: str, local: list[int], remote: list[int],
                 lengths: list[int]) -> int:
        """The engine's own batched read, for benchmarks: returns its status code."""
        return self._engine.batch_transfer_sync_read(session, local, remote, lengths)

    def _read(self, endpoint: Endpoint, descs: list[TensorDesc], blocks):
        """On the engine thread: read, retry after a backoff, verify."""
        local = [self.pool.base + offset for offset, _ in blocks]
        remote = [desc.address for desc in descs]
        lengths = [desc.nbytes for desc in descs]
        peer = endpoint.session
        status = -1
        for attempt in range(self.retries + 1):
            if self.dead(peer):  # found dead while this read waited its turn
                break
            with self._lock:
                failed_at = self._failed_at.get(peer)
            if failed_at is not None:
                # Never retry a peer within the engine's bad window after a failure.
                wait_s = failed_at + self.backoff_s - time.monotonic()
                if wait_s > 0:
                    time.sleep(wait_s)
            status = self._engine.batch_transfer_sync_read(peer, local, remote, lengths)
            if status >= 0:
                with self._lock:
                    self._failed_at.pop(peer, None)
                break
            with self._lock:
                self._failed_at[peer] = time.monotonic()
            log.warning("Mooncake read from %s failed (status %d, try %d of %d)", peer, status,
                        attempt + 1, self.retries + 1)
        if status < 0:
            self.mark_dead([peer])
            return {}, Failure(FailureKind.PRODUCER_GONE,
                               f"Mooncake read from {peer} failed {self.retries + 1} times "
                               f"(status {status})"), 0
        tensors = {}
        for desc, (offset, _) in zip(descs, blocks):
            if self.pool.checksum(offset, desc.nbytes) != desc.checksum:
                return {}, Failure(FailureKind.CHECKSUM,
                                   f"{desc.name}: checksum mismatch after the read"), 0
            tensors[desc.name] = self.pool.view(offset, desc.dtype, desc.shape, desc.nbytes)
        return tensors, None, sum(lengths)

    def close(self) -> None:
        self._thread.shutdown(wait=True)
        try:
            self._engine.unregister_memory(self.pool.base)
        except Exception:  # noqa: BLE001 - best effort at exit; the process is going away
            log.debug("unregister failed", exc_info=True)


_START_NOISE = ("Logging before InitGoogleLogging", "Local segment descriptor not found")


@contextlib.contextmanager
def _engine_stderr():
    """What the engine writes to fd 2 meanwhile, logged as warnings, less its start noise."""
    with tempfile.TemporaryFile() as captured:
        saved = os.dup(2)
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            for line in captured.read().decode(errors="replace").splitlines():
                if line.strip() and not any(noise in line for noise in _START_NOISE):
                    log.warning("mooncake: %s", line.strip())
