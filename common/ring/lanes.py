"""Priority lanes: each stage has three rings, claimed high lane first.

    lane 0 "high"    priority > 0
    lane 1 (main)    priority == 0: the stage's own ring, which also holds every lease cell
    lane 2 "low"     priority < 0

A worker sleeps on the main ring; a publish into another lane wakes it there (`Ring.notify`).
It claims from the highest lane with work, except on every LOW_FIRST_EVERY-th claim (lowest
first) and every NORMAL_FIRST_EVERY-th (main first): a steady stream of urgent jobs slows the
others, it never starves them. Within a lane, first come, first served.
"""

from __future__ import annotations

import time

LANES = ("high", "", "low")  # ring name suffixes; "" is the stage's main ring
MAIN = 1
NORMAL_FIRST_EVERY = 4
LOW_FIRST_EVERY = 8


def lane_of(priority: int) -> int:
    return 0 if priority > 0 else MAIN if priority == 0 else 2


def ring_name(stage: str, lane: int) -> str:
    return f"{stage}.{LANES[lane]}" if LANES[lane] else stage


def produce(rings: list, lane: int, payload: bytes, timeout_s: float = 0.0) -> bool:
    """Publish into `rings[lane]` (waiting up to `timeout_s` for room: RingFull after it; 0:
    False at once when full), then wake a consumer asleep on the main lane if it is another."""
    wake = rings[MAIN] if lane != MAIN else None
    if timeout_s:
        rings[lane].produce(payload, timeout_s, wake)
        return True
    return rings[lane].try_produce(payload, wake)


def produce_many(rings: list, items: list[tuple[int, bytes]],
                 timeout_s: float) -> list[tuple[int, bytes]]:
    """Publish each (lane, payload) into `rings[lane]` in order, waking the main lane's
    sleepers once; waits up to `timeout_s` for room. Returns what is not in yet."""
    deadline = time.monotonic() + timeout_s
    pause_s = 0.0001
    main = rings[MAIN]
    while items:
        done = main.produce_many([(rings[lane], payload) for lane, payload in items], main)
        items = items[done:]
        if not items or time.monotonic() >= deadline:
            break
        time.sleep(pause_s)
        pause_s = min(pause_s * 2, 0.01)
    return items


def claim_order(turn: int) -> tuple[int, ...]:
    """The lanes in the order the `turn`-th claim looks at them."""
    if turn % LOW_FIRST_EVERY == LOW_FIRST_EVERY - 1:
        return (2, 0, 1)
    if turn % NORMAL_FIRST_EVERY == NORMAL_FIRST_EVERY - 1:
        return (1, 0, 2)
    return (0, 1, 2)
