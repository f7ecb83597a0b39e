"""The CLI's commands for finding and tending jobs, and for reaching the running cluster:
`jobs`, `result`, `retry`, `purge` and `env`.

    stagepool jobs --state failed --since 1h        newest first; --json for scripts
    stagepool result ID -o fox.png                   the file, local or through the gateway
    stagepool retry ID                               run again from the stage it ended in
    stagepool purge --state failed --older-than 7d   delete ended jobs' records
    eval "$(stagepool env)"                          STAGEPOOL_* for redis-cli, Node, Python
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import time
from datetime import datetime
from pathlib import Path

from ..common import config as config_mod
from ..common import locate
from ..common.errors import ConfigError
from ..common.wire import public
from .client_commands import _client, broker_endpoint, cluster_config

_UNITS_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration_s(text: str) -> float:
    """`90`, `90s`, `30m`, `2h`, `7d`, `1w` as seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", text)
    if not match:
        raise ConfigError(f"not a duration: {text!r} (e.g. 90s, 30m, 2h, 7d)")
    return float(match.group(1)) * _UNITS_S[match.group(2) or "s"]


def cmd_jobs(args) -> int:
    since_ms = int((time.time() - parse_duration_s(args.since)) * 1000) if args.since else 0
    found, before_ms = [], 0
    with _client(args) as client:
        while len(found) < args.limit:
            page = client.jobs(args.state or "", args.stage or "", since_ms, before_ms,
                               min(1000, args.limit - len(found)))
            found += page.jobs
            if not page.next_before_ms:
                break
            before_ms = page.next_before_ms
    found = found[:args.limit]
    if args.json:
        print(json.dumps([public(job) for job in found]))
        return 0
    rows = [("JOB", "STATE", "STAGE", "PROGRESS", "CREATED", "ERROR")]
    for job in found:
        created = datetime.fromtimestamp(job.created_ms / 1000).strftime("%m-%d %H:%M:%S")
        rows.append((job.job_id, job.state, job.stage,
                     f"{job.progress:.0%}" if job.progress is not None else "",
                     created, job.error.splitlines()[0][:80] if job.error else ""))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    return 0


def cmd_result(args) -> int:
    """The job's result file: copied from where decode wrote it when that is on this host,
    else fetched through the gateway."""
    with _client(args) as client:
        status = client.status(args.job_id)
    if status.state != "succeeded":
        error = f": {status.error}" if status.error else ""
        raise ConfigError(f"job {args.job_id} is {status.state}{error}; no result yet")
    files = status.result.get("files", {}) if isinstance(status.result, dict) else {}
    if not files:
        print(json.dumps(status.result))
        return 0
    kind = args.file or next(iter(files))
    if kind not in files:
        raise ConfigError(f"job {args.job_id} has no {kind!r} file (it has {', '.join(files)})")
    source = Path(files[kind])
    target = Path(args.output) if args.output else Path(source.name)
    if source.is_file():
        if source.resolve() != target.resolve():
            shutil.copyfile(source, target)
    else:
        from ..common.api import Client

        gateway = args.gateway or locate.gateway_url(args.state_dir)
        config = cluster_config(args)
        with Client(gateway, token=config.gateway.token or None if config else None) as http:
            http.result(args.job_id, target, file=kind)
    print(target)
    return 0


def cmd_retry(args) -> int:
    with _client(args) as client:
        result = client.retry(args.job_id)
    print(f"{result.job_id} {result.state}")
    return 0


def cmd_purge(args) -> int:
    older_than_s = parse_duration_s(args.older_than)
    with _client(args) as client:
        purged = client.purge(older_than_s, args.state or "")
    print(f"purged {purged.purged} jobs")
    return 0


def cmd_env(args) -> int:
    """`export` lines for the running cluster (or the config's addresses)."""
    info = locate.running(args.state_dir)
    if info is None and not args.config:
        raise ConfigError(f"no cluster running in {locate.state_dir(args.state_dir)} "
                          "(start one with `stagepool up`, or name --state-dir or --config)")
    config = cluster_config(args) or config_mod.Config()
    info = info or {}
    values = {
        "STAGEPOOL_STATE_DIR": str(locate.state_dir(args.state_dir).resolve()),
        "STAGEPOOL_BROKER_ENDPOINT": broker_endpoint(args),
        "STAGEPOOL_REDIS_URL": info.get("redis_url") or config.redis.url,
        "STAGEPOOL_NAMESPACE": config.redis.namespace,
        "STAGEPOOL_GATEWAY_URL": info.get("gateway") or
        f"http://{config.gateway.host}:{config.gateway.port}",
    }
    if config.gateway.token:
        values["STAGEPOOL_GATEWAY_TOKEN"] = config.gateway.token
    if config.security.keys_dir:
        values["STAGEPOOL_SECURITY_KEYS_DIR"] = str(Path(config.security.keys_dir).resolve())
    for name, value in values.items():
        print(f"export {name}={shlex.quote(value)}")
    return 0


def add_parsers(add) -> None:
    """Register the commands with the CLI's `add(name, fn, help)`."""
    p = add("jobs", cmd_jobs, "list jobs, newest first, by state and stage")
    p.add_argument("--state", default=None, help="a state (failed, denoising, queued:denoise) "
                   "or a group: queued, running, active, ended")
    p.add_argument("--stage", default=None, help="the stage a job is in, or ended in")
    p.add_argument("--since", default=None, metavar="DURATION",
                   help="created within this long (90s, 30m, 2h, 7d)")
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--json", action="store_true")
    p = add("result", cmd_result, "write a succeeded job's result file")
    p.add_argument("job_id")
    p.add_argument("-o", "--output", default=None, help="where (default: its name, here)")
    p.add_argument("--file", default=None, help="which file: image, video or frames")
    p.add_argument("--gateway", default=None, help="the gateway's URL, when not local")
    p = add("retry", cmd_retry, "run an ended job again from the stage it ended in")
    p.add_argument("job_id")
    p = add("purge", cmd_purge, "delete ended jobs' records")
    p.add_argument("--state", default=None, help="only this end: failed, dead, cancelled, ...")
    p.add_argument("--older-than", required=True, metavar="DURATION",
                   help="ended over this long ago (0 for all; 30m, 7d)")
    add("env", cmd_env, "print export lines for the running cluster (eval \"$(stagepool env)\")")

