"""Same-host backend: map the producer's pool and read it in place, with no copy.

The consumer opens `/proc/<pid>/fd/<fd>` (the producer's memfd) and maps it copy-on-write:
reads see the producer's pages directly; a stage that writes into an input gets private pages,
so the producer's held copy stays intact for a replay. A producer that has exited has no
/proc entry: that is PRODUCER_GONE, and the job goes back to its stage.

GPU tensors between GPUs of one host would use CUDA IPC behind this same interface (the
producer exports an IPC handle for its device pool in place of the memfd); the pools here are
host memory, see exchange.py.
"""

from __future__ import annotations

import mmap
import os
from collections import OrderedDict

import torch

from ..dispatch import TensorDesc
from ._checksum import checksum
from .base import Backend, Endpoint, Failure, FailedPull, FailureKind, Pull, PullStatus, \
    check_descs, host_identity
from .pool import header_token, torch_dtype

_MAPPINGS_KEPT = 32


class LocalPull(Pull):
    def __init__(self, tensors: dict, failure: Failure | None, nbytes: int):
        self.tensors = tensors
        self.failure = failure
        self.nbytes = nbytes

    def poll(self) -> PullStatus:
        return PullStatus.FAILED if self.failure else PullStatus.DONE

    def close(self) -> None:
        self.tensors = {}


class LocalBackend(Backend):
    name = "local"

    def __init__(self):
        self.host = host_identity()
        self._maps: OrderedDict[tuple[int, int, int], torch.Tensor] = OrderedDict()

    def reaches(self, endpoint: Endpoint) -> bool:
        return endpoint.host == self.host

    def pull(self, endpoint: Endpoint, descs: list[TensorDesc]) -> Pull:
        bad = check_descs(endpoint, descs)
        if bad:
            return FailedPull(bad)
        try:
            pool = self._map(endpoint)
        except OSError as exc:
            return FailedPull(Failure(FailureKind.PRODUCER_GONE,
                                      f"cannot map pid {endpoint.pid}'s pool: {exc}"))
        if pool is None:
            return FailedPull(Failure(FailureKind.PRODUCER_GONE,
                                      f"pid {endpoint.pid} fd {endpoint.fd} is not that pool"))
        tensors, total = {}, 0
        for desc in descs:
            offset = desc.address - endpoint.base
            raw = pool[offset:offset + desc.nbytes]
            if checksum(raw.numpy()) != desc.checksum:
                return FailedPull(Failure(FailureKind.CHECKSUM,
                                          f"{desc.name}: checksum mismatch in the producer pool"))
            tensors[desc.name] = raw.view(torch_dtype(desc.dtype)).view(desc.shape)
            total += desc.nbytes
        return LocalPull(tensors, None, total)

    def _map(self, endpoint: Endpoint) -> torch.Tensor | None:
        key = (endpoint.pid, endpoint.fd, endpoint.token)
        pool = self._maps.get(key)
        if pool is not None:
            # Our mapping would keep a dead producer's pages readable; its holds die with it
            # on every backend, so that operators see one behaviour.
            try:
                os.kill(endpoint.pid, 0)
            except ProcessLookupError:
                del self._maps[key]
                raise OSError(f"pid {endpoint.pid} has exited") from None
            self._maps.move_to_end(key)
            return pool
        fd = os.open(f"/proc/{endpoint.pid}/fd/{endpoint.fd}", os.O_RDONLY)
        try:
            if os.fstat(fd).st_size != endpoint.nbytes:
                return None
            mapping = mmap.mmap(fd, endpoint.nbytes, flags=mmap.MAP_PRIVATE,
                                prot=mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        if header_token(mapping) != endpoint.token:
            mapping.close()
            return None
        pool = torch.frombuffer(mapping, dtype=torch.uint8)
        self._maps[key] = pool
        while len(self._maps) > _MAPPINGS_KEPT:
            # The mapping itself lives on while a tensor still views it.
            self._maps.popitem(last=False)
        return pool

    def close(self) -> None:
        self._maps.clear()
