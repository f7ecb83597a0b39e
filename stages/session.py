"""A worker's session with the broker: register, attach the rings, heartbeat, reattach.

  1. `attach` registers (retrying until the broker answers) and opens what the answer names:
     the ring to consume with our lease cells, the ring to hand on to, and the job store;
  2. the heartbeat thread beats the lease cells in `leased` (every min(heartbeat, lease/3)),
     pings the broker every heartbeat_ms with the worker's figures (busy, jobs done, its GPU's
     memory and utilisation), and runs the caller's periodic chores;
  3. a restarted broker (a new broker id, or "unknown worker") sets `reattach`: the worker
     calls `attach` again between batches, and a fresh broker rebuilds every job from Redis;
  4. `close` unregisters (the broker would forget us after worker_timeout_ms anyway) and
     closes the rings.
The session never touches jobs: it only keeps the worker reachable and its leases alive.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from typing import Callable

import msgspec

from ..common import wire
from ..common.addresses import as_seen_from, endpoint_host, redact
from ..common.client import BrokerClient
from ..common.config import Config
from ..common.dispatch import Dispatch
from ..common.errors import RemoteError, StagepoolError, StoreUnavailable
from ..common.blobs import BlobStore
from ..common.jobstore import JobStore
from ..common.security import Keys
from ..common.ring import Ring, lanes, open_memory
from .gpu import GpuProbe

log = logging.getLogger(__name__)


class Session:
    def __init__(self, config: Config, stage: str, endpoint: str, transport: str,
                 worker_id: str, redis_url: str = ""):
        self.config = config
        self.stage = stage
        self.endpoint = endpoint
        self.broker_host = endpoint_host(endpoint)  # what the broker's own addresses mean here
        self.redis_url = redis_url  # our own job store, over the broker's offer
        self.keys = Keys.from_config(config)  # CURVE to the broker, the ring's key
        self.transport = transport
        self.worker_id = worker_id
        self.registered: wire.Registered | None = None
        self.consume: Ring | None = None  # the main lanes (leases, normal priority)
        self.produce: Ring | None = None
        self.consume_lanes: list[Ring] = []  # every lane, by lane (lanes.py)
        self.produce_lanes: list[Ring] = []
        self.store: JobStore | None = None
        self.reattach = threading.Event()
        self.leased: tuple[int, ...] = ()  # our cells holding a lease: the heartbeat beats them
        self.device = "cpu"  # what the stage runs on, told at registration
        self.gpu: GpuProbe | None = None  # its card's figures go with each heartbeat
        self.jobs_done = 0  # attempts committed, told with each heartbeat
        self._replaces = ""  # the identity `renew` gave up, until the broker hears of it
        self.session = ""  # our Mooncake session, sent with each heartbeat (proof of life)
        # The broker's news of producers: (found dead, back alive).
        self.on_peers: Callable[[list[str], list[str]], None] | None = None
        self._stopped = threading.Event()
        self._heartbeat: threading.Thread | None = None

    @property
    def cells(self) -> list[int]:
        return self.registered.cells or [self.registered.cell]

    def attach(self, giving_up: threading.Event) -> None:
        """Register, retrying until the broker answers (or `giving_up` is set: then raise)."""
        self._close_rings()
        settings = self.config.worker
        while True:
            try:
                with self._client() as client:
                    registered = client.call(wire.Register(
                        worker_id=self.worker_id, stage=self.stage, host=socket.gethostname(),
                        pid=os.getpid(),
                        transport="shm" if self.transport == "auto" else self.transport,
                        cells=self.config.stage(self.stage).max_batch, device=self.device,
                        replaces=self._replaces))
                    self._open_store(registered)
                    self.consume = Ring.attach(self._open(registered.consume, client))
                    self.consume_lanes = self._lanes(registered.consume_lanes, self.consume,
                                                     client)
                    if registered.produce:
                        self.produce = Ring.attach(self._open(registered.produce, client))
                        self.produce_lanes = self._lanes(registered.produce_lanes,
                                                         self.produce, client)
                break
            except (StagepoolError, OSError) as exc:
                self._close_rings()
                if giving_up.is_set():
                    raise
                log.warning("registering with %s: %s; retrying", self.endpoint, exc)
                time.sleep(settings.register_retry_s)
        self.registered = registered
        self._replaces = ""
        self.reattach.clear()

    def _open_store(self, registered: wire.Registered) -> None:
        """Open the job store (ours, or the one the broker offers) and reach it before taking
        work: a clear error (the attach retries) otherwise."""
        offered = registered.redis_url
        url = self.redis_url or as_seen_from(offered, self.broker_host)
        if self.store is None or self.store.url != url:
            if self.store is not None:
                self.store.close()
            self.store = JobStore(url, registered.namespace,
                                  events_maxlen=registered.events_maxlen,
                                  retention_s=registered.retention_s,
                                  socket_timeout_s=self.config.redis.socket_timeout_s)
        try:
            self.store.run_id()
        except StagepoolError as exc:
            hint = ("" if self.redis_url else
                    f" (the broker offers {redact(offered)}; set this worker's own with "
                    "--redis-url or STAGEPOOL_REDIS_URL)")
            raise StoreUnavailable(f"cannot reach Redis at {redact(url)}{hint}: {exc}") from None

    def blobs(self) -> BlobStore:
        """The deployment's stored inputs (a job's conditioning image), in our Redis."""
        return BlobStore(self.store, self.config.inputs.ttl_s)

    def renew(self) -> None:
        """Take a fresh identity (and so fresh cells) at the next attach, leaving our current
        leases to expire: after a failure mid-batch they are the jobs' only trace."""
        self._replaces = self.worker_id  # told at the next attach, so its cells are freed
        self.worker_id = f"{self.worker_id.rsplit('-', 1)[0]}-{uuid.uuid4().hex[:6]}"
        self.reattach.set()

    def rewind(self, dispatch: Dispatch, error: str, dead_peer: str = "") -> str:
        """Ask the broker to run the previous stage again (our inputs died with it), and to
        tell every worker about the producer we found dead."""
        with self._client() as client:
            return client.call(wire.Rewind(job_id=dispatch.job_id, stage=dispatch.stage,
                                           attempt=dispatch.attempt, worker_id=self.worker_id,
                                           error=error, dead_peer=dead_peer)).status

    def start_heartbeat(self, busy: threading.Event, chores: Callable[[], None]) -> None:
        self._heartbeat = threading.Thread(target=self._beat_loop, args=(busy, chores),
                                           name="heartbeat", daemon=True)
        self._heartbeat.start()

    def close(self) -> None:
        self._stopped.set()
        if self._heartbeat is not None:
            self._heartbeat.join(timeout=self.config.worker.control_timeout_s)
        if self.registered is not None:
            try:
                with self._client() as client:
                    client.call(wire.Unregister(worker_id=self.worker_id))
            except StagepoolError:
                log.info("could not unregister; the broker drops us after its timeout")
        self._close_rings()
        if self.store is not None:
            self.store.close()

    # -- internals ------------------------------------------------------------------------

    def _client(self) -> BrokerClient:
        return BrokerClient(self.endpoint, timeout_s=self.config.worker.control_timeout_s,
                            name=self.worker_id, keys=self.keys)

    def _open(self, attach: wire.RingAttach, client: BrokerClient):
        attach = msgspec.structs.replace(
            attach, tcp_endpoint=as_seen_from(attach.tcp_endpoint, self.broker_host))
        def verbs_connect(ring: str, qp: dict) -> dict:
            return client.call(wire.VerbsConnect(worker_id=self.worker_id, stage=ring, qp=qp)).qp

        return open_memory(attach, self.transport, verbs_connect=verbs_connect,
                           key=self.keys.ring_key if self.keys else None)

    def _lanes(self, attaches: list[wire.RingAttach], main: Ring, client) -> list[Ring]:
        return [main if lane == lanes.MAIN else Ring.attach(self._open(attach, client))
                for lane, attach in enumerate(attaches)]

    def _close_rings(self) -> None:
        for ring in {*self.consume_lanes, *self.produce_lanes, self.consume, self.produce}:
            if ring is not None:
                ring.mem.close()
        self.consume = self.produce = None
        self.consume_lanes, self.produce_lanes = [], []

    def _beat_loop(self, busy: threading.Event, chores: Callable[[], None]) -> None:
        client = None
        told: set[int] = set()  # lost cells already logged (of the ring `told_of`)
        told_of = None
        next_ping = 0.0
        while not self._stopped.is_set():
            registered, ring = self.registered, self.consume
            if ring is not told_of:
                told, told_of = set(), ring
            if busy.is_set() and ring is not None:
                try:
                    for cell in self.leased:
                        if not ring.beat(cell) and ring.lost(cell) and cell not in told:
                            told.add(cell)
                            log.warning("lease cell %d was taken back by the broker: the "
                                        "attempt in it is superseded", cell)
                except StagepoolError:
                    log.warning("lease refresh failed", exc_info=True)
            now = time.monotonic()
            if now >= next_ping and not self.reattach.is_set():
                next_ping = now + registered.heartbeat_ms / 1000
                try:
                    client = client or self._client()
                    ack = client.call(wire.Heartbeat(
                        worker_id=self.worker_id, busy=busy.is_set(), jobs_done=self.jobs_done,
                        gpu=self.gpu.sample() if self.gpu is not None else None,
                        session=self.session))
                    if ack.broker_id != registered.broker_id:
                        self.reattach.set()
                    if self.on_peers is not None:
                        self.on_peers(ack.dead_peers, ack.revived_peers)
                except RemoteError:
                    self.reattach.set()  # unknown worker: the broker restarted
                except StagepoolError:
                    if client is not None:
                        client.close()
                    client = None
                try:
                    chores()
                except Exception:
                    log.warning("periodic chores failed", exc_info=True)
            self._stopped.wait(min(registered.heartbeat_ms, registered.lease_ms / 3) / 1000)
        if client is not None:
            client.close()
