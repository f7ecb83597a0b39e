"""The CLI's commands that talk to a running deployment: submit, status, wait, cancel,
workers, queues (jobs.py: jobs, result, retry, purge, env; broker/cli.py has the parser and
the commands that run processes).

They find the broker from --broker, then STAGEPOOL_BROKER_ENDPOINT, then the `cluster.json`
that `stagepool up` writes in its state dir (common/locate.py), then --config's
broker.endpoint; and use the deployment's keys where its config or the environment names
them.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import msgspec

from ..common import config as config_mod
from ..common import locate
from ..common.client import BrokerClient
from ..common.errors import ConfigError
from ..common.wire import TERMINAL_STATES, public


def broker_endpoint(args) -> str:
    if getattr(args, "broker", None):
        return args.broker
    if os.environ.get("STAGEPOOL_BROKER_ENDPOINT"):
        return os.environ["STAGEPOOL_BROKER_ENDPOINT"]
    info = locate.running(args.state_dir)
    if info:
        return info["broker"]
    return config_mod.load(getattr(args, "config", None)).broker.endpoint


def cluster_config(args):
    """--config, else the file the running cluster was started with; None without either
    (a client needs only addresses and keys, which the environment may give)."""
    path = getattr(args, "config", None) or (locate.running(args.state_dir) or {}).get("config")
    return config_mod.load(path) if path else None


def redis_address(args, config) -> tuple[str, str]:
    """(URL, namespace) of the cluster's Redis: the environment's, else the running
    cluster's, else `config`'s."""
    url = (os.environ.get("STAGEPOOL_REDIS_URL")
           or (locate.running(args.state_dir) or {}).get("redis_url") or config.redis.url)
    return url, os.environ.get("STAGEPOOL_NAMESPACE") or config.redis.namespace


def store_images(args, paths: list[str]) -> list[str]:
    """Image files stored beside the jobs, as the gateway stores uploads (common/blobs.py):
    their blob references. The broker checks each when the job is submitted."""
    from ..common.blobs import BlobStore
    from ..common.jobstore import JobStore

    config = cluster_config(args) or config_mod.Config()
    store = JobStore(*redis_address(args, config))
    try:
        blobs = BlobStore(store, config.inputs.ttl_s)
        refs = []
        for path in paths:
            try:
                data = Path(path).read_bytes()
            except OSError as exc:
                raise ConfigError(f"--image {path}: {exc.strerror or exc}") from None
            refs.append(blobs.put(data))
        return refs
    finally:
        store.close()


def _client(args) -> BrokerClient:
    """A client of the broker, with the keys of the cluster's security.keys_dir (or the
    environment's) where it has them."""
    from ..common.security import Keys

    config = cluster_config(args)
    return BrokerClient(broker_endpoint(args),
                        keys=Keys.from_config(config) if config else None)


