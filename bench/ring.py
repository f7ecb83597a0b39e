"""One-hop dispatch latency: producer publish -> consumer start, side by side in one run.

    python bench/ring.py --json [--count 2000] [--gap-ms 1]

Backends: the shm ring (consumer asleep on the futex, as workers run), the shm ring with a
busy-polling consumer, the tcp ring (the consumer's claim parked at the ring server), and Redis
LPUSH/BRPOP on a private redis-server. Producer and consumer are separate processes; the
producer stamps CLOCK_MONOTONIC (shared by all processes on a host) into each record, the
consumer subtracts on arrival. One record in flight at a time, `gap-ms` apart (low load).
Prints JSON with p50/p99 in microseconds and ratios against the Redis hop.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import struct
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stagepool.broker.cluster import start_redis  # noqa: E402
from stagepool.common.ring import Layout, Ring  # noqa: E402
from stagepool.common.ring.shm import ShmMemory  # noqa: E402
from stagepool.common.ring.tcp import TcpMemory  # noqa: E402
from stagepool.common.ring.tcpserver import TcpRingServer  # noqa: E402

STAMP = struct.Struct("<qq")  # index, send time ns
DONE = -1


def _open(kind: str, address: str) -> Ring:
    if kind == "tcp":
        return Ring.attach(TcpMemory(address, "bench"))
    return Ring.attach(ShmMemory(address))


def ring_consumer(kind, address, spin_s, results):
    ring = _open(kind, address)
    latencies = []
    while True:
        claim = ring.claim(timeout_s=10, spin_s=spin_s)
        now = time.perf_counter_ns()
        if claim is None:
            break
        ring.release(claim)
        index, sent = STAMP.unpack(claim.payload[:16])
        if index == DONE:
            break
        latencies.append(now - sent)
    results.put(latencies)


def ring_producer(kind, address, count, gap_s):
    ring = _open(kind, address)
    padding = b"\0" * 100  # about the size of a real Dispatch record
    for index in range(count):
        ring.produce(STAMP.pack(index, time.perf_counter_ns()) + padding, timeout_s=10)
        time.sleep(gap_s)
    ring.produce(STAMP.pack(DONE, 0), timeout_s=10)


def redis_consumer(url, key, results):
    import redis

    client = redis.Redis.from_url(url)
    latencies = []
    while True:
        _, payload = client.brpop(key, timeout=10)
        now = time.perf_counter_ns()
        index, sent = STAMP.unpack(payload[:16])
        if index == DONE:
            break
        latencies.append(now - sent)
    results.put(latencies)


def redis_producer(url, key, count, gap_s):
    import redis

    client = redis.Redis.from_url(url)
    padding = b"\0" * 100
    for index in range(count):
        client.lpush(key, STAMP.pack(index, time.perf_counter_ns()) + padding)
        time.sleep(gap_s)
    client.lpush(key, STAMP.pack(DONE, 0))


def run_pair(consumer, consumer_args, producer, producer_args) -> list[int]:
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    cons = ctx.Process(target=consumer, args=(*consumer_args, results))
    cons.start()
    time.sleep(0.5)  # let the consumer settle into its wait
    prod = ctx.Process(target=producer, args=producer_args)
    prod.start()
    latencies = results.get(timeout=600)
    prod.join()
    cons.join()
    return latencies


def summary(latencies_ns: list[int]) -> dict:
    ordered = sorted(latencies_ns)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1000  # noqa: E731
    return {"n": len(ordered), "p50_us": round(pick(0.50), 1), "p99_us": round(pick(0.99), 1),
            "mean_us": round(statistics.fmean(ordered) / 1000, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print JSON only")
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--gap-ms", type=float, default=1.0)
    args = parser.parse_args()
    gap_s = args.gap_ms / 1000
    layout = Layout(capacity=1024, slot_bytes=1024, cells=8)
    name = f"stagepool-bench-{uuid.uuid4().hex[:8]}"
    memory = ShmMemory(name, layout.nbytes, create=True)
    Ring.format(memory, layout)
    server = TcpRingServer("tcp://127.0.0.1:0", {"bench": memory._region},
                           {"bench": memory.nbytes})
    server.start()
    results = {}
    try:
        for label, kind, address, spin_s in [
            ("shm_ring", "shm", name, 50e-6),
            ("shm_ring_busy_poll", "shm", name, 10.0),
            ("tcp_ring", "tcp", server.endpoint, 0.0),
        ]:
            latencies = run_pair(ring_consumer, (kind, address, spin_s), ring_producer,
                                 (kind, address, args.count, gap_s))
            results[label] = summary(latencies)
        with tempfile.TemporaryDirectory() as state:
            process, url = start_redis(Path(state), persist=False)
            try:
                latencies = run_pair(redis_consumer, (url, "bench"), redis_producer,
                                     (url, "bench", args.count, gap_s))
                results["redis_lpush_brpop"] = summary(latencies)
            finally:
                process.terminate()
                process.wait()
    finally:
        server.stop()
        memory.close()
    base = results["redis_lpush_brpop"]["p50_us"]
    report = {
        "bench": "ring_one_hop_latency",
        "count": args.count, "gap_ms": args.gap_ms, "cpus": os.cpu_count(),
        "results": results,
        "p50_ratio_vs_redis": {k: round(v["p50_us"] / base, 3) for k, v in results.items()},
        "targets": {"shm_ring p50 <= 0.1 x redis": results["shm_ring"]["p50_us"] <= 0.1 * base,
                    "tcp_ring p50 <= 1.0 x redis": results["tcp_ring"]["p50_us"] <= base},
    }
    print(json.dumps(report, indent=None if args.json else 2))


if __name__ == "__main__":
    main()
