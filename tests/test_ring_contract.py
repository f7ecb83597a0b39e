"""The ring protocol's contract, run over every local backend (shm and tcp)."""

from __future__ import annotations

import threading
import time

import pytest

from stagepool.common.errors import CellLost, PayloadTooLarge, RingError
from stagepool.common.ring import Layout, Ring
from stagepool.common.ring.layout import (
    OFF_ENQUEUE, OFF_SLEEPERS, OFF_WATCHERS, WAKE_CONSUMERS, WAKE_WATCHERS,
)


def test_items_come_out_in_the_order_they_went_in(make_ring):
    ring = make_ring(capacity=8)
    client = ring.client()
    for i in range(5):
        assert client.try_produce(b"item-%d" % i)
    got = []
    while (claim := client.try_claim()) is not None:
        assert client.release(claim)
        got.append(claim.payload)
    assert got == [b"item-%d" % i for i in range(5)]


def test_a_full_ring_refuses_and_accepts_again_after_a_release(make_ring):
    ring = make_ring(capacity=4)
    client = ring.client()
    assert all(client.try_produce(b"x") for _ in range(4))
    assert not client.try_produce(b"overflow")
    claim = client.try_claim()
    assert not client.try_produce(b"overflow"), "a claimed slot is not free until released"
    client.release(claim)
    assert client.try_produce(b"fits now")


def test_an_empty_ring_claims_nothing(make_ring):
    assert make_ring().client().try_claim() is None


def test_an_oversize_record_is_a_clear_error_at_the_producer(make_ring):
    client = make_ring(slot_bytes=64).client()
    with pytest.raises(PayloadTooLarge, match="slot payload of 48"):
        client.try_produce(b"x" * 49)
    assert client.try_produce(b"x" * 48)


def test_wraparound_over_many_laps_keeps_every_item(make_ring):
    client = make_ring(capacity=4).client()
    for i in range(50):
        assert client.try_produce(str(i).encode())
        claim = client.try_claim()
        assert claim.payload == str(i).encode() and claim.ticket == i
        assert client.release(claim)


def test_a_sleeping_consumer_wakes_when_an_item_is_published(make_ring):
    ring = make_ring()
    consumer = ring.client()
    threading.Timer(0.2, lambda: ring.owner.try_produce(b"late")).start()
    started = time.monotonic()
    claim = consumer.claim(timeout_s=5)
    assert claim is not None and claim.payload == b"late"
    assert time.monotonic() - started < 2, "woken by the publish, not by the timeout"


