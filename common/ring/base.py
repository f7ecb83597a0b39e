"""The `RemoteMemory` interface: the only thing a ring backend implements.

The ring protocol (`protocol.py`) is written once against these operations; a backend only
moves bytes: `shm` on the same host, `tcp` through the broker, `verbs` over an RDMA RC QP.

Contract, for every backend:
- offsets are byte offsets into one ring's memory; 64-bit operations take 8-aligned offsets;
- `fetch_add` and `compare_and_swap` are atomic with respect to each other and to every other
  backend attached to the same memory, and return the value *before* the operation;
- `write` of one call is not torn against an 8-byte aligned `load` of a word it covers only
  where the backend says so; the ring never relies on it (payloads carry a crc);
- `wait` may return early (spuriously); callers re-check. It returns False on timeout;
- errors are `TransportError`; no method blocks past its timeout.
"""

from __future__ import annotations

import abc
import time

_WAIT_POLL_S = 0.0005
WAKE_ALL = 2**31 - 1  # `wake` count: every matching waiter
WAKE_ANY = 0xFFFFFFFF  # wait/wake mask: every channel


class RemoteMemory(abc.ABC):
    """One-sided access to a region of memory that the broker owns."""

    nbytes: int

    @abc.abstractmethod
    def read(self, offset: int, nbytes: int) -> bytes:
        """Copy `nbytes` at `offset`."""

    @abc.abstractmethod
    def write(self, offset: int, data: bytes) -> None:
        """Copy `data` to `offset`; visible before any later operation from this caller."""

    @abc.abstractmethod
    def fetch_add(self, offset: int, delta: int) -> int:
        """Atomically add `delta` (may be negative) to the u64 at `offset`; return the old value."""

    @abc.abstractmethod
    def compare_and_swap(self, offset: int, expected: int, desired: int) -> int:
        """Atomically set the u64 at `offset` to `desired` if it equals `expected`.

        Returns the value before: equal to `expected` exactly when the swap happened.
        """

    def load(self, offset: int) -> int:
        """Read one u64."""
        return int.from_bytes(self.read(offset, 8), "little")

    def store(self, offset: int, value: int) -> None:
        """Write one u64."""
        self.write(offset, value.to_bytes(8, "little"))

    def wait(self, offset: int, expected_u32: int, timeout_s: float,
             mask: int = WAKE_ANY) -> bool:
        """Sleep until the u32 at `offset` differs from `expected_u32`, or `timeout_s` passes,
        or a `wake` whose mask shares a bit with `mask` comes.

        The default polls; backends with a wake-up channel override it.
        """
        deadline = time.monotonic() + timeout_s
        while self.load(offset) & 0xFFFFFFFF == expected_u32:
            if time.monotonic() >= deadline:
                return False
            time.sleep(_WAIT_POLL_S)
        return True

    def wake(self, offset: int, count: int = WAKE_ALL, mask: int = WAKE_ANY) -> None:
        """Wake up to `count` `wait`s on the word at `offset` whose mask shares a bit with
        `mask`. Default: nothing (waiters poll)."""

    def close(self) -> None:
        """Release the connection or mapping. Idempotent."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
