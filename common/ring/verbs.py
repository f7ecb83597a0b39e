"""`verbs` backend: ring operations as RDMA verbs on an RC queue pair (pyverbs).

The broker (`VerbsHost`) registers each ring's shared mapping once as a memory region with
REMOTE_READ | REMOTE_WRITE | REMOTE_ATOMIC; a worker (`VerbsMemory`) opens one RC QP to it and
turns each ring operation into one work request:

    read               IBV_WR_RDMA_READ            into the worker's scratch MR
    write / store      IBV_WR_RDMA_WRITE           from the scratch MR
    fetch_add          IBV_WR_ATOMIC_FETCH_AND_ADD old value lands in the scratch MR
    compare_and_swap   IBV_WR_ATOMIC_CMP_AND_SWP   old value lands in the scratch MR

Queue-pair details (qpn, psn, lid, gid) travel over the control socket (`wire.VerbsConnect`).
Each operation is signalled and waited for (with a deadline) before the next: the ring's
ordering needs the CAS result before anything that depends on it. There is no remote wake-up
in verbs, so `wait` polls (base class). Atomics are 8-byte aligned as the HCA requires; whether
they are atomic against the broker's CPU atomics depends on the device's atomic capability
(IBV_ATOMIC_GLOB): `VerbsHost` refuses a device that reports IBV_ATOMIC_NONE.

No RDMA device exists on the machines this was written on: the calls are checked against
pyverbs' API by tests/test_verbs_api.py, and the ring logic runs over shm and tcp.
"""

from __future__ import annotations

import ctypes
import random
import threading
import time

from ..errors import RingError, TransportError
from .base import RemoteMemory

_SCRATCH_BYTES = 64 << 10
_PORT = 1
_GID_INDEX = 0
_CQ_ENTRIES = 16


def _verbs():
    """Import pyverbs lazily: hosts without RDMA never need it installed."""
    try:
        import pyverbs.enums as e
        from pyverbs.addr import GID, AHAttr, GlobalRoute
        from pyverbs.cq import CQ
        from pyverbs.device import Context
        from pyverbs.mr import MR
        from pyverbs.pd import PD
        from pyverbs.qp import QP, QPAttr, QPCap, QPInitAttr
        from pyverbs.wr import SGE, SendWR
    except ImportError as exc:
        raise RingError(f"verbs backend needs pyverbs (python3-pyverbs): {exc}") from None
    return (e, GID, AHAttr, GlobalRoute, CQ, Context, MR, PD, QP, QPAttr, QPCap, QPInitAttr,
            SGE, SendWR)


class _Endpoint:
    """One side of an RC connection: CQ and QP on `device`, in a given or a new PD.

    `owns_pd` says whether close() releases the context and PD too (the host shares one PD
    between the ring MRs and all its QPs: a QP can only reach MRs of its own PD).
    """

    def __init__(self, device: str, ctx=None, pd=None):
        (self.e, self.GID, self.AHAttr, self.GlobalRoute, CQ, Context, self.MR, PD, QP,
         self.QPAttr, QPCap, QPInitAttr, self.SGE, self.SendWR) = _verbs()
        e = self.e
        self.owns_pd = ctx is None
        self.ctx = ctx if ctx is not None else Context(name=device)
        self.pd = pd if pd is not None else PD(self.ctx)
        self.cq = CQ(self.ctx, _CQ_ENTRIES)
        cap = QPCap(max_send_wr=_CQ_ENTRIES, max_recv_wr=1, max_send_sge=1, max_recv_sge=1)
        init = QPInitAttr(qp_type=e.IBV_QPT_RC, scq=self.cq, rcq=self.cq, cap=cap)
        self.qp = QP(self.pd, init)
        self.psn = random.getrandbits(24)
        port = self.ctx.query_port(_PORT)
        self.lid = port.lid
        self.gid = str(self.ctx.query_gid(_PORT, _GID_INDEX))

    def info(self) -> dict:
        return {"qpn": self.qp.qp_num, "psn": self.psn, "lid": self.lid, "gid": self.gid}

    def connect(self, peer: dict, access: int) -> None:
        """RESET -> INIT -> RTR -> RTS towards `peer` (an `info()` dict)."""
        e = self.e
        attr = self.QPAttr(qp_state=e.IBV_QPS_INIT)
        attr.qp_access_flags = access
        attr.pkey_index = 0
        attr.port_num = _PORT
        self.qp.to_init(attr)
        attr = self.QPAttr(qp_state=e.IBV_QPS_RTR)
        attr.path_mtu = e.IBV_MTU_1024
        attr.dest_qp_num = peer["qpn"]
        attr.rq_psn = peer["psn"]
        attr.max_dest_rd_atomic = 1
        attr.min_rnr_timer = 12
        route = self.GlobalRoute(dgid=self.GID(peer["gid"]), sgid_index=_GID_INDEX)
        attr.ah_attr = self.AHAttr(port_num=_PORT, is_global=1, grh=route, dlid=peer["lid"])
        self.qp.to_rtr(attr)
        attr = self.QPAttr(qp_state=e.IBV_QPS_RTS)
        attr.sq_psn = self.psn
        attr.timeout = 14
        attr.retry_cnt = 7
        attr.rnr_retry = 7
        attr.max_rd_atomic = 1
        self.qp.to_rts(attr)

    def close(self) -> None:
        resources = [self.qp, self.cq] + ([self.pd, self.ctx] if self.owns_pd else [])
        for resource in resources:
            resource.close()


