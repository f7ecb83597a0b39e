"""The claim/lease step of a worker: take a batch of dispatches off its stage's rings.

  1. claim one slot from the highest priority lane with work (common/ring/lanes.py: now and
     then a lower lane goes first, so none starves), waiting (spin briefly, then sleep on
     the main lane), then up to one more per spare lease cell among those already waiting: a
     batch never waits for work to arrive;
  2. lease each into one of our cells in the main lane (job, attempt, ticket), then release
     its slot; a slot the broker reclaimed first (we were too slow) has been published
     again: drop it. On the tcp ring, 1 and 2 are one round trip each for the whole batch;
  3. an undecodable record is dropped with a log line (it has no job to fail).
A worker killed between 1 and 2 leaves a claimed slot, between 2 and `unlease` a lease: the
broker's reaper recovers either (broker/reaper.py). A cell the broker fenced (common/ring/
cells.py) cannot be leased: its claim is left to the reaper too.
"""

from __future__ import annotations

import logging

from ..common.errors import StagepoolError
from ..common.ring import Ring, lanes
from ..common.dispatch import Dispatch, decode_dispatch

log = logging.getLogger(__name__)

Leased = tuple[int, Dispatch]  # (our lease cell, the dispatch it holds)


def claim_batch(rings: list[Ring], cells: list[int], lease_ms: int, wait_s: float,
                spin_s: float, turn: int = 0) -> list[Leased]:
    """Up to len(cells) leased dispatches from the stage's lanes (`rings`, by lane; the
    `turn`-th claim of this worker); [] when they stayed empty for `wait_s`."""
    main = rings[lanes.MAIN]
    order = [rings[lane] for lane in lanes.claim_order(turn)]
    items, dispatches = [], []
    for cell, (ring, claim) in zip(cells, main.claim_many(order, len(cells), wait_s, spin_s)):
        try:
            dispatch = decode_dispatch(claim.payload)
        except StagepoolError as exc:
            log.error("dropped an undecodable ring record at %d: %s", claim.ticket, exc)
            ring.release(claim)
            continue
        items.append((cell, ring, claim, dispatch.attempt, dispatch.job_id, lease_ms))
        dispatches.append(dispatch)
    batch: list[Leased] = []
    for (cell, _, claim, *_), dispatch, answer in zip(items, dispatches,
                                                       main.lease_claims(items)):
        if answer == "leased":
            batch.append((cell, dispatch))
        elif answer == "reclaimed":
            log.info("slot %d was reclaimed by the broker; dropping", claim.ticket)
        else:  # our cell was fenced (we were presumed dead): the reaper frees the slot
            log.warning("job %s not leased: lease cell %d was taken back", dispatch.job_id,
                        cell)
    return batch


def unlease(ring: Ring, batch: list[Leased]) -> bool:
    """Drop the batch's leases; False when a cell turned out fenced (taken back)."""
    return ring.unlease_many([cell for cell, _ in batch])
