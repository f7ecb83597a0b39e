"""The ring: Vyukov's bounded MPMC queue over one-sided operations, plus lease cells.

Memory layout (all integers little-endian):

    0     magic u64 | version u32 | slot_bytes u32 | capacity u64 | cells u32 | cell_bytes u32
    64    enqueue counter u64         (its own 64-byte line: producers CAS it)
    128   dequeue counter u64         (its own line: consumers CAS it)
    192   sleepers u64                (consumers asleep in `wait`: a publish wakes one of them)
    200   watchers u64                (forwarders of remote waits asleep: a publish wakes all)
    256   capacity slots of slot_bytes:  seq u64 | len u32 | crc32 u32 | payload
    ...   cells lease cells of 128 bytes (below)

Slot protocol, position p (slot p % capacity):
    seq == p          free for the producer of lap p // capacity
    seq == p + 1      published (payload valid) or claimed but not yet freed
    seq == p + cap    freed: free for position p + cap
  produce: read seq; seq == p -> CAS(enqueue, p, p+1), write len|crc|payload,
           CAS(seq, p, p+1) to publish. seq < p -> full.
  claim:   read slot; seq == p+1 -> CAS(dequeue, p, p+1); verify crc (a torn read retries);
           the caller writes its lease cell; then `release` does CAS(seq, p+1, p+cap).
           seq < p+1 -> empty.
Publishing and freeing are CASes, not stores, because the ring's owner may step in: it frees a
slot whose consumer died between claim and lease (`reclaim`), and publishes a tombstone over a
slot whose producer died between its CAS and its publish (`skip`). Whoever loses the CAS learns
it lost and backs off; nothing is overwritten behind anyone's back.

Lease cells (cells.py) follow the slots: one per worker slot, fenced by compare-and-swap.
"""

from __future__ import annotations

import struct
import time
import zlib
from dataclasses import dataclass

from ..errors import CellLost, PayloadTooLarge, RingError, RingFull
from .base import WAKE_ALL, RemoteMemory
from .cells import LeaseCells
from .layout import (
    CELL_BYTES, HEADER_BYTES, OFF_DEQUEUE, OFF_ENQUEUE, OFF_SLEEPERS, SLOT_HEADER_BYTES,
    OWNER_LOCK, TOMBSTONE, WAKE_CONSUMERS, WAKE_WATCHERS, Layout,
)

_SLOT_HEADER = struct.Struct("<QII")
_LEN_CRC = struct.Struct("<II")
_WAITERS = struct.Struct("<QQ")  # sleepers, watchers
_TORN_READ_RETRIES = 100


@dataclass(frozen=True)
class Claim:
    """A claimed slot: the caller leases it, then calls `Ring.release`."""

    ticket: int
    payload: bytes


def claim_waiting(rings: list[Ring], most: int) -> list[tuple[int, Claim]]:
    """Up to `most` claims of records already waiting in `rings`, looked at in order, each
    with the index of its ring. Never waits."""
    found = []
    while len(found) < most:
        claim = next(((index, c) for index, ring in enumerate(rings)
                      if (c := ring.try_claim()) is not None), None)
        if claim is None:
            break
        found.append(claim)
    return found


