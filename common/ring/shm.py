"""`shm` backend: ring memory in a POSIX shared-memory segment, atomics from a C helper.

The broker creates one segment per ring (`/dev/shm/<name>`) and unlinks it on close; workers on
the same host map it by name. Every operation is a CPU atomic on the shared mapping, and `wait`
sleeps on a futex, so an idle consumer costs nothing and wakes within microseconds.

We open the segment with os.open + mmap rather than multiprocessing.shared_memory: the latter
registers attached segments with a resource tracker that unlinks them when an attaching
process exits (Python 3.11), which would tear the ring away from the broker.
"""

from __future__ import annotations

import mmap
import os
import re

from ..errors import RingError
from ._atomics import Region
from .base import WAKE_ALL, WAKE_ANY, RemoteMemory

_SHM_DIR = "/dev/shm"
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,200}$")


class RegionMemory(RemoteMemory):
    """Ring memory through a `Region` of this process: the broker's own view of its rings."""

    def __init__(self, region: Region, nbytes: int):
        self._region = region
        self.nbytes = nbytes

    def read(self, offset: int, nbytes: int) -> bytes:
        return self._region.read(offset, nbytes)

    def write(self, offset: int, data: bytes) -> None:
        self._region.write(offset, data)

    def load(self, offset: int) -> int:
        return self._region.load(offset)

    def store(self, offset: int, value: int) -> None:
        self._region.store(offset, value)

    def fetch_add(self, offset: int, delta: int) -> int:
        return self._region.fetch_add(offset, delta)

    def compare_and_swap(self, offset: int, expected: int, desired: int) -> int:
        return self._region.cas(offset, expected, desired)

    def wait(self, offset: int, expected_u32: int, timeout_s: float,
             mask: int = WAKE_ANY) -> bool:
        return self._region.wait(offset, expected_u32, timeout_s, mask)

    def wake(self, offset: int, count: int = WAKE_ALL, mask: int = WAKE_ANY) -> None:
        self._region.wake(offset, count, mask)


class ShmMemory(RegionMemory):
    """A mapped segment. `create=True` makes (and on close unlinks) a zeroed segment."""

    def __init__(self, name: str, nbytes: int = 0, *, create: bool = False):
        if not _NAME.match(name):
            raise RingError(f"bad shm segment name {name!r}")
        self.name = name
        self.path = os.path.join(_SHM_DIR, name)
        self._owner = create
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        try:
            fd = os.open(self.path, flags, 0o600)
        except FileNotFoundError:
            raise RingError(f"no shm segment {name!r} (is the broker on this host?)") from None
        try:
            if create:
                os.ftruncate(fd, nbytes)
            self.nbytes = os.fstat(fd).st_size
            self._map = mmap.mmap(fd, self.nbytes)
        finally:
            os.close(fd)
        self._region = Region(self._map)

    def close(self) -> None:
        if self._region is None:
            return
        self._region.release()
        self._region = None
        self._map.close()
        if self._owner:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