class VerbsHost:
    """Broker side: one registration per ring, one QP per attached worker."""

    def __init__(self, device: str, regions: dict[str, tuple[object, int]]):
        """`regions` maps ring name to (writable buffer, nbytes)."""
        e = _verbs()[0]
        self.device = device
        self._lock = threading.Lock()
        self._endpoints: list[_Endpoint] = []
        probe = _Endpoint(device)
        if probe.ctx.query_device().atomic_caps == e.IBV_ATOMIC_NONE:
            probe.close()
            raise RingError(f"{device} has no RDMA atomics (IBV_ATOMIC_NONE)")
        self._probe = probe
        access = (e.IBV_ACCESS_LOCAL_WRITE | e.IBV_ACCESS_REMOTE_READ
                  | e.IBV_ACCESS_REMOTE_WRITE | e.IBV_ACCESS_REMOTE_ATOMIC)
        self._access = access
        self._mrs = {}
        for name, (buffer, nbytes) in regions.items():
            address = ctypes.addressof(ctypes.c_char.from_buffer(buffer))
            mr = probe.MR(probe.pd, nbytes, access, address=address)
            self._mrs[name] = (mr, address, nbytes)

    def accept(self, ring: str, peer: dict) -> dict:
        """Answer a worker's `VerbsConnect`: our QP info plus the ring's rkey and address."""
        if ring not in self._mrs:
            raise RingError(f"no ring {ring!r}")
        mr, address, nbytes = self._mrs[ring]
        with self._lock:
            endpoint = _Endpoint(self.device, self._probe.ctx, self._probe.pd)
            endpoint.connect(peer, self._access)
            self._endpoints.append(endpoint)
        return {**endpoint.info(), "rkey": mr.rkey, "addr": address, "nbytes": nbytes}

    def close(self) -> None:
        for mr, _, _ in self._mrs.values():
            mr.close()
        for endpoint in self._endpoints:
            endpoint.close()
        self._probe.close()


class VerbsMemory(RemoteMemory):
    """Worker side. `connect` sends our QP info to the broker and returns its answer."""

    def __init__(self, device: str, ring: str, connect, *, timeout_s: float = 5.0):
        self._ep = _Endpoint(device)
        e = self._ep.e
        self._e = e
        self._scratch = self._ep.MR(self._ep.pd, _SCRATCH_BYTES, e.IBV_ACCESS_LOCAL_WRITE)
        remote = connect(ring, self._ep.info())
        self._ep.connect(remote, e.IBV_ACCESS_LOCAL_WRITE)
        self._rkey = remote["rkey"]
        self._base = remote["addr"]
        self.nbytes = remote["nbytes"]
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._wr_id = 0

    def _post(self, opcode: int, offset: int, nbytes: int, *, compare_add: int = 0,
              swap: int = 0) -> None:
        if not 0 <= offset <= self.nbytes - nbytes or nbytes > _SCRATCH_BYTES:
            raise TransportError(f"op of {nbytes} bytes at {offset} outside the ring")
        ep, e = self._ep, self._e
        self._wr_id += 1
        sge = ep.SGE(self._scratch.buf, nbytes, self._scratch.lkey)
        wr = ep.SendWR(wr_id=self._wr_id, opcode=opcode, num_sge=1, sg=[sge],
                       send_flags=e.IBV_SEND_SIGNALED)
        if opcode in (e.IBV_WR_ATOMIC_FETCH_AND_ADD, e.IBV_WR_ATOMIC_CMP_AND_SWP):
            wr.set_wr_atomic(self._rkey, self._base + offset, compare_add, swap)
        else:
            wr.set_wr_rdma(self._rkey, self._base + offset)
        ep.qp.post_send(wr)
        deadline = time.monotonic() + self.timeout_s
        while True:
            npolled, wcs = ep.cq.poll(1)
            if npolled:
                if wcs[0].status != e.IBV_WC_SUCCESS:
                    raise TransportError(f"verbs op failed: wc status {wcs[0].status}")
                return
            if time.monotonic() >= deadline:
                raise TransportError("verbs op timed out")

    def read(self, offset: int, nbytes: int) -> bytes:
        with self._lock:
            self._post(self._e.IBV_WR_RDMA_READ, offset, nbytes)
            return self._scratch.read(nbytes, 0)

    def write(self, offset: int, data: bytes) -> None:
        with self._lock:
            self._scratch.write(bytes(data), len(data), 0)
            self._post(self._e.IBV_WR_RDMA_WRITE, offset, len(data))

    def fetch_add(self, offset: int, delta: int) -> int:
        with self._lock:
            self._post(self._e.IBV_WR_ATOMIC_FETCH_AND_ADD, offset, 8,
                       compare_add=delta & 0xFFFFFFFFFFFFFFFF)
            return int.from_bytes(self._scratch.read(8, 0), "little")

    def compare_and_swap(self, offset: int, expected: int, desired: int) -> int:
        with self._lock:
            self._post(self._e.IBV_WR_ATOMIC_CMP_AND_SWP, offset, 8,
                       compare_add=expected, swap=desired)
            return int.from_bytes(self._scratch.read(8, 0), "little")

    def close(self) -> None:
        if self._scratch is not None:
            self._scratch.close()
            self._scratch = None
            self._ep.close()
