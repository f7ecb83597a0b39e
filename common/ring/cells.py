"""Lease cells: one per worker slot in a stage's main ring, fenced so a lost cell stays lost.

Cell (128 bytes at layout.cell_offset):
    0   word u64 = epoch u16 | seq u16 | beat u32   (high to low)
    16  ticket u64 | attempt u32 | lease_ms u32 | job_len u32 | pad | job_id[64]
    104 stop u64  (a lease id: the owner's request that this lease's stage stop)
`seq % 4` is the cell's state: 0 free, 1 writing (the holder is writing the body), 2 held.
A lease's id is `word >> 32` (epoch and seq): unique per lease in a cell.

Every change of the word is a compare-and-swap of the exact value its writer last saw, and
that is the fence. The holder (a worker):
  lease:   CAS free -> writing, write the body, CAS writing -> held;
  beat:    CAS (beat) -> (beat + 1), every heartbeat while held;
  unlease: CAS held -> free (seq + 2).
The owner (the broker) takes a cell back with `fence`: CAS (any epoch, any state but writing)
-> (epoch + 1, the next free seq, beat 0). It fences a cell before it gives it to a worker,
and a lease that expired. A worker whose cell was fenced fails its next CAS (`CellLost`,
or False from `beat`/`unlease`) and can never change the cell again: it learns its attempt
was superseded, and registers again for fresh cells.
A cell stays writing only for the microseconds of a body write; the owner never fences one
then (the writer might still write the body over a later lease), and takes it back only once
it has stayed writing for the reaper's `stuck_s` (its writer died there).

The holder judges nothing by time; the owner judges expiry by its own monotonic clock from
the last change of the beat: no clocks are compared across hosts.
"""

from __future__ import annotations

import struct
import threading
from dataclasses import dataclass

from ..errors import CellLost, PayloadTooLarge
from .layout import CELL_STOP, JOB_ID_MAX_BYTES

FREE, WRITING, HELD = 0, 1, 2
_BODY = struct.Struct("<QIII4x64s")  # ticket, attempt, lease_ms, job_len, job_id
_BODY_OFFSET = 16
_BEAT_MASK = 0xFFFFFFFF
_SEQ_MASK = 0xFFFF


def state_of(word: int) -> int:
    return (word >> 32) & 3


def lease_id(word: int) -> int:
    return word >> 32


def _with(word: int, seq: int, beat: int | None = None) -> int:
    epoch = word >> 48
    beat = word & _BEAT_MASK if beat is None else beat & _BEAT_MASK
    return epoch << 48 | (seq & _SEQ_MASK) << 32 | beat


@dataclass(frozen=True)
class Lease:
    """A held lease cell as the owner sees it. `gen` is the lease's id."""

    cell: int
    gen: int
    beat: int
    ticket: int
    attempt: int
    lease_ms: int
    job_id: str


