"""The ring's memory layout: header offsets, slot and lease-cell geometry, wait channels.

protocol.py has the map of the memory and the protocol over it; this module is the numbers.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ..errors import RingError

MAGIC = 0x31474E4952505053  # b"SPPRING1" little-endian
VERSION = 1
OFF_ENQUEUE = 64
OFF_DEQUEUE = 128
OFF_SLEEPERS = 192
OFF_WATCHERS = 200
# Wait/wake masks (futex bitsets): a publish wakes one consumer, not every idle worker of the
# stage, and the tcp server's watchers (which forward to remote waits) apart from them.
WAKE_CONSUMERS = 1
WAKE_WATCHERS = 2
HEADER_BYTES = 256
SLOT_HEADER_BYTES = 16
CELL_BYTES = 128
CELL_STOP = 104  # offset in a cell of the owner's stop request (the gen of the lease to stop)
JOB_ID_MAX_BYTES = 64
TOMBSTONE = 0xFFFFFFFF  # slot len marking a position the owner skipped
OWNER_LOCK = 1 << 63  # seq bit the owner holds while it writes a tombstone

_HEADER = struct.Struct("<QIIQII")


@dataclass(frozen=True)
class Layout:
    """Geometry of one ring. `capacity` is a power of two; `slot_bytes` a multiple of 64."""

    capacity: int
    slot_bytes: int = 1024
    cells: int = 64

    def __post_init__(self):
        if self.capacity < 2 or self.capacity & (self.capacity - 1):
            raise RingError(f"capacity must be a power of two >= 2, got {self.capacity}")
        if self.slot_bytes < 64 or self.slot_bytes % 64:
            raise RingError(f"slot_bytes must be a multiple of 64, got {self.slot_bytes}")
        if self.cells < 1:
            raise RingError("a ring needs at least one lease cell")

    @property
    def payload_max(self) -> int:
        return self.slot_bytes - SLOT_HEADER_BYTES

    @property
    def cells_offset(self) -> int:
        return HEADER_BYTES + self.capacity * self.slot_bytes

    @property
    def nbytes(self) -> int:
        return self.cells_offset + self.cells * CELL_BYTES

    def slot_offset(self, position: int) -> int:
        return HEADER_BYTES + (position & (self.capacity - 1)) * self.slot_bytes

    def cell_offset(self, cell: int) -> int:
        if not 0 <= cell < self.cells:
            raise RingError(f"lease cell {cell} outside 0..{self.cells - 1}")
        return self.cells_offset + cell * CELL_BYTES

    def pack(self) -> bytes:
        return _HEADER.pack(MAGIC, VERSION, self.slot_bytes, self.capacity, self.cells, CELL_BYTES)

    @classmethod
    def unpack(cls, header: bytes) -> Layout:
        magic, version, slot_bytes, capacity, cells, cell_bytes = _HEADER.unpack_from(header)
        if magic != MAGIC:
            raise RingError(f"not a stagepool ring (magic {magic:#x})")
        if version != VERSION or cell_bytes != CELL_BYTES:
            raise RingError(f"ring version {version} / cell size {cell_bytes} not supported")
        return cls(capacity=capacity, slot_bytes=slot_bytes, cells=cells)
