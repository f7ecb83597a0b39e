"""What one job-state transition costs: Redis time per transition, alone and batched.

    python bench/transitions.py [--jobs 3000]

On a private redis-server: the round trip of a plain PING and of one transition script from
Python (median), then the Redis-side time per transition (INFO commandstats) of `submit`,
`start` and `finish` (a stage's two transitions) run alone and in batches of 16. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stagepool.broker.cluster import start_redis  # noqa: E402
from stagepool.common import transitions as tx  # noqa: E402
from stagepool.common.jobstore import JobStore  # noqa: E402


def _median_us(fn, count: int) -> float:
    for _ in range(200):
        fn()
    times = []
    for _ in range(count):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return round(statistics.median(times) * 1e6, 1)


def _redis_us(store: JobStore, transitions: int) -> float:
    stats = store.redis.info("commandstats").get("cmdstat_evalsha", {})
    store.redis.config_resetstat()
    return round(stats.get("usec", 0) / transitions, 2)


def run(jobs: int) -> dict:
    process, url = start_redis(Path(tempfile.mkdtemp(prefix="stagepool-bench-tr-")), False)
    store = JobStore(url, "bench")
    try:
        ids = iter([uuid.uuid4().hex for _ in range(jobs + 200)])
        report = {
            "ping_rtt_us": _median_us(store.redis.ping, jobs),
            "submit_rtt_us": _median_us(lambda: store.apply(tx.Submit(
                next(ids), "noop", b"{}", "encode", b"d" * 60)), jobs),
        }
        for batch in (1, 16):
            ids = [uuid.uuid4().hex for _ in range(jobs)]
            store.redis.config_resetstat()
            for i in range(0, jobs, batch):
                store.run([tx.Submit(j, "noop", b"{}", "encode", b"d" * 60)
                           for j in ids[i:i + batch]])
            report[f"submit_redis_us_batch{batch}"] = _redis_us(store, jobs)
            for i in range(0, jobs, batch):
                store.run([tx.Start(j, "encode", 1, "w", "encoding", 0)
                           for j in ids[i:i + batch]])
            report[f"start_redis_us_batch{batch}"] = _redis_us(store, jobs)
            for i in range(0, jobs, batch):
                store.run([tx.Finish(j, "encode", 1, "w", "denoise", b"d" * 60)
                           for j in ids[i:i + batch]])
            report[f"finish_redis_us_batch{batch}"] = _redis_us(store, jobs)
        return report
    finally:
        store.close()
        process.terminate()
        process.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=3000)
    print(json.dumps(run(parser.parse_args().jobs), indent=2))


if __name__ == "__main__":
    main()