def follow_with_progress(client: BrokerClient, job_id: str, config, timeout_s: float):
    """Follow a job with one progress bar per stage (denoise steps as they are reported)."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    names = [stage.name for stage in config.pipeline.stages]
    deadline = time.monotonic() + timeout_s
    columns = (TextColumn("{task.description:<10}"), BarColumn(),
               TextColumn("{task.fields[note]}"), TimeElapsedColumn())
    with Progress(*columns, transient=False) as bars:
        tasks = {name: bars.add_task(name, total=1, note="queued") for name in names}
        while True:
            status = client.status(job_id)
            for name in names:
                info = status.stages.get(name, {})
                step = info.get("step")
                if "finished_ms" in info or (name == names[-1] and status.state == "succeeded"):
                    bars.update(tasks[name], completed=bars.tasks[tasks[name]].total, note="done")
                elif step:
                    done, total = (int(x) for x in step.split("/"))
                    bars.update(tasks[name], total=total, completed=done, note=f"step {step}")
                elif "started_ms" in info:
                    bars.update(tasks[name], note="running")
            if status.state in TERMINAL_STATES:
                return status
            if time.monotonic() >= deadline:
                raise TimeoutError(f"job {job_id} still {status.state} after {timeout_s} s")
            time.sleep(0.05)


def _follow(client: BrokerClient, job_id: str, timeout_s: float, show: bool):
    deadline = time.monotonic() + timeout_s
    last = None
    while True:
        status = client.status(job_id)
        if show and status.state != last:
            print(f"  {job_id}: {status.state}", flush=True)
            last = status.state
        if status.state in TERMINAL_STATES:
            return status
        if time.monotonic() >= deadline:
            raise TimeoutError(f"job {job_id} still {status.state} after {timeout_s} s")
        time.sleep(0.05)


def cmd_submit(args) -> int:
    try:
        params = json.loads(args.params) if args.params else {}
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--params is not JSON: {exc}") from None
    if not isinstance(params, dict):
        raise ConfigError(f"--params must be a JSON object, got {type(params).__name__}")
    for item in args.param:
        key, _, value = item.partition("=")
        params[key] = value
    if args.image:
        refs = store_images(args, args.image)
        params["image"] = refs[0] if len(refs) == 1 else refs
    with _client(args) as client:
        deadline_ms = int((time.time() + args.deadline_s) * 1000) if args.deadline_s else 0
        submitted = client.submit(params, job_id=args.job_id, priority=args.priority,
                                  deadline_ms=deadline_ms)
    if args.json:
        print(json.dumps(public(submitted)))
    else:
        print(submitted.job_id)
    return 0


def cmd_status(args) -> int:
    with _client(args) as client:
        status = client.status(args.job_id)
    if args.json:
        print(json.dumps(public(status)))
    else:
        progress = f" {status.progress:.0%}" if status.progress is not None else ""
        print(f"{status.job_id} {status.state}{progress}"
              + (f" ({status.error})" if status.error else ""))
    return 0


def cmd_wait(args) -> int:
    with _client(args) as client:
        try:
            status = _follow(client, args.job_id, args.timeout, show=False)
        except TimeoutError as exc:
            print(str(exc), file=sys.stderr)
            return 2
    print(f"{status.job_id} {status.state}")
    return 0 if status.state == "succeeded" else 1


def cmd_cancel(args) -> int:
    with _client(args) as client:
        result = client.cancel(args.job_id)
    print(f"{result.job_id} {result.state}")
    return 0 if result.cancelled else 1


def cmd_workers(args) -> int:
    with _client(args) as client:
        listing = client.workers()
    if args.json:
        print(msgspec.json.encode(listing.workers).decode())
        return 0
    now_ms = time.time() * 1000
    rows = [("WORKER", "STAGE", "HOST", "PID", "DEVICE", "BUSY", "JOB (STEP)", "DONE",
             "BEAT", "GPU MEMORY", "UTIL")]
    for w in listing.workers:
        job = (w.jobs[0] + (f" ({w.step})" if w.step else "")
               + (f" +{len(w.jobs) - 1}" if len(w.jobs) > 1 else "")) if w.jobs else "-"
        gpu = w.gpu
        rows.append((
            w.worker_id, w.stage, w.host, str(w.pid),
            w.device + (f" (GPU {gpu.index})" if gpu else ""), "yes" if w.busy else "no", job,
            str(w.jobs_done), f"{max(0.0, now_ms - w.heartbeat_ms) / 1000:.1f}s ago",
            f"{gpu.memory_used_mib / 1024:.1f}/{gpu.memory_total_mib / 1024:.1f} GiB "
            f"(own {gpu.process_reserved_mib / 1024:.1f})" if gpu else "-",
            f"{gpu.utilization_pct:.0f}%" if gpu else "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    return 0


def cmd_queues(args) -> int:
    with _client(args) as client:
        queues = client.queues()
    if args.json:
        print(json.dumps(public(queues)))
        return 0
    print(f"{'stage':<12}{'depth':>8}{'backlog':>9}{'in flight':>11}{'workers':>9}")
    for q in queues.queues:
        print(f"{q.stage:<12}{q.depth:>8}{q.backlog:>9}{q.in_flight:>11}{q.workers:>9}")
    return 0
