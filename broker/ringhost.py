"""The rings the broker owns: three per stage (its priority lanes, common/ring/lanes.py), in
shared memory, reachable three ways.

Each ring lives in one shm segment; the main lane's also holds the stage's lease cells. Same-host workers map it (`shm`); remote workers reach the
same bytes through the `TcpRingServer` thread or an RDMA registration (`VerbsHost`), so all
three kinds of client are atomic with respect to each other on one ring.

Segment names carry the broker id: a restarted broker makes fresh rings (rebuilt from Redis)
and never maps a dead broker's memory.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from pathlib import Path

from ..common.config import Config
from ..common.errors import RingError
from ..common.ring import Layout, Ring, lanes
from ..common.ring.shm import ShmMemory
from ..common.ring.tcpserver import TcpRingServer
from ..common.security import Keys, require
from ..common.wire import RingAttach

log = logging.getLogger(__name__)


class RingHost:
    """Creates, serves and finally unlinks the stage rings. Also hands out lease cells."""

    def __init__(self, config: Config, broker_id: str, keys: Keys | None = None):
        self.config = config
        self.host = socket.gethostname()
        layout = Layout(config.ring.capacity, config.ring.slot_bytes, config.ring.cells)
        self.layout = layout
        self.memories: dict[str, ShmMemory] = {}  # by ring name (lanes.ring_name)
        self.rings: dict[str, Ring] = {}  # each stage's main lane: leases, normal priority
        self.lanes: dict[str, list[Ring]] = {}  # each stage's rings by lane
        lane_layout = Layout(config.ring.capacity, config.ring.slot_bytes, 1)  # no cells
        ns = config.redis.namespace
        remove_orphan_segments(ns)
        for stage in config.pipeline.stages:
            rings = []
            for lane in range(len(lanes.LANES)):
                ring_name = lanes.ring_name(stage.name, lane)
                name = f"stagepool-{ns}-{os.getpid()}-{broker_id}-{ring_name}"
                shape = layout if lane == lanes.MAIN else lane_layout
                memory = ShmMemory(name, shape.nbytes, create=True)
                self.memories[ring_name] = memory
                rings.append(Ring.format(memory, shape))
            self.lanes[stage.name] = rings
            self.rings[stage.name] = rings[lanes.MAIN]
        self.tcp: TcpRingServer | None = None
        if config.ring.tcp_bind:
            require("ring.tcp_bind", config.ring.tcp_bind, keys, config.security.insecure)
            regions = {stage: memory._region for stage, memory in self.memories.items()}
            sizes = {stage: memory.nbytes for stage, memory in self.memories.items()}
            self.tcp = TcpRingServer(config.ring.tcp_bind, regions, sizes,
                                     key=keys.ring_key if keys else None)
            self.tcp.start()
        self.verbs = None
        if config.ring.verbs_device:
            from ..common.ring.verbs import VerbsHost

            regions = {stage: (m._map, m.nbytes) for stage, m in self.memories.items()}
            self.verbs = VerbsHost(config.ring.verbs_device, regions)
        self._cells: dict[str, dict[int, str]] = {s: {} for s in self.rings}
        self._lock = threading.Lock()

    def attach_info(self, stage: str, lane: int = lanes.MAIN) -> RingAttach:
        name = lanes.ring_name(stage, lane)
        memory = self.memories[name]
        return RingAttach(
            stage=name,
            shm_name=memory.name,
            tcp_endpoint=self.tcp_endpoint(),
            host=self.host,
            verbs={"device": self.config.ring.verbs_device} if self.verbs else {},
            nbytes=memory.nbytes,
        )

    def tcp_endpoint(self) -> str:
        """What workers are told to dial for the tcp ring ("" when it is off)."""
        return (self.config.ring.tcp_advertise or self.tcp.endpoint) if self.tcp else ""

    def allocate_cells(self, stage: str, worker_id: str, count: int) -> list[int]:
        """`count` lease cells for `worker_id`, or RingError. A cell is given only once it
        holds no lease left to recover, and fenced first: whoever had it before (a worker
        frozen or partitioned past its timeout) can never change it again."""
        ring = self.rings[stage]
        with self._lock:
            owners = self._cells[stage]
            cells = []
            for cell in range(self.layout.cells):
                if len(cells) == count:
                    break
                if cell not in owners and ring.read_lease(cell) is None and ring.fence(cell):
                    cells.append(cell)
            if len(cells) < count:
                raise RingError(f"no {count} free lease cells in the {stage} ring "
                                f"({self.layout.cells} cells, {len(owners)} taken)")
            for cell in cells:
                owners[cell] = worker_id
            return cells

    def free_cell(self, stage: str, worker_id: str) -> None:
        with self._lock:
            owners = self._cells[stage]
            for cell, owner in list(owners.items()):
                if owner == worker_id:
                    del owners[cell]

    def close(self) -> None:
        if self.tcp:
            self.tcp.stop()
        if self.verbs:
            self.verbs.close()
        for memory in self.memories.values():
            memory.close()


def remove_orphan_segments(namespace: str) -> None:
    """Unlink ring segments of this namespace left by brokers that died without cleaning up
    (SIGKILL): their names carry the broker's pid, which no longer runs."""
    prefix = f"stagepool-{namespace}-"
    for path in Path("/dev/shm").glob(prefix + "*"):
        pid = path.name[len(prefix):].split("-", 1)[0]
        if not pid.isdigit() or Path(f"/proc/{pid}").exists():
            continue
        try:
            path.unlink()
            log.info("removed orphan ring segment %s", path.name)
        except OSError:
            pass
