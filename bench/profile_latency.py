"""Where a stagepool job's latency goes: py-spy on every process during one-at-a-time jobs.

    python bench/profile_latency.py [--seconds 10] [--workers 2] [--json]

Starts the same stagepool cluster as bench/peers.py (configs/noop.toml, no gateway), then
submits jobs one at a time (submit, wait for its end) for `--seconds` while `py-spy record
--idle` samples the broker and every worker. Each sample is put in one bucket by its stack:
  idle: ring wait     a worker asleep on its ring (futex), or spinning before it
  idle: control poll  the broker waiting for a message
  redis      a Redis round trip: encoding, the wait for the reply, parsing it
  zmq        the broker's control socket: recv, send
  ring ops   claiming, leasing, publishing (shared-memory atomics)
  stage      the stage's own run()
  python     everything else (decoding, building transitions, checks)
and reported as microseconds per job (share of samples x seconds / jobs). The driver's own
split (submit round trip, wait for the end) is timed directly. Needs py-spy (.[bench]) and
ptrace rights (root, or kernel.yama.ptrace_scope = 0).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import peers  # noqa: E402

from stagepool.broker.cluster import start_redis  # noqa: E402

BUCKETS = (  # first match wins; matched against the whole stack (py-spy's raw format)
    ("idle: ring wait", ("Ring.claim (",)),
    ("redis", ("(redis/",)),
    ("zmq", ("(zmq/",)),
    ("stage", ("(stages/noop.py",)),
    ("ring ops", ("(common/ring/",)),
)


def bucket(stack: str) -> str:
    if "Broker.serve" in stack and "Broker._" not in stack:
        return "idle: control poll"
    for name, needles in BUCKETS:
        if any(n in stack for n in needles):
            return name
    return "python"


def summarize(raw: Path, seconds: float, jobs: int) -> dict[str, float]:
    counts: collections.Counter = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        # Only the main threads are on a job's path: the broker's control loop and each
        # worker's pull loop (not heartbeats, the reaper, the ingress reader, ring servers).
        if stack.startswith("Thread._bootstrap"):
            continue
        counts[bucket(stack)] += int(n)
    total = sum(counts.values()) or 1
    return {name: round(count / total * seconds / jobs * 1e6, 1)
            for name, count in counts.most_common()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    state = Path(tempfile.mkdtemp(prefix="stagepool-profile-"))
    logs = state / "logs"
    logs.mkdir()
    redis_process, redis_url = start_redis(state, persist=False)
    os.environ["BENCH_REDIS_URL"] = redis_url
    system = peers.Stagepool(redis_url, args.workers, logs)
    try:
        system.start()
        for _ in range(50):  # ready and warm
            job_id = uuid.uuid4().hex
            system.submit(job_id)
            system.wait_one(job_id, peers.READY_TIMEOUT_S)
        targets = {c.name: c.process.pid for c in system.cluster.children}
        spies = {name: subprocess.Popen(
            [spy, "record", "--pid", str(pid), "--duration", str(int(args.seconds)), "--idle",
             "--rate", "250", "--format", "raw", "--nonblocking", "-o",
             str(state / f"{name}.txt")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for name, pid in targets.items()}
        time.sleep(1.0)  # py-spy attaches
        submit_s, total_s = [], []
        began = time.monotonic()
        while time.monotonic() - began < args.seconds - 1.5:
            job_id = uuid.uuid4().hex
            start = time.perf_counter()
            system.submit(job_id)
            submitted = time.perf_counter()
            system.wait_one(job_id, peers.JOB_TIMEOUT_S)
            submit_s.append(submitted - start)
            total_s.append(time.perf_counter() - start)
        for process in spies.values():
            process.wait(timeout=60)
        jobs_per_s = len(total_s) / (time.monotonic() - began)
        per_process = {}
        for name in targets:
            raw = state / f"{name}.txt"
            if raw.exists():
                per_process[name] = summarize(raw, 1.0, jobs_per_s)
    finally:
        system.stop()
        redis_process.terminate()
        redis_process.wait()
    report = {
        "jobs": len(total_s),
        "driver": {"submit_rtt_p50_us": round(statistics.median(submit_s) * 1e6, 1),
                   "submit_to_end_p50_us": round(statistics.median(total_s) * 1e6, 1)},
        "us_per_job": per_process,
        "raw_profiles": str(state),
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(json.dumps(report["driver"]))
    for name, buckets in per_process.items():
        print(f"{name:<10}", "  ".join(f"{k} {v:.0f}" for k, v in buckets.items()))


if __name__ == "__main__":
    main()
