"""stagepool against the job queues people use: one three-stage no-op chain through each.

    pip install -e '.[bench]'            # the peers, pinned; nothing is installed at run time
    python bench/peers.py --quick        # under a minute: 1 worker per stage, small counts
    python bench/peers.py                # the full run: 2 workers per stage, 3 rounds
    python bench/peers.py --only stagepool,raw --json

The job: stage 2 starts when stage 1 finishes, stage 3 when stage 2 finishes, and the job ends
when stage 3 finishes. Every system gets the same number of worker processes per stage, each
running one job at a time (as a GPU worker does), and the same redis-server (flushed between
systems). Systems (their apps are in bench/peerapps/):
  stagepool  configs/noop.toml; broker + workers, no gateway; submit over ZMQ
  stagepool_tcp  the same with every worker on the tcp ring, as workers on other hosts are
  raw        LPUSH/BRPOP hops between plain Python processes: the floor for Redis dispatch
  celery     chain() over the Redis broker, solo pool
  dramatiq   pipeline() over RedisBroker, --threads 1
  rq         depends_on, SimpleWorker (the default Worker forks per job: far slower)
  arq        each stage enqueues the next; max_jobs=1, poll_delay 5 ms (default 0.5 s)
  taskiq     taskiq-redis ListQueueBroker per stage; each stage kicks the next
A peer's job ends with its stage 3 LPUSHing the id onto a list the driver BRPOPs; a stagepool
job ends with its result commit, which publishes "<id> succeeded" on {ns}:ended (the driver
subscribes: one wake-up per job either way).

Two figures per system and round:
  throughput  N jobs submitted at once, each system's fastest way: stagepool pipelines its
              ZMQ submits (submit_many), raw Redis pipelines its LPUSHes, arq and taskiq
              gather their enqueue coroutines, celery, dramatiq and rq loop over their
              submit call (they have no batch form for a chain);
              N / (time from the first submit to the last job's end)
  latency     jobs submitted one at a time at low load: submit-to-end p50 and p99
Writes bench/results/peers.{json,md,png} and prints the JSON. The machine is shared and
noisy: compare the ratios within one run, not absolute figures across runs.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
RESULTS = BENCH / "results"
sys.path.insert(0, str(BENCH))

import redis  # noqa: E402

from stagepool.broker.cluster import Cluster, start_redis  # noqa: E402
from stagepool.common import config as config_mod  # noqa: E402
from stagepool.common.client import BrokerClient  # noqa: E402
from stagepool.common.jobstore import EndedFeed, JobStore  # noqa: E402
from stagepool.common.wire import Submitted  # noqa: E402

from peerapps import DONE_KEY  # noqa: E402

STAGES = ("s1", "s2", "s3")
READY_TIMEOUT_S = 60.0
JOB_TIMEOUT_S = 30.0


class System:
    """One system under test: start its workers, submit jobs, wait for their ends, stop."""

    name = ""
    note = ""

    def __init__(self, redis_url: str, workers: int, logs: Path):
        self.redis_url = redis_url
        self.workers = workers
        self.logs = logs
        self.redis = redis.Redis.from_url(redis_url)
        self.processes: list[subprocess.Popen] = []

    # -- processes -----------------------------------------------------------------------

    def spawn(self, name: str, argv: list[str]) -> None:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(BENCH), os.environ.get("PYTHONPATH", "")]))
        with open(self.logs / f"{self.name}-{name}.log", "ab") as out:
            self.processes.append(subprocess.Popen(argv, env=env, cwd=BENCH, stdout=out,
                                                   stderr=subprocess.STDOUT,
                                                   start_new_session=True))

    def start(self) -> None:
        for stage in STAGES:
            for i in range(self.workers):
                self.spawn(f"{stage}-{i}", self.worker_argv(stage))

    def worker_argv(self, stage: str) -> list[str]:
        raise NotImplementedError

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for process in self.processes:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        self.processes.clear()
        self.redis.close()

    def check_alive(self) -> None:
        for process in self.processes:
            if process.poll() is not None:
                raise RuntimeError(f"{self.name}: a worker exited ({process.returncode}); "
                                   f"see {self.logs}")

    # -- jobs ----------------------------------------------------------------------------

    def submit(self, job_id: str) -> None:
        raise NotImplementedError

    def submit_all(self, job_ids: list[str]) -> None:
        for job_id in job_ids:
            self.submit(job_id)

    def wait_one(self, job_id: str, timeout_s: float) -> None:
        """Wait for this job's end (the only job in flight)."""
        item = self.redis.brpop(DONE_KEY, timeout=timeout_s)
        if item is None:
            raise TimeoutError(f"{self.name}: job {job_id} did not end in {timeout_s} s")
        if item[1].decode() != job_id:
            raise RuntimeError(f"{self.name}: expected {job_id}, got {item[1]!r}")

    def wait_all(self, count: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        seen = 0
        while seen < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{self.name}: {seen} of {count} jobs ended")
            if self.redis.brpop(DONE_KEY, timeout=max(1, int(remaining))) is None:
                continue
            seen += 1
            if seen < count:
                seen += len(self.redis.rpop(DONE_KEY, count - seen) or [])

    def close(self) -> None:
        pass


class Stagepool(System):
    name = "stagepool"
    note = "configs/noop.toml, broker + workers, shm rings, ZMQ submit"
    max_batch: int | None = None  # None: noop.toml's (16)
    transport = "auto"  # the workers' ring transport: shm on the broker's host

    def start(self) -> None:
        namespace = f"bench{uuid.uuid4().hex[:6]}"
        path = self.logs / "stagepool.toml"
        path.write_text(_noop_toml(namespace, self.workers, self.max_batch, self.transport))
        self.cluster = Cluster(config_mod.load(path), str(path), self.logs / "stagepool",
                               {}, redis_url=self.redis_url, persist=False, gateway=False)
        info = self.cluster.start()
        self.processes = [c.process for c in self.cluster.children]
        self.client = BrokerClient(info["broker"], timeout_s=10)
        self.store = JobStore(self.redis_url, namespace)
        self.ended = EndedFeed(self.store)

    def submit(self, job_id: str) -> None:
        self.client.submit({}, job_id=job_id)

    def submit_all(self, job_ids: list[str]) -> None:
        for answer in self.client.submit_many([{"job_id": i} for i in job_ids]):
            if not isinstance(answer, Submitted):
                raise RuntimeError(f"stagepool: submit refused: {answer}")

    def wait_one(self, job_id: str, timeout_s: float) -> None:
        state = self.ended.wait([job_id], timeout_s).get(job_id)
        if state != "succeeded":
            raise RuntimeError(f"stagepool: job {job_id} {state or 'did not end'}")

    def wait_all(self, count: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        for seen in range(count):
            item = self.ended.next(deadline - time.monotonic())
            if item is None:
                raise TimeoutError(f"stagepool: {seen} of {count} jobs ended")
            if item[1] != "succeeded":
                raise RuntimeError(f"stagepool: job {item[0]} {item[1]}")

    def stop(self) -> None:
        self.ended.close()
        self.store.close()
        self.client.close()
        self.cluster.stop()
        self.processes.clear()
        self.redis.close()


class StagepoolTcp(Stagepool):
    name = "stagepool_tcp"
    note = "as stagepool, every worker on the tcp ring (as a worker on another host is)"
    transport = "tcp"


def _noop_toml(namespace: str, workers: int, max_batch: int | None,
               transport: str = "auto") -> str:
    text = (ROOT / "configs" / "noop.toml").read_text() + f'\n[worker]\ntransport = "{transport}"\n'
    text = text.replace('namespace = "stagepool"', f'namespace = "{namespace}"')
    if max_batch is not None:
        text = text.replace("max_batch = 16", f"max_batch = {max_batch}")
    return text.replace("workers = 2", f"workers = {workers}")


class Raw(System):
    name = "raw"
    note = "LPUSH/BRPOP between plain processes"

    def worker_argv(self, stage: str) -> list[str]:
        target = {"s1": "s2", "s2": "s3", "s3": "done"}[stage]
        return [sys.executable, "-m", "peerapps.raw", stage, target]

    def submit(self, job_id: str) -> None:
        self.redis.lpush("s1", job_id)

    def submit_all(self, job_ids: list[str]) -> None:
        pipe = self.redis.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.lpush("s1", job_id)
        pipe.execute()


class Peer(System):
    """A peer system: its app module in bench/peerapps submits (a `Submitter`, or the module's
    own `submit`), and its CLI runs the workers."""

    app = ""  # the module's name in bench/peerapps

    def start(self) -> None:
        module = importlib.import_module(f"peerapps.{self.app}")
        self.submitter = module.Submitter() if hasattr(module, "Submitter") else module
        super().start()

    def submit(self, job_id: str) -> None:
        self.submitter.submit(job_id)

    def submit_all(self, job_ids: list[str]) -> None:
        if hasattr(self.submitter, "submit_all"):  # asyncio.gather: all in flight at once
            self.submitter.submit_all(job_ids)
        else:
            super().submit_all(job_ids)

    def close(self) -> None:
        if hasattr(self.submitter, "close"):
            self.submitter.close()


class Celery(Peer):
    name, app = "celery", "celery_app"
    note = "chain(), Redis broker, -P solo, ignore results"

    def worker_argv(self, stage: str) -> list[str]:
        return [sys.executable, "-m", "celery", "-A", "peerapps.celery_app", "worker", "-Q",
                stage, "-P", "solo", "-l", "warning", "--without-gossip", "--without-mingle",
                "--without-heartbeat", "-n", f"{stage}-{uuid.uuid4().hex[:6]}@%h"]


class Dramatiq(Peer):
    name, app = "dramatiq", "dramatiq_app"
    note = "pipeline(), RedisBroker, --processes 1 --threads 1"

    def worker_argv(self, stage: str) -> list[str]:
        return [sys.executable, "-m", "dramatiq", "peerapps.dramatiq_app", "--processes", "1",
                "--threads", "1", "--queues", stage]


class RQ(Peer):
    name, app = "rq", "rq_app"
    note = "depends_on, SimpleWorker"

    def worker_argv(self, stage: str) -> list[str]:
        return [sys.executable, "-m", "rq.cli", "worker", stage, "--worker-class",
                "rq.worker.SimpleWorker", "--url", self.redis_url, "--quiet"]


class Arq(Peer):
    name, app = "arq", "arq_app"
    note = "enqueue_job chain, max_jobs=1, poll_delay 5 ms"

    def worker_argv(self, stage: str) -> list[str]:
        return [sys.executable, "-m", "arq", f"peerapps.arq_app.{stage.upper()}"]


class Taskiq(Peer):
    name, app = "taskiq", "taskiq_app"
    note = "ListQueueBroker per stage, kiq chain, --max-async-tasks 1"

    def worker_argv(self, stage: str) -> list[str]:
        return [sys.executable, "-m", "taskiq", "worker", f"peerapps.taskiq_app:{stage}_broker",
                "--workers", "1", "--max-async-tasks", "1", "--no-configure-logging"]


SYSTEMS = {cls.name: cls for cls in (Stagepool, StagepoolTcp, Raw, Celery, Dramatiq, RQ, Arq,
                                      Taskiq)}


# -- measuring -------------------------------------------------------------------------------

def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _ids(count: int) -> list[str]:
    return [uuid.uuid4().hex for _ in range(count)]


def measure(system: System, jobs: int, latency_jobs: int, warmup: int) -> dict:
    # Ready: the first job through every stage (workers start at their own pace).
    for job_id in _ids(1):
        system.submit(job_id)
        system.wait_one(job_id, READY_TIMEOUT_S)
    for job_id in _ids(warmup):
        system.submit(job_id)
        system.wait_one(job_id, JOB_TIMEOUT_S)
    latencies = []
    for job_id in _ids(latency_jobs):
        started = time.perf_counter()
        system.submit(job_id)
        system.wait_one(job_id, JOB_TIMEOUT_S)
        latencies.append(time.perf_counter() - started)
    system.check_alive()
    ids = _ids(jobs)
    started = time.perf_counter()
    system.submit_all(ids)
    submitted = time.perf_counter()
    system.wait_all(jobs, JOB_TIMEOUT_S + jobs * 0.05)
    elapsed = time.perf_counter() - started
    system.check_alive()
    return {"throughput_jobs_s": jobs / elapsed, "submit_s": submitted - started,
            "p50_ms": statistics.median(latencies) * 1e3, "p99_ms": _pct(latencies, 0.99) * 1e3}


def run_system(name: str, redis_url: str, args, logs: Path) -> dict:
    rounds = []
    for _ in range(args.rounds):
        redis.Redis.from_url(redis_url).flushall()
        system = SYSTEMS[name](redis_url, args.workers, logs)
        try:
            system.start()
            rounds.append(measure(system, args.jobs, args.latency_jobs, args.warmup))
        finally:
            system.close()
            system.stop()
    row = {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
    row = {key: round(value, 3) for key, value in row.items()}
    row["rounds"] = [{k: round(v, 3) for k, v in r.items()} for r in rounds]
    row["setup"] = SYSTEMS[name].note
    return row


def machine() -> dict:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
        mem_kb = int(next(line.split()[1] for line in Path("/proc/meminfo").read_text()
                          .splitlines() if line.startswith("MemTotal")))
    except (OSError, StopIteration, ValueError):
        mem_kb = 0
    server = subprocess.run([shutil.which("redis-server") or "redis-server", "--version"],
                            capture_output=True, text=True).stdout.split()
    return {"cpu": model, "cpus": os.cpu_count(), "memory_gib": round(mem_kb / 2**20, 1),
            "kernel": platform.release(), "python": platform.python_version(),
            "redis_server": next((w.split("=")[1] for w in server if w.startswith("v=")), "")}


# -- reporting -------------------------------------------------------------------------------

def summarize(results: dict) -> dict:
    # The peers: neither stagepool (on either ring) nor the raw chain, which stores nothing.
    peers = {k: v for k, v in results.items()
             if not k.startswith("stagepool") and k != "raw"}
    summary = {}
    if "stagepool" in results and peers:
        ours = results["stagepool"]
        best_tp = max(peers, key=lambda k: peers[k]["throughput_jobs_s"])
        best_p50 = min(peers, key=lambda k: peers[k]["p50_ms"])
        summary["best_peer_throughput"] = best_tp
        summary["throughput_vs_best_peer"] = round(
            ours["throughput_jobs_s"] / peers[best_tp]["throughput_jobs_s"], 2)
        summary["best_peer_p50"] = best_p50
        summary["p50_vs_best_peer"] = round(ours["p50_ms"] / peers[best_p50]["p50_ms"], 3)
    if "stagepool" in results and "raw" in results:
        summary["throughput_vs_raw"] = round(
            results["stagepool"]["throughput_jobs_s"] / results["raw"]["throughput_jobs_s"], 2)
        summary["p50_vs_raw"] = round(results["stagepool"]["p50_ms"] / results["raw"]["p50_ms"], 2)
    return summary


def markdown(report: dict) -> str:
    results = report["results"]
    base = results.get("stagepool")
    m = report["machine"]
    lines = [
        f"Three-stage no-op chain, {report['workers']} worker process(es) per stage, one job at "
        f"a time each; throughput over {report['jobs']} jobs submitted at once, latency over "
        f"{report['latency_jobs']} jobs one at a time; median of {report['rounds']} round(s).",
        f"Machine: {m['cpu']}, {m['cpus']} CPUs, {m['memory_gib']} GiB, Linux {m['kernel']}, "
        f"Python {m['python']}, redis-server {m['redis_server']}.", "",
        "| system | throughput (jobs/s) | stagepool × | p50 (ms) | p99 (ms) | setup |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for name, row in results.items():
        ratio = (f"{base['throughput_jobs_s'] / row['throughput_jobs_s']:.2f}"
                 if base and name != "stagepool" else "")
        lines.append(f"| {name} | {row['throughput_jobs_s']:.0f} | {ratio} | {row['p50_ms']:.2f} "
                     f"| {row['p99_ms']:.2f} | {row['setup']} |")
    return "\n".join(lines) + "\n"


def chart(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = report["results"]
    names = list(results)
    colors = ["#1f77b4" if n == "stagepool" else "#7f7f7f" if n == "raw" else "#ff7f0e"
              for n in names]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    bars = left.bar(names, [results[n]["throughput_jobs_s"] for n in names], color=colors)
    left.bar_label(bars, fmt="%.0f", fontsize=8)
    left.set_title(f"throughput, {report['jobs']} jobs at once (higher is better)")
    left.set_ylabel("jobs/s")
    x = range(len(names))
    right.bar([i - 0.2 for i in x], [results[n]["p50_ms"] for n in names], 0.4, color=colors,
              label="p50")
    right.bar([i + 0.2 for i in x], [results[n]["p99_ms"] for n in names], 0.4, color=colors,
              alpha=0.45, label="p99")
    right.set_xticks(list(x), names)
    right.set_yscale("log")
    right.set_ylabel("ms (log)")
    right.set_title("submit-to-end latency, one at a time (lower is better)")
    right.legend()
    for axis in (left, right):
        axis.tick_params(axis="x", rotation=30)
    m = report["machine"]
    fig.suptitle(f"3-stage no-op chain, {report['workers']} worker(s)/stage — "
                 f"{m['cpus']} CPUs, {m['cpu']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="under a minute")
    parser.add_argument("--only", default="", help="comma-separated systems")
    parser.add_argument("--workers", type=int, default=None, help="processes per stage")
    parser.add_argument("--jobs", type=int, default=None, help="throughput: jobs at once")
    parser.add_argument("--latency-jobs", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--max-batch", type=int, default=None,
                        help="stagepool workers' max_batch (default: configs/noop.toml's 16)")
    parser.add_argument("--json", action="store_true", help="print the JSON only")
    parser.add_argument("--out", default=str(RESULTS), help="directory for the results")
    args = parser.parse_args()
    quick = {"workers": 1, "jobs": 200, "latency_jobs": 40, "rounds": 1, "warmup": 5}
    full = {"workers": 2, "jobs": 2000, "latency_jobs": 300, "rounds": 3, "warmup": 20}
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.max_batch is not None:
        Stagepool.max_batch = args.max_batch
        Stagepool.note += f", max_batch {args.max_batch}"
    names = [n for n in args.only.split(",") if n] or list(SYSTEMS)
    unknown = set(names) - set(SYSTEMS)
    if unknown:
        parser.error(f"unknown systems: {', '.join(sorted(unknown))}")

    state = Path(tempfile.mkdtemp(prefix="stagepool-bench-peers-"))
    logs = state / "logs"
    logs.mkdir()
    redis_process, redis_url = start_redis(state, persist=False)
    os.environ["BENCH_REDIS_URL"] = redis_url  # for the peers' apps, imported here and in workers
    results = {}
    try:
        for name in names:
            began = time.monotonic()
            results[name] = run_system(name, redis_url, args, logs)
            if not args.json:
                print(f"{name}: {results[name]['throughput_jobs_s']:.0f} jobs/s, "
                      f"p50 {results[name]['p50_ms']:.2f} ms, p99 {results[name]['p99_ms']:.2f} ms"
                      f" ({time.monotonic() - began:.0f} s)", file=sys.stderr, flush=True)
    finally:
        redis_process.terminate()
        redis_process.wait()
    report = {"mode": "quick" if args.quick else "full", "workers": args.workers,
              "argv": sys.argv[1:],
              "jobs": args.jobs, "latency_jobs": args.latency_jobs, "rounds": args.rounds,
              "machine": machine(), "results": results, "summary": summarize(results),
              "logs": str(logs)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "peers" + ("-" + "-".join(names) if args.only else "") + (
        f"-batch{args.max_batch}" if args.max_batch is not None else "") + (
        "-quick" if args.quick else "")
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / f"{stem}.md").write_text(markdown(report))
    chart(report, out / f"{stem}.png")
    print(json.dumps(report, indent=2))
    if not args.json:
        print(markdown(report), file=sys.stderr)


if __name__ == "__main__":
    main()