class Ring(LeaseCells):
    """One bounded MPMC queue. Not thread-safe per instance; share the memory, not the Ring."""

    # Whether a publish wakes the watchers (the tcp ring server's, which forward it to its
    # parked remote claims); the server's own publishes look at those claims themselves.
    wakes_watchers = True

    def __init__(self, mem: RemoteMemory, layout: Layout):
        self.mem = mem
        self.layout = layout
        self._mask = layout.capacity - 1
        self._init_cells()

    # -- setup ---------------------------------------------------------------------------

    @classmethod
    def format(cls, mem: RemoteMemory, layout: Layout) -> Ring:
        """Initialise fresh memory (owner only, before anyone attaches)."""
        if mem.nbytes < layout.nbytes:
            raise RingError(f"memory of {mem.nbytes} bytes < layout's {layout.nbytes}")
        mem.write(0, bytes(HEADER_BYTES))
        for position in range(layout.capacity):
            mem.write(layout.slot_offset(position), _SLOT_HEADER.pack(position, 0, 0))
        mem.write(layout.cells_offset, bytes(layout.cells * CELL_BYTES))
        mem.write(0, layout.pack())  # magic last: attachers never see a half-made ring
        return cls(mem, layout)

    @classmethod
    def attach(cls, mem: RemoteMemory) -> Ring:
        """Open a ring someone else formatted; checks magic, version and size."""
        layout = Layout.unpack(mem.read(0, HEADER_BYTES))
        if mem.nbytes and mem.nbytes < layout.nbytes:
            raise RingError(f"ring needs {layout.nbytes} bytes, memory has {mem.nbytes}")
        # A backend may run whole protocol steps remotely (tcp: one round trip each).
        return (getattr(mem, "ring_class", None) or cls)(mem, layout)

    # -- producer ------------------------------------------------------------------------

    def try_produce(self, payload: bytes, wake: Ring | None = None) -> bool:
        """Publish `payload`; False when the ring is full (backpressure). Never blocks.
        `wake`: the ring whose sleepers to wake besides ours (a lane's main ring)."""
        if len(payload) > self.layout.payload_max:
            raise PayloadTooLarge(
                f"record of {len(payload)} bytes > slot payload of {self.layout.payload_max}"
            )
        mem = self.mem
        body = _LEN_CRC.pack(len(payload), zlib.crc32(payload)) + payload
        position = mem.load(OFF_ENQUEUE)
        while True:
            offset = self.layout.slot_offset(position)
            seq = mem.load(offset)
            if seq == position:
                previous = mem.compare_and_swap(OFF_ENQUEUE, position, position + 1)
                if previous != position:
                    position = previous
                    continue
                mem.write(offset + 8, body)
                if mem.compare_and_swap(offset, position, position + 1) == position:
                    break
                # The owner skipped this position while we stalled: take another one.
                position = mem.load(OFF_ENQUEUE)
            elif seq < position:
                return False
            else:
                position = mem.load(OFF_ENQUEUE)
        self._wake()
        if wake is not None:
            wake.notify()
        return True

    def _wake(self) -> None:
        # One sleeping consumer (the longest asleep), not every idle worker of the stage
        # racing for one record on the CPUs the winner needs; and every watcher.
        sleepers, watchers = _WAITERS.unpack(self.mem.read(OFF_SLEEPERS, _WAITERS.size))
        if sleepers:
            self.mem.wake(OFF_ENQUEUE, 1, WAKE_CONSUMERS)
        if watchers and self.wakes_watchers:
            self.mem.wake(OFF_ENQUEUE, WAKE_ALL, WAKE_WATCHERS)

    def produce_many(self, items: list[tuple[Ring, bytes]], wake: Ring | None = None) -> int:
        """Publish each (ring, payload) in order (this ring and its lanes), stopping at the
        first that is full; then wake `wake`'s sleepers. Returns how many went in."""
        done = 0
        for ring, payload in items:
            if not ring.try_produce(payload):
                break
            done += 1
        if done and wake is not None:
            wake.notify()
        return done

    def produce(self, payload: bytes, timeout_s: float, wake: Ring | None = None) -> None:
        """Publish, backing off while the ring is full; `RingFull` after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        pause_s = 0.0001
        while not self.try_produce(payload, wake):
            if time.monotonic() >= deadline:
                raise RingFull(f"ring full for {timeout_s:.3f} s")
            time.sleep(pause_s)
            pause_s = min(pause_s * 2, 0.01)

    # -- consumer ------------------------------------------------------------------------

    def try_claim(self) -> Claim | None:
        """Claim the oldest published slot, or None when the ring is empty. Never blocks.

        The slot stays claimed-but-not-freed until `release`: write the lease cell first.
        """
        mem = self.mem
        slot_bytes = self.layout.slot_bytes
        position = mem.load(OFF_DEQUEUE)
        while True:
            offset = self.layout.slot_offset(position)
            raw = mem.read(offset, slot_bytes)
            seq = int.from_bytes(raw[:8], "little")
            if seq == position + 1:
                previous = mem.compare_and_swap(OFF_DEQUEUE, position, position + 1)
                if previous != position:
                    position = previous
                    continue
                payload = self._verified_payload(offset, raw)
                if payload is None:  # a tombstone: free it and look further
                    self.release(Claim(position, b""))
                    position += 1
                    continue
                return Claim(position, payload)
            if seq < position + 1:
                return None
            position = mem.load(OFF_DEQUEUE)

    def _verified_payload(self, offset: int, raw: bytes) -> bytes | None:
        # After our CAS on dequeue the slot cannot change until freed, so a crc mismatch is a
        # read that raced the producer's payload write: read again.
        for _ in range(_TORN_READ_RETRIES):
            length, crc = _LEN_CRC.unpack_from(raw, 8)
            if length == TOMBSTONE:
                return None
            payload = raw[SLOT_HEADER_BYTES : SLOT_HEADER_BYTES + length]
            if length <= self.layout.payload_max and zlib.crc32(payload) == crc:
                return payload
            raw = self.mem.read(offset, self.layout.slot_bytes)
        raise RingError(f"slot at {offset} keeps failing its crc")

    def release(self, claim: Claim) -> bool:
        """Free a claimed slot. False: the owner reclaimed it first (drop the item)."""
        offset = self.layout.slot_offset(claim.ticket)
        freed = claim.ticket + self.layout.capacity
        return self.mem.compare_and_swap(offset, claim.ticket + 1, freed) == claim.ticket + 1

    def claim(self, timeout_s: float, spin_s: float = 0.0) -> Claim | None:
        """Claim, waiting up to `timeout_s`: spin for `spin_s`, then sleep on the enqueue word."""
        found = self.claim_any([self], timeout_s, spin_s)
        return found[1] if found else None

    def claim_any(self, rings: list[Ring], timeout_s: float,
                  spin_s: float = 0.0) -> tuple[Ring, Claim] | None:
        """Claim from the first of `rings` (priority lanes, this one among them) that has a
        record, waiting up to `timeout_s` on this ring's enqueue word. A publish into another
        of them wakes the wait through `notify`; one that lands in the instant before the
        wait is seen within the wait's 0.1 s slice."""

        def look():
            for ring in rings:
                claimed = ring.try_claim()
                if claimed is not None:
                    return ring, claimed
            return None

        found = look()
        if found is not None:
            return found
        now = time.monotonic()
        deadline = now + timeout_s
        spin_until = now + min(spin_s, timeout_s)
        while time.monotonic() < spin_until:
            found = look()
            if found is not None:
                return found
        mem = self.mem
        while True:
            remaining_s = deadline - time.monotonic()
            if remaining_s <= 0:
                return None
            mem.fetch_add(OFF_SLEEPERS, 1)
            try:
                # Read the word before the last look: a publish after it changes the word, so
                # the wait returns at once instead of missing the wake-up.
                word = mem.load(OFF_ENQUEUE) & 0xFFFFFFFF
                found = look()
                if found is not None:
                    return found
                mem.wait(OFF_ENQUEUE, word, min(remaining_s, 0.1), WAKE_CONSUMERS)
            finally:
                mem.fetch_add(OFF_SLEEPERS, -1)
            found = look()
            if found is not None:
                return found

    def claim_many(self, rings: list[Ring], most: int, timeout_s: float,
                   spin_s: float = 0.0) -> list[tuple[Ring, Claim]]:
        """Up to `most` claims from `rings` (lanes, in the order to look): the first waits as
        `claim_any` does, the rest only take what is already there."""
        found = self.claim_any(rings, timeout_s, spin_s)
        if found is None:
            return []
        return [found] + [(rings[i], c) for i, c in claim_waiting(rings, most - 1)]

    def lease_claims(self, items: list[tuple[int, Ring, Claim, int, str, int]]) -> list[str]:
        """Lease each (cell, lane ring, claim, attempt, job id, lease_ms) in our cell, then
        free its slot. Each answer: "leased"; "reclaimed" (the broker freed the slot first:
        we dropped the lease, drop the item); or "lost" (our cell was fenced: the slot stays
        claimed for the broker's reaper)."""
        answers = []
        with self._cells_lock:
            for cell, ring, claim, attempt, job_id, lease_ms in items:
                if cell in self._lost:
                    answers.append("lost")
                    continue
                answer, word = self.lease_from(cell, self._word(cell), ring, claim, attempt,
                                               job_id, lease_ms)
                if answer == "lost":
                    self._lost.add(cell)
                else:
                    self._words[cell] = word
                answers.append(answer)
        return answers

    def lease_from(self, cell: int, word: int, ring: Ring, claim: Claim, attempt: int,
                   job_id: str, lease_ms: int) -> tuple[str, int]:
        """Take `cell` from `word` (its holder's last), then free `claim`'s slot in `ring`
        (dropping the lease again if the broker reclaimed the slot first): the answer and
        the cell's word now. Keeps no state: the tcp ring server runs it for remote holders."""
        try:
            word = self.take(cell, word, claim.ticket, attempt, job_id, lease_ms)
            if ring.release(claim):
                return "leased", word
            return "reclaimed", self.drop(cell, word)
        except CellLost:
            return "lost", 0

    def notify(self) -> None:
        """Wake a consumer asleep on this ring: a record was published into one of its lanes."""
        self._wake()

    # -- owner side: scans and repairs -----------------------------------------------------

    def counters(self) -> tuple[int, int]:
        """(enqueue, dequeue)."""
        return self.mem.load(OFF_ENQUEUE), self.mem.load(OFF_DEQUEUE)

    def depth(self) -> int:
        """Published or in-production positions not yet claimed."""
        enqueue, dequeue = self.counters()
        return max(0, enqueue - dequeue)

    def stuck(self, start: int = 0) -> tuple[list[int], int | None, int]:
        """Positions needing the owner's eye right now.

        Returns (claimed, unpublished, dequeue): positions claimed but not freed (a consumer
        between claim and release, or dead there); the head position if its producer took it
        but has not published (mid-write, or dead there); the dequeue counter the scan stopped
        at (every position below it not in `claimed` was freed). The caller decides, by how
        long it has seen them, whether to `reclaim` or `skip`. `start` skips positions known
        to be freed (the scan is then proportional to what is in flight).
        """
        enqueue, dequeue = self.counters()
        claimed = []
        for position in range(max(start, dequeue - self.layout.capacity), dequeue):
            if self.mem.load(self.layout.slot_offset(position)) == position + 1:
                claimed.append(position)
        unpublished = None
        if enqueue > dequeue and self.mem.load(self.layout.slot_offset(dequeue)) == dequeue:
            unpublished = dequeue
        return claimed, unpublished, dequeue

    def reclaim(self, ticket: int) -> bytes | None:
        """Free a claimed-but-never-released slot; its payload if we won the race, else None."""
        offset = self.layout.slot_offset(ticket)
        raw = self.mem.read(offset, self.layout.slot_bytes)
        if int.from_bytes(raw[:8], "little") != ticket + 1:
            return None
        length, _ = _LEN_CRC.unpack_from(raw, 8)
        if not self.release(Claim(ticket, b"")):
            return None
        if length == TOMBSTONE:
            return None
        return self._verified_payload(offset, raw)

    def skip(self, position: int) -> bool:
        """Publish a tombstone over an unpublished head slot; True if we won the race.

        Lock the slot first (CAS to a seq no one else waits for), then write the tombstone,
        then publish: the stalled producer's publish CAS fails, and nobody reads the slot
        between our claim of it and the tombstone landing.
        """
        offset = self.layout.slot_offset(position)
        locked = position | OWNER_LOCK
        if self.mem.compare_and_swap(offset, position, locked) != position:
            return False
        self.mem.write(offset + 8, _LEN_CRC.pack(TOMBSTONE, 0))
        self.mem.store(offset, position + 1)
        self._wake()
        return True