def test_a_publish_wakes_one_sleeping_consumer_and_every_watcher(make_ring, ring_backend):
    """Three consumers and two watchers asleep on the owner's memory: one publish wakes one
    consumer (not the stage's every idle worker) and both watchers."""
    if ring_backend != "shm":
        pytest.skip("futex masks are the shm backend's; tcp forwards through its watcher")
    ring = make_ring()
    mem, owner = ring.owner_mem, ring.owner
    woken = {"consumer": 0, "watcher": 0}
    lock = threading.Lock()

    def sleep(kind, mask, counter):
        mem.fetch_add(counter, 1)
        word = mem.load(OFF_ENQUEUE) & 0xFFFFFFFF
        if mem.wait(OFF_ENQUEUE, word, 1.0, mask):
            with lock:
                woken[kind] += 1

    threads = [threading.Thread(target=sleep, args=("consumer", WAKE_CONSUMERS, OFF_SLEEPERS))
               for _ in range(3)]
    threads += [threading.Thread(target=sleep, args=("watcher", WAKE_WATCHERS, OFF_WATCHERS))
                for _ in range(2)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 5
    while mem.load(OFF_SLEEPERS) + mem.load(OFF_WATCHERS) < 5:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    time.sleep(0.05)  # the last counted thread reaches its futex wait
    assert owner.try_produce(b"one")
    time.sleep(0.3)
    assert woken == {"consumer": 1, "watcher": 2}
    for thread in threads:
        thread.join()


def test_a_stop_request_reaches_the_lease_it_names_and_no_later_one(make_ring):
    ring = make_ring()
    worker = ring.client()
    worker.lease(2, 0, 1, "job-a", 5000)
    assert not worker.stop_requested(2)
    ring.owner.request_stop(2, ring.owner.read_lease(2).gen)
    assert worker.stop_requested(2)
    worker.unlease(2)
    worker.lease(2, 1, 1, "job-b", 5000)  # the next lease in the same cell
    assert not worker.stop_requested(2)


def test_a_fenced_cell_can_never_be_changed_by_its_old_holder(make_ring):
    """The broker takes a cell back (its lease expired) and gives it to a new worker: the old
    holder's beat, unlease and next lease all fail, and the new lease is untouched."""
    ring = make_ring()
    old, new = ring.client(), ring.client()
    old.lease(2, 0, 1, "job-a", 5000)
    gen = ring.owner.read_lease(2).gen
    assert ring.owner.fence(2, gen)
    assert ring.owner.read_lease(2) is None
    new.lease(2, 1, 2, "job-a", 5000)  # the new holder reads the fenced word fresh
    assert not old.beat(2) and old.stop_requested(2), "the old holder learns it lost"
    assert not old.unlease(2)
    with pytest.raises(CellLost):
        old.lease(2, 2, 1, "job-b", 5000)
    lease = ring.owner.read_lease(2)
    assert (lease.job_id, lease.attempt) == ("job-a", 2)
    assert new.beat(2) and not new.stop_requested(2)
    assert ring.owner.read_lease(2).beat == lease.beat + 1
    assert new.unlease(2) and ring.owner.read_lease(2) is None


def test_a_fence_names_the_lease_it_judged_and_spares_a_cell_mid_write(make_ring):
    ring = make_ring()
    worker = ring.client()
    worker.lease(1, 0, 1, "job-a", 5000)
    stale = ring.owner.read_lease(1).gen
    worker.unlease(1)
    worker.lease(1, 1, 1, "job-b", 5000)
    assert not ring.owner.fence(1, stale), "a newer lease in the cell is not fenced"
    assert worker.beat(1)
    from stagepool.common.ring.cells import WRITING
    offset = ring.owner.layout.cell_offset(3)
    ring.owner.mem.store(offset, ring.owner.mem.load(offset) + (WRITING << 32))
    assert not ring.owner.fence(3), "a holder may be writing the body"
    assert ring.owner.fence(3, writing_too=True)


def test_claim_times_out_on_an_empty_ring(make_ring):
    started = time.monotonic()
    assert make_ring().client().claim(timeout_s=0.2) is None
    assert 0.15 < time.monotonic() - started < 3


def test_a_lease_is_visible_to_the_owner_and_gone_after_unlease(make_ring):
    ring = make_ring()
    client = ring.client()
    client.try_produce(b"job")
    claim = client.try_claim()
    client.lease(3, claim.ticket, 2, "job-42", 5000)
    lease = ring.owner.read_lease(3)
    assert (lease.job_id, lease.attempt, lease.ticket, lease.lease_ms) == ("job-42", 2, 0, 5000)
    beat = lease.beat
    client.beat(3)
    assert ring.owner.read_lease(3).beat == beat + 1
    client.unlease(3)
    assert ring.owner.read_lease(3) is None


def test_the_owner_reclaims_a_slot_claimed_but_never_released(make_ring):
    ring = make_ring()
    client = ring.client()
    client.try_produce(b"orphan")
    claim = client.try_claim()  # the consumer "dies" here
    claimed, unpublished, _ = ring.owner.stuck()
    assert claimed == [claim.ticket] and unpublished is None
    assert ring.owner.reclaim(claim.ticket) == b"orphan"
    assert not client.release(claim), "the late consumer learns it lost the slot"
    assert ring.owner.stuck()[0] == []


def test_the_owner_skips_a_slot_whose_producer_died_before_publishing(make_ring):
    ring = make_ring()
    client = ring.client()
    client.mem.compare_and_swap(OFF_ENQUEUE, 0, 1)  # a producer took position 0 and died
    client.try_produce(b"behind it")
    assert client.try_claim() is None, "the unpublished head blocks the ring"
    _, unpublished, _ = ring.owner.stuck()
    assert unpublished == 0
    assert ring.owner.skip(0)
    assert client.try_claim().payload == b"behind it"


def test_attach_refuses_memory_that_is_not_a_ring(tmp_path):
    from stagepool.common.ring.shm import ShmMemory

    memory = ShmMemory(f"stagepool-test-notring-{time.time_ns()}", 4096, create=True)
    try:
        with pytest.raises(RingError, match="not a stagepool ring"):
            Ring.attach(memory)
    finally:
        memory.close()


def test_layout_rejects_a_capacity_that_is_not_a_power_of_two():
    with pytest.raises(RingError, match="power of two"):
        Layout(capacity=1000)
