"""The claim/lease step of a worker: take a batch of dispatches off its stage's ring.

  1. claim one slot, waiting (spin briefly, then sleep on the ring), then up to one more per
     spare lease cell among those already waiting: a batch never waits for work to arrive;
  2. lease each into one of our cells (job, attempt, ticket), then release its slot; a slot
     the broker reclaimed first (we were too slow) has been published again: drop it;
  3. an undecodable record is dropped with a log line (it has no job to fail).
A worker killed between 1 and 2 leaves a claimed slot, between 2 and `unlease` a lease: the
broker's reaper recovers either (broker/reaper.py).
"""

from __future__ import annotations

import logging

from ..common.errors import StagepoolError
from ..common.ring import Ring
from ..common.wire import Dispatch, decode_dispatch

log = logging.getLogger(__name__)

Leased = tuple[int, Dispatch]  # (our lease cell, the dispatch it holds)


def claim_batch(ring: Ring, cells: list[int], lease_ms: int, wait_s: float,
                spin_s: float) -> list[Leased]:
    """Up to len(cells) leased dispatches; [] when the ring stayed empty for `wait_s`."""
    claim = ring.claim(wait_s, spin_s)
    if claim is None:
        return []
    claims = [claim]
    while len(claims) < len(cells) and (more := ring.try_claim()) is not None:
        claims.append(more)
    batch: list[Leased] = []
    for cell, claim in zip(cells, claims):
        try:
            dispatch = decode_dispatch(claim.payload)
        except StagepoolError as exc:
            log.error("dropped an undecodable ring record at %d: %s", claim.ticket, exc)
            ring.release(claim)
            continue
        ring.lease(cell, claim.ticket, dispatch.attempt, dispatch.job_id, lease_ms)
        if not ring.release(claim):
            log.info("slot %d was reclaimed by the broker; dropping", claim.ticket)
            ring.unlease(cell)
            continue
        batch.append((cell, dispatch))
    return batch


def unlease(ring: Ring, batch: list[Leased]) -> None:
    for cell, _ in batch:
        ring.unlease(cell)
