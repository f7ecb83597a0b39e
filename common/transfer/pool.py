"""A registered buffer pool: one memfd mapping, carved by a first-fit allocator.

One pool per worker process, registered once with every backend. The memfd
lets a consumer on the same host map the pool through `/proc/<pid>/fd/<fd>` with no copy, and
dies with the process: a killed producer leaves nothing behind in /dev/shm.

Layout: a 64-byte header (magic, token) then blocks aligned to `ALIGN_BYTES`. A block is
allocated for one tensor and freed when its hold (producer) or pull (consumer) ends.
"""

from __future__ import annotations

import bisect
import mmap
import os
import struct
import threading

import torch

from ..errors import TransferError
from ._checksum import checksum

MAGIC = 0x53504F4F4C303031  # "SPOOL001"
HEADER_BYTES = 64
ALIGN_BYTES = 256


class PoolFull(TransferError):
    """No free block large enough; holds must be released first."""


def torch_dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class Pool:
    def __init__(self, nbytes: int):
        if nbytes < HEADER_BYTES + ALIGN_BYTES:
            raise TransferError(f"pool of {nbytes} bytes is too small")
        self.nbytes = nbytes
        self.fd = os.memfd_create("stagepool-pool", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, nbytes)
        self._map = mmap.mmap(self.fd, nbytes)
        self.token = int.from_bytes(os.urandom(7), "little")
        self._map[:16] = struct.pack("<QQ", MAGIC, self.token)
        self.bytes = torch.frombuffer(self._map, dtype=torch.uint8)
        self._mv = memoryview(self._map)
        self.base = self.bytes.data_ptr()
        self._lock = threading.Lock()
        self._free: list[tuple[int, int]] = [(ALIGN_BYTES, nbytes - ALIGN_BYTES)]  # by offset
        self.used_bytes = 0

    # -- allocation ----------------------------------------------------------------------

    def alloc(self, nbytes: int) -> int:
        """Offset of a block of at least `nbytes`; raises PoolFull."""
        size = max(ALIGN_BYTES, -(-nbytes // ALIGN_BYTES) * ALIGN_BYTES)
        with self._lock:
            for i, (offset, free) in enumerate(self._free):
                if free >= size:
                    if free == size:
                        del self._free[i]
                    else:
                        self._free[i] = (offset + size, free - size)
                    self.used_bytes += size
                    return offset
        raise PoolFull(f"no free block of {nbytes} bytes in a {self.nbytes}-byte pool "
                       f"({self.used_bytes} bytes in use)")

    def largest_free(self) -> int:
        """The largest block `alloc` could hand out now."""
        with self._lock:
            return max((free for _, free in self._free), default=0)

    def free(self, offset: int, nbytes: int) -> None:
        size = max(ALIGN_BYTES, -(-nbytes // ALIGN_BYTES) * ALIGN_BYTES)
        with self._lock:
            i = bisect.bisect(self._free, (offset, 0))
            start, end = offset, offset + size
            # Coalesce with the neighbours so the pool does not fragment into small blocks.
            if i < len(self._free) and self._free[i][0] == end:
                end += self._free.pop(i)[1]
            if i > 0 and sum(self._free[i - 1]) == start:
                start = self._free[i - 1][0]
                self._free[i - 1] = (start, end - start)
            else:
                self._free.insert(i, (start, end - start))
            self.used_bytes -= size

    # -- views ---------------------------------------------------------------------------

    def view(self, offset: int, dtype: str, shape: list[int], nbytes: int) -> torch.Tensor:
        """A zero-copy tensor over `nbytes` at `offset`."""
        return self.bytes[offset:offset + nbytes].view(torch_dtype(dtype)).view(shape)

    def write(self, offset: int, tensor: torch.Tensor) -> int:
        """Copy a tensor's bytes to `offset`; returns its checksum."""
        flat = tensor.detach().reshape(-1)
        if flat.device.type != "cpu":
            flat = flat.cpu()  # GPU tensors stage through the host pool (see exchange.py)
        raw = flat.contiguous().view(torch.uint8)
        dst = self.bytes[offset:offset + raw.numel()]
        dst.copy_(raw)
        return self.checksum(offset, raw.numel())

    def checksum(self, offset: int, nbytes: int) -> int:
        return checksum(self._mv[offset:offset + nbytes])

    def close(self) -> None:
        """Drop our references; the mapping goes when the last tensor view does."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.bytes = None
        self._mv.release()
        self._map = None


def header_token(buffer) -> int | None:
    """The token in a mapped pool's header, or None if it is not a pool."""
    magic, token = struct.unpack_from("<QQ", buffer, 0)
    return token if magic == MAGIC else None
