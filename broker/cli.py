"""The `stagepool` command.

    stagepool up --config FILE [--workers STAGE=N ...] [--autoscale] [--redis-url URL]
                 [--state-dir DIR]          one per state dir; Ctrl-C stops it in order
    stagepool demo [--config FILE]          a local cluster, one job through every stage
    stagepool broker --config FILE
    stagepool worker --stage S --config FILE [--transport auto|shm|tcp|verbs] [--gpu ID]
                     [--redis-url URL]
    stagepool gateway --config FILE [--host H] [--port P]   HTTP API, /metrics, dashboard
    stagepool top [--interval S]            live queue depth, workers and jobs
    stagepool submit [--param K=V ...] [--params JSON] [--image FILE ...] [--job-id ID] [--json]
    stagepool status ID [--json]
    stagepool wait ID [--timeout S]
    stagepool cancel ID
    stagepool jobs [--state S] [--stage S] [--since 1h] [--limit N] [--json]
    stagepool result ID [-o FILE]           the result file, local or through the gateway
    stagepool retry ID                      an ended job again, from the stage it ended in
    stagepool purge --older-than 7d [--state S]
    stagepool env                           export lines: eval "$(stagepool env)"
    stagepool queues [--json]
    stagepool check --config FILE           the pipeline file checked, nothing started
    stagepool keys generate DIR             CURVE keys for binds beyond loopback
    stagepool models init-tiny DIR          build the tiny model directories (no download)

Client commands find the broker from --broker, then STAGEPOOL_BROKER_ENDPOINT, then the
`cluster.json` that `stagepool up` writes in its state dir (default .stagepool).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import msgspec

from ..common import config as config_mod
from ..common import locate
from ..common.addresses import redact
from ..common.client import BrokerClient
from ..common.errors import ConfigError, RemoteError, StagepoolError
from ..stages.check import check
from .client_commands import (
    broker_endpoint, cluster_config, cmd_cancel, cmd_queues, cmd_status, cmd_submit,
    cmd_wait, cmd_workers, follow_with_progress,
)
from .job_commands import add_parsers as add_job_parsers

log = logging.getLogger("stagepool")

DEFAULT_STATE_DIR = locate.DEFAULT_STATE_DIR


def _setup_logging(verbose: bool, log_format: str | None) -> None:
    """Text for people, or one JSON object per line (python-json-logger) for machines: a
    record's `extra` fields (the attempt line's job, stage, outcome, ...) become its keys.
    `--log-format` is passed to every process `up` starts through STAGEPOOL_LOG_FORMAT."""
    if log_format:
        os.environ["STAGEPOOL_LOG_FORMAT"] = log_format
    handler = logging.StreamHandler()
    if os.environ.get("STAGEPOOL_LOG_FORMAT", "text") == "json":
        from pythonjsonlogger.json import JsonFormatter

        handler.setFormatter(JsonFormatter(
            "%(asctime)s %(levelname)s %(process)d %(name)s %(message)s",
            rename_fields={"asctime": "time", "levelname": "level", "process": "pid",
                           "name": "logger"}))
    else:
        handler.setFormatter(logging.Formatter(
            "%(asctime)s %(levelname)s %(process)d %(name)s: %(message)s"))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler])


def _parse_workers(items: list[str], config) -> dict[str, int]:
    names = [stage.name for stage in config.pipeline.stages]
    workers = {}
    for item in items:
        stage, _, count = item.partition("=")
        if not count.isdigit():
            raise SystemExit(f"--workers takes STAGE=N, got {item!r}")
        if stage not in names:
            raise SystemExit(f"--workers {item}: no stage {stage!r} (stages: {', '.join(names)})")
        policy = config.stage(stage).autoscale
        if policy and not policy.min <= int(count) <= policy.max:
            raise SystemExit(f"--workers {item}: outside the stage's autoscale range "
                             f"[{policy.min}, {policy.max}]")
        workers[stage] = int(count)
    return workers


def cmd_broker(args) -> int:
    from .server import Broker

    config = config_mod.load(args.config)
    check(config, models=False)  # the broker loads no model
    broker = Broker(config)
    broker.install_signal_handlers()
    broker.serve()
    return 0


def cmd_gateway(args) -> int:
    from .gateway.app import serve

    serve(config_mod.load(args.config), broker_endpoint(args), host=args.host, port=args.port)
    return 0


def cmd_top(args) -> int:
    from .top import run_top

    config = cluster_config(args)
    if config is None:
        raise ConfigError("top needs the pipeline: run it where `stagepool up` runs (its state "
                          "dir), or give --config")
    info = locate.running(args.state_dir)
    if info and not os.environ.get("STAGEPOOL_REDIS_URL"):
        config = msgspec.structs.replace(
            config, redis=msgspec.structs.replace(config.redis, url=info["redis_url"]))
    return run_top(config, broker_endpoint(args), args.interval, args.once)


def cmd_worker(args) -> int:
    gpu = args.gpu
    if args.device is not None:
        kind, _, index = args.device.partition(":")
        if kind != "cuda" or not index:
            raise ConfigError(f"--device takes cuda:N (a GPU of this host), got {args.device!r}")
        gpu = index
    if gpu is not None:  # before anything imports torch: it reads this once
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    from ..stages.worker import Worker

    config = config_mod.load(args.config)
    check(config, models={args.stage})
    worker = Worker(config, args.stage, broker_endpoint=args.broker,
                    transport=args.transport,
                    redis_url=args.redis_url or os.environ.get("STAGEPOOL_REDIS_URL", ""))
    worker.install_signal_handlers()
    worker.run()
    return 0


def _ensure_tiny_models(config) -> None:
    """Build the tiny model directories where a toy-size family's stage names its missing
    one (`DIR/tiny`, `DIR/qwen-image`, ..., as `stagepool models init-tiny DIR` lays them
    out). An unknown family is left for `check` to report."""
    from ..stages import plugins
    from ..stages.families import Family

    for stage in config.pipeline.stages:
        opts = stage.options
        if "family" not in opts or not opts.get("model_path"):
            continue
        try:
            family = plugins.load(plugins.FAMILIES, str(opts["family"]), Family)
        except ConfigError:
            continue
        path = Path(opts["model_path"])
        if family.tiny_dir and path.name == family.tiny_dir \
                and not (path / "model_index.json").exists():
            from ..stages.families.tiny import init_tiny  # torch: model stages only

            print(f"building the tiny models in {path.parent} (once)", flush=True)
            init_tiny(path.parent)


def cmd_models(args) -> int:
    if args.action == "init-tiny":
        from ..stages.families.tiny import init_tiny

        for name, path in init_tiny(args.dir, force=args.force).items():
            print(f"{name}: {path}")
        return 0
    from ..stages.families import shapes

    if args.family is None or args.size is None:
        raise ConfigError("init-random needs --family and --size "
                          f"(known: {', '.join(f'{f} {s}' for f, s in shapes.SHAPES)})")
    try:
        if args.dry_run:
            print(json.dumps(shapes.describe(args.family, args.size), indent=2))
        else:
            print(shapes.init_random(args.dir, args.family, args.size, force=args.force))
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return 0


def cmd_check(args) -> int:
    config = config_mod.load(args.config)
    check(config, models=not args.no_models)
    print(f"ok: pipeline {config.pipeline.name}, stages "
          f"{', '.join(s.name for s in config.pipeline.stages)}")
    return 0


def cmd_keys(args) -> int:
    from ..common.security import generate

    for path in generate(args.dir):
        print(path)
    return 0


def cmd_up(args) -> int:
    from .cluster import Cluster

    config = config_mod.load(args.config)
    workers = _parse_workers(args.workers, config)
    _ensure_tiny_models(config)
    check(config)
    cluster = Cluster(config, args.config, Path(args.state_dir), workers,
                      redis_url=args.redis_url, gateway=not args.no_gateway,
                      autoscale=args.autoscale)
    info = cluster.start()
    print(f"stagepool up: broker {info['broker']}, redis {redact(info['redis_url'])}, "
          f"gateway {info['gateway'] or 'off'}, state in {args.state_dir}", flush=True)
    try:
        cluster.supervise(info)
    finally:
        cluster.stop()
    return 0


def cmd_demo(args) -> int:
    from .cluster import Cluster

    config = config_mod.load(args.config)
    _ensure_tiny_models(config)
    if "STAGEPOOL_GATEWAY_PORT" not in os.environ:  # a demo must not need port 8000 free
        config = msgspec.structs.replace(
            config, gateway=msgspec.structs.replace(config.gateway, port=0))
    state_dir = Path(args.state_dir)
    cluster = Cluster(config, args.config, state_dir, {}, redis_url=args.redis_url)
    info = cluster.start()
    try:
        with BrokerClient(info["broker"], timeout_s=60) as client:
            submitted = client.submit({"prompt": args.prompt, "seed": args.seed})
            print(f"submitted job {submitted.job_id}: {args.prompt!r} "
                  f"(dashboard: {info['gateway']}/)", flush=True)
            status = follow_with_progress(client, submitted.job_id, config, timeout_s=300)
        record_path = state_dir / "results" / f"{submitted.job_id}.json"
        record_path.parent.mkdir(parents=True, exist_ok=True)
        record_path.write_bytes(msgspec.json.format(msgspec.json.encode(status), indent=2))
        if status.state != "succeeded":
            print(f"job {submitted.job_id}: {status.state} {status.error}; see "
                  f"{state_dir / 'logs'}", file=sys.stderr)
            return 1
        files = (status.result or {}).get("files", {}) if isinstance(status.result, dict) else {}
        for kind, path in files.items():
            print(f"result {kind}: {path}")
        print(f"job record: {record_path}")
        return 0
    finally:
        cluster.stop()


def cmd_pipeline(args) -> int:
    from .pipeline import describe, render

    description = describe(config_mod.load(args.config))
    print(json.dumps(description, indent=2) if args.json else render(description))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stagepool", description=__doc__.split("\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.add_argument("--log-format", choices=["text", "json"], default=None,
                        help="log lines as text (default) or JSON objects; up passes it on")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name, fn, help_text):
        p = sub.add_parser(name, help=help_text)
        p.set_defaults(fn=fn)
        p.add_argument("--config", default=None, help="pipeline config (TOML)")
        p.add_argument("--state-dir", default=os.environ.get("STAGEPOOL_STATE_DIR",
                                                             DEFAULT_STATE_DIR))
        p.add_argument("--broker", default=None, help="broker control endpoint")
        return p

    p = add("up", cmd_up, "run a local cluster in the foreground")
    p.add_argument("--workers", action="append", default=[], metavar="STAGE=N")
    p.add_argument("--redis-url", default=None)
    p.add_argument("--no-gateway", action="store_true", help="run without the HTTP gateway")
    p.add_argument("--autoscale", action="store_true",
                   help="size every stage's pool from its queue (a stage's own `autoscale` "
                        "policy, else min its workers, max four times that)")
    p = add("demo", cmd_demo, "local cluster, one job through all stages, result written")
    p.add_argument("--redis-url", default=None)
    p.add_argument("--prompt", default="a lighthouse at dawn, oil painting")
    p.add_argument("--seed", type=int, default=0)
    add("broker", cmd_broker, "run the broker")
    p = add("worker", cmd_worker, "run one worker")
    p.add_argument("--stage", required=True)
    p.add_argument("--transport", default=None, choices=["auto", "shm", "tcp", "verbs"])
    p.add_argument("--gpu", default=None, metavar="ID",
                   help="run on this GPU only (an index or UUID: CUDA_VISIBLE_DEVICES)")
    p.add_argument("--device", default=None, metavar="cuda:N",
                   help="the same as --gpu N: the worker sees that GPU as its only one")
    p.add_argument("--redis-url", default=None,
                   help="this worker's Redis (default: the one the broker offers)")
    p = add("gateway", cmd_gateway, "run the HTTP gateway (API, /metrics, dashboard)")
    p.add_argument("--host", default=None, help="bind address (default: gateway.host)")
    p.add_argument("--port", type=int, default=None, help="port (default: gateway.port)")
    p = add("top", cmd_top, "live view of queues, workers and jobs")
    p.add_argument("--interval", type=float, default=1.0, help="refresh period in seconds")
    p.add_argument("--once", action="store_true", help="print one view and exit")
    p = add("submit", cmd_submit, "submit a job; prints its id")
    p.add_argument("--param", action="append", default=[], metavar="K=V")
    p.add_argument("--params", default=None, help="params as a JSON object")
    p.add_argument("--image", action="append", default=[], metavar="FILE",
                   help="an input image (again for a multi-image edit): stored in the "
                        "cluster's Redis, named in params.image")
    p.add_argument("--job-id", default=None)
    p.add_argument("--priority", type=int, default=0)
    p.add_argument("--deadline-s", type=float, default=None, metavar="S",
                   help="expire the job if a stage cannot start within S seconds from now")
    p.add_argument("--json", action="store_true")
    p = add("status", cmd_status, "show a job")
    p.add_argument("job_id")
    p.add_argument("--json", action="store_true")
    p = add("wait", cmd_wait, "wait for a job to end")
    p.add_argument("job_id")
    p.add_argument("--timeout", type=float, default=600)
    p = add("cancel", cmd_cancel, "cancel a job")
    p.add_argument("job_id")
    p = add("queues", cmd_queues, "queue depth per stage")
    p.add_argument("--json", action="store_true")
    p = add("pipeline", cmd_pipeline, "the stages and the jobs' params schema, with defaults")
    p.add_argument("--json", action="store_true", help="JSON, params as a JSON Schema")
    p = add("workers", cmd_workers, "every live worker: stage, device, job and step, GPU")
    p.add_argument("--json", action="store_true")
    p = add("models", cmd_models, "model directories")
    p.add_argument("action", choices=["init-tiny", "init-random"],
                   help="init-tiny: the toy models; init-random: random weights at a real "
                        "model's shapes (--family, --size)")
    p.add_argument("dir")
    p.add_argument("--force", action="store_true", help="rebuild existing directories")
    p.add_argument("--family", default=None, help="init-random: the model family (wan2.1)")
    p.add_argument("--size", default=None, help="init-random: the model size (1.3B, 14B)")
    p.add_argument("--dry-run", action="store_true",
                   help="init-random: print each component's parameters and bytes only")
    p = add("check", cmd_check, "check a pipeline file (kinds, options, model directories)")
    p.add_argument("--no-models", action="store_true",
                   help="skip the model directories (a host that loads none)")
    add_job_parsers(add)
    p = add("keys", cmd_keys, "CURVE keys for binds beyond loopback (common/security.py)")
    p.add_argument("action", choices=["generate"])
    p.add_argument("dir", help="where to write server.key*, client.key* (secrets 0600)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose, args.log_format)
    try:
        return args.fn(args)
    except (StagepoolError, RemoteError) as exc:
        print(f"stagepool: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