class LeaseCells:
    """The cell operations of a `Ring` (mixed in: it supplies `mem` and `layout`).

    The holder caches each cell's word as it last set it; the heartbeat thread and the claim
    loop share one Ring, so the cached words are kept under a lock."""

    def _init_cells(self) -> None:
        self._words: dict[int, int] = {}
        self._lost: set[int] = set()
        self._cells_lock = threading.Lock()

    # -- the holder ------------------------------------------------------------------------

    def lease(self, cell: int, ticket: int, attempt: int, job_id: str, lease_ms: int) -> None:
        """Take a lease in our cell; `CellLost` when the owner has fenced it from us."""
        with self._cells_lock:
            self._words[cell] = self._holding(
                cell, lambda word: self.take(cell, word, ticket, attempt, job_id, lease_ms))

    def take(self, cell: int, word: int, ticket: int, attempt: int, job_id: str,
             lease_ms: int) -> int:
        """Lease `cell` from `word`, the value its holder last set (dropping a lease it did
        not drop, after a failed batch); returns the new word. Keeps no state: the tcp ring
        server runs it for its remote holders."""
        job = job_id.encode()
        if len(job) > JOB_ID_MAX_BYTES:
            raise PayloadTooLarge(f"job id longer than {JOB_ID_MAX_BYTES} bytes")
        offset = self.layout.cell_offset(cell)
        if state_of(word) not in (FREE, HELD):  # no holder leaves a write half done
            raise CellLost(f"lease cell {cell} was left mid-write")
        word = self.drop(cell, word)
        seq = (word >> 32) & _SEQ_MASK
        writing = self._cas(offset, word, _with(word, seq + 1))
        self.mem.write(offset + _BODY_OFFSET, _BODY.pack(ticket, attempt, lease_ms, len(job), job))
        return self._cas(offset, writing, _with(writing, seq + 2))

    def drop(self, cell: int, word: int) -> int:
        """Drop the lease `word` holds (stateless, as `take`); returns the new word."""
        if state_of(word) != HELD:
            return word
        return self._cas(self.layout.cell_offset(cell), word, _with(word, (word >> 32) + 2))

    def beat(self, cell: int) -> bool:
        """Refresh our lease; False when the cell is no longer ours (or holds no lease)."""
        with self._cells_lock:
            word = self._word(cell)
            if cell in self._lost or state_of(word) != HELD:
                return False
            offset = self.layout.cell_offset(cell)
            try:
                self._words[cell] = self._holding(cell, lambda w: self._cas(
                    offset, w, _with(w, w >> 32, (w & _BEAT_MASK) + 1)))
            except CellLost:
                return False
            return True

    def unlease(self, cell: int) -> bool:
        """Drop our lease (a no-op when none is held); False when the cell was fenced."""
        with self._cells_lock:
            try:
                self._words[cell] = self._holding(cell, lambda w: self.drop(cell, w))
            except CellLost:
                return False
            return True

    def unlease_many(self, cells: list[int]) -> bool:
        """`unlease` each; False when any cell was fenced."""
        return all([self.unlease(cell) for cell in cells])

    def stop_requested(self, cell: int) -> bool:
        """Whether our current lease in `cell` must stop: the owner asked (its stop word
        names the lease), or fenced the cell (the attempt is superseded)."""
        with self._cells_lock:
            if cell in self._lost:
                return True
            word = self._word(cell)
        return self.mem.load(self.layout.cell_offset(cell) + CELL_STOP) == lease_id(word)

    def lost(self, cell: int) -> bool:
        return cell in self._lost

    def _word(self, cell: int) -> int:
        if cell not in self._words:
            self._words[cell] = self.mem.load(self.layout.cell_offset(cell))
        return self._words[cell]

    def _holding(self, cell: int, change) -> int:
        """`change(word)` of our cached word, remembering a cell found lost."""
        if cell in self._lost:
            raise CellLost(f"lease cell {cell} was taken back by the broker")
        try:
            return change(self._word(cell))
        except CellLost:
            self._lost.add(cell)
            raise

    def _cas(self, offset: int, expected: int, desired: int) -> int:
        if self.mem.compare_and_swap(offset, expected, desired) != expected:
            raise CellLost("the lease cell was taken back by the broker")
        return desired

    # -- the owner -------------------------------------------------------------------------

    def read_lease(self, cell: int) -> Lease | None:
        """A consistent snapshot of a cell, or None when it holds no lease."""
        offset = self.layout.cell_offset(cell)
        mem = self.mem
        while True:
            word = mem.load(offset)
            if state_of(word) != HELD:
                return None
            raw = mem.read(offset + _BODY_OFFSET, _BODY.size)
            after = mem.load(offset)
            if lease_id(after) == lease_id(word):  # beats may land in between: fine
                break
        ticket, attempt, lease_ms, job_len, job = _BODY.unpack(raw)
        job_id = job[: min(job_len, JOB_ID_MAX_BYTES)].decode(errors="replace")
        return Lease(cell, lease_id(after), after & _BEAT_MASK, ticket, attempt, lease_ms,
                     job_id)

    def cell_state(self, cell: int) -> int:
        """FREE, WRITING or HELD."""
        return state_of(self.mem.load(self.layout.cell_offset(cell)))

    def fence(self, cell: int, gen: int | None = None, *, writing_too: bool = False) -> bool:
        """Take `cell` back from whoever had it: their next change of it fails. False (and
        nothing done) when it no longer holds lease `gen` (if given), or a holder is
        mid-write, unless `writing_too` (its writer died there)."""
        offset = self.layout.cell_offset(cell)
        word = self.mem.load(offset)
        while True:
            if gen is not None and lease_id(word) != gen:
                return False
            if state_of(word) == WRITING and not writing_too:
                return False
            seq = (((word >> 32) & _SEQ_MASK) | 3) + 1  # the next free seq
            fenced = ((word >> 48) + 1 & 0xFFFF) << 48 | (seq & _SEQ_MASK) << 32
            seen = self.mem.compare_and_swap(offset, word, fenced)
            if seen == word:
                return True
            word = seen  # its holder beat meanwhile: fence what is there now

    def request_stop(self, cell: int, gen: int) -> None:
        """Ask the holder of lease `gen` in `cell` to stop at its next step."""
        self.mem.store(self.layout.cell_offset(cell) + CELL_STOP, gen)
