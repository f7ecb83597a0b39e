"""Settings as typed structs, loaded from TOML and overridable by environment.

Environment overrides name a section and a field: `STAGEPOOL_<SECTION>_<FIELD>`, e.g.
`STAGEPOOL_REDIS_URL`, `STAGEPOOL_REDIS_NAMESPACE`, `STAGEPOOL_BROKER_ENDPOINT`,
`STAGEPOOL_RING_BACKEND`. Values are parsed as the field's type (numbers, booleans, strings).
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from .errors import ConfigError

ENV_PREFIX = "STAGEPOOL_"
DEFAULT_RESULTS_DIR = ".stagepool/results"  # where decode writes (a stage's `results_dir`)


class AutoscaleConfig(msgspec.Struct, forbid_unknown_fields=True):
    """A stage's pool sized from its queue by `stagepool up` (broker/autoscale.py), as KEDA
    sizes it on Kubernetes (deploy/k8s/components/keda)."""

    min: Annotated[int, msgspec.Meta(ge=0)] = 1
    max: Annotated[int, msgspec.Meta(ge=1)] = 4
    # Jobs per worker, waiting plus running: 1 gives every queued job a worker (up to max);
    # 2 lets one wait behind each running job.
    target_depth: Annotated[float, msgspec.Meta(gt=0)] = 2.0
    cooldown_s: Annotated[float, msgspec.Meta(ge=0)] = 60.0  # below target this long: one fewer

    def __post_init__(self):
        if self.min > self.max:
            raise ValueError(f"autoscale min ({self.min}) > max ({self.max})")


class StageConfig(msgspec.Struct, forbid_unknown_fields=True):
    """One stage of the pipeline and its worker pool."""

    name: str
    state: str = ""  # the job state while in this stage; default "<name>ing"-like below
    # The stage implementation: a built-in kind ("noop", "encode", "denoise", "decode"), an
    # entry point in the `stagepool.stages` group, or "module:Class" (stages/base.py).
    kind: str = "noop"
    sleep_ms: float = 0.0  # noop stages: simulated work per job
    workers: int = 1  # pool size that `stagepool up` starts
    # The GPUs of this host the pool runs on ("0", "1" or GPU UUIDs): `stagepool up` gives
    # worker i CUDA_VISIBLE_DEVICES = devices[i % len(devices)], so each sees one GPU as
    # "cuda". ["all"]: every GPU of the host (nvidia-smi). Empty: the workers inherit
    # CUDA_VISIBLE_DEVICES (every GPU; "cuda" is GPU 0).
    devices: list[str] = []
    max_attempts: int = 3
    lease_ms: int = 10_000  # a lease not refreshed for this long is expired
    # Claim up to this many waiting dispatches at once, start and commit them in one Redis
    # round trip each (each holds one of the ring's lease cells). For stages that take
    # milliseconds; keep 1 for GPU ones, where a claimed job would idle in its batch while
    # another worker is free.
    max_batch: int = 1
    # A job's run in this stage is stopped at its next step after this long (and retried, up
    # to max_attempts); one that reaches no step within worker.stop_grace_s more makes its
    # worker exit, so that the reaper recovers the job and the supervisor starts a new one.
    time_limit_s: float = 3600.0
    # A failed attempt (an error, not a lost worker) runs again after retry_backoff_s, doubled
    # each time, at most retry_backoff_max_s: a CUDA OOM or a peer's hiccup gets time to pass.
    retry_backoff_s: float = 1.0
    retry_backoff_max_s: float = 60.0
    # Sized from its queue by `stagepool up` between min and max (None: `workers`, fixed;
    # `up --autoscale` gives every stage the default policy).
    autoscale: AutoscaleConfig | None = None
    options: dict[str, Any] = {}

    def job_state(self) -> str:
        return self.state or f"{self.name}:running"


class PipelineConfig(msgspec.Struct, forbid_unknown_fields=True):
    name: str = "default"
    stages: list[StageConfig] = []


class RedisConfig(msgspec.Struct, forbid_unknown_fields=True):
    # The broker's Redis: ACL users (redis://user:password@host) and TLS (rediss://) work as
    # redis-py takes them. A worker uses the URL the broker offers (a loopback host read as
    # the broker's address) unless it is given its own: `stagepool worker --redis-url` or
    # STAGEPOOL_REDIS_URL in its environment.
    url: str = "redis://127.0.0.1:6379/0"
    namespace: str = "stagepool"
    # The events stream (every transition of every job, about 6 per job; a step is not an
    # event) is cut to about this many entries.
    events_maxlen: int = 100_000
    # An ended job's record (params, result, error, timeline) expires this long after it
    # ended; 0 keeps it until `stagepool purge`. The broker then forgets its id.
    retention_s: float = 7 * 86400.0
    socket_timeout_s: float = 5.0
    # The Redis that `stagepool up` starts: "everysec" (a kill may lose the last second's
    # writes, docs/reliability.md) or "always" (none, a fsync per write batch).
    appendfsync: Literal["everysec", "always"] = "everysec"


class RingConfig(msgspec.Struct, forbid_unknown_fields=True):
    capacity: int = 1024  # slots per stage ring, a power of two
    slot_bytes: int = 1024
    cells: int = 64  # lease cells per ring = most workers per stage
    tcp_bind: str = "tcp://127.0.0.1:0"  # "" disables the tcp ring server; may be a wildcard
    # What workers are told to dial; "" = tcp_bind, whose loopback or wildcard host a worker
    # on another host replaces with the broker's address (common/addresses.py).
    tcp_advertise: str = ""
    verbs_device: str = ""  # e.g. "mlx5_0"; "" disables verbs
    claim_grace_ms: int = 2000  # a slot claimed but not released this long is reclaimed
    publish_grace_ms: int = 2000  # a head slot taken but not published this long is skipped


class BrokerConfig(msgspec.Struct, forbid_unknown_fields=True):
    endpoint: str = "tcp://127.0.0.1:5555"  # control ROUTER; binds default to loopback
    reaper_interval_ms: int = 100
    worker_timeout_ms: int = 10_000  # a worker silent this long is dropped from the registry
    # Dispatches held for a full ring, per stage. When the first stage's is full, submits are
    # refused as busy (HTTP 429, Retry-After: busy_retry_after_s) and nothing is created.
    max_backlog: int = 100_000
    busy_retry_after_s: float = 1.0


class WorkerConfig(msgspec.Struct, forbid_unknown_fields=True):
    transport: str = "auto"  # "auto" | "shm" | "tcp" | "verbs"
    heartbeat_ms: int = 1000
    claim_wait_s: float = 0.5  # one wait on an empty ring, between checks for drain/reattach
    spin_us: int = 50  # busy-poll this long before sleeping on an empty ring
    drain_timeout_s: float = 30.0
    control_timeout_s: float = 5.0  # a request to the broker (register, rewind, ping)
    register_retry_s: float = 0.5  # between tries to reach the broker
    publish_wait_s: float = 1.0  # a hand-on into a full ring logs after this, then waits on
    stop_grace_s: float = 30.0  # past a stage's time limit: how long until a hung run exits
    progress_interval_ms: int = 250  # a running stage's step is written to Redis this often


class TransferConfig(msgspec.Struct, forbid_unknown_fields=True):
    """The data plane: how tensors move between workers (common/transfer)."""

    backend: str = "auto"  # "auto" (same host in place, else Mooncake) | "local" | "mooncake"
    protocol: str = "tcp"  # Mooncake transport: "tcp" | "rdma"
    device: str = ""  # Mooncake RDMA device filter, e.g. "mlx5_0"; "" = all
    # The address peers reach this worker's engine and release notices at; "" = the local
    # address of the route to the broker's host (common/addresses.py).
    host: str = ""
    pool_mb: int = 256  # each worker's registered pool (memfd pages are only used as touched)
    timeout_s: float = 10.0  # MC_TRANSFER_TIMEOUT: how long a frozen peer can block a read
    retries: int = 2  # reads retried (after backoff_s) before the producer counts as gone
    backoff_s: float = 0.5  # >= 0.2: the engine can wedge a link retried sooner
    pull_timeout_s: float = 120.0
    dead_peer_s: float = 30.0  # a producer that failed a pull is skipped (its jobs rewound) this long
    hold_check_s: float = 5.0  # holds older than this are checked against Redis and swept
    put_wait_s: float = 30.0  # a full pool waits this long for releases before failing


class InputsConfig(msgspec.Struct, forbid_unknown_fields=True):
    """Input files of image-conditioned jobs (common/blobs.py): stored once in Redis."""

    ttl_s: float = 86400.0  # a stored input expires this long after it was stored
    max_bytes: int = 20 << 20
    max_pixels: int = 4096 * 4096
    # LightX2V's `image_path` as a server path: only a file under this directory ("": off).
    dir: str = ""
    # `image_path` as an http(s) URL, fetched by the gateway: off unless the operator allows it.
    allow_urls: bool = False
    # The hosts URLs may name; [] = any host whose every address is public (never loopback,
    # private, link-local: no cloud metadata, no internal service). A listed host is trusted.
    url_hosts: list[str] = []
    url_timeout_s: float = 10.0  # the whole fetch, connect to last byte


class GatewayConfig(msgspec.Struct, forbid_unknown_fields=True):
    """The HTTP gateway (broker/gateway): API, /metrics, dashboard."""

    host: str = "127.0.0.1"  # anything wider needs `token`
    port: int = 8000  # 0: `stagepool up` picks a free one (written to cluster.json)
    token: str = ""  # bearer token for every route but /, /static and /healthz; "" = none
    max_body_kb: int = 256  # a request body above this gets 413
    results_dirs: list[str] = []  # extra directories /result may serve files from
    broker_timeout_s: float = 5.0


class SecurityConfig(msgspec.Struct, forbid_unknown_fields=True):
    """Who may reach the broker's control socket, the tcp ring and the release notices
    (common/security.py). Binds beyond loopback need keys, or insecure = true."""

    keys_dir: str = ""  # `stagepool keys generate DIR`; or STAGEPOOL_SECURITY_KEYS_DIR
    insecure: bool = False  # wide binds without keys: only on a network that is private


class Config(msgspec.Struct, forbid_unknown_fields=True):
    pipeline: PipelineConfig = msgspec.field(default_factory=PipelineConfig)
    redis: RedisConfig = msgspec.field(default_factory=RedisConfig)
    ring: RingConfig = msgspec.field(default_factory=RingConfig)
    broker: BrokerConfig = msgspec.field(default_factory=BrokerConfig)
    worker: WorkerConfig = msgspec.field(default_factory=WorkerConfig)
    transfer: TransferConfig = msgspec.field(default_factory=TransferConfig)
    gateway: GatewayConfig = msgspec.field(default_factory=GatewayConfig)
    inputs: InputsConfig = msgspec.field(default_factory=InputsConfig)
    security: SecurityConfig = msgspec.field(default_factory=SecurityConfig)

    def stage(self, name: str) -> StageConfig:
        for stage in self.pipeline.stages:
            if stage.name == name:
                return stage
        raise ConfigError(f"no stage {name!r} in pipeline {self.pipeline.name!r}")

    def next_stage(self, name: str) -> StageConfig | None:
        names = [stage.name for stage in self.pipeline.stages]
        index = names.index(name)
        return self.pipeline.stages[index + 1] if index + 1 < len(names) else None


def load(path: str | Path | None = None, env: dict[str, str] | None = None) -> Config:
    """Read a TOML file (or defaults), apply `STAGEPOOL_*` overrides, validate."""
    env = os.environ if env is None else env
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read config {path}: {exc}") from None
    for section_name, section_type in _sections().items():
        for field in msgspec.structs.fields(section_type):
            key = f"{ENV_PREFIX}{section_name}_{field.name}".upper()
            if key in env:
                raw.setdefault(section_name, {})[field.name] = _parse_env(key, env[key])
    try:
        config = msgspec.convert(raw, Config, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"invalid config {path or '(defaults)'}: {exc}") from None
    _check(config)
    return config


def _sections() -> dict[str, type]:
    return {f.name: f.type for f in msgspec.structs.fields(Config) if f.name != "pipeline"}


def _parse_env(key: str, value: str) -> Any:
    # TOML's value grammar gives numbers, booleans and quoted strings; anything else is a string.
    try:
        return tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        return value


def _check(config: Config) -> None:
    names = [stage.name for stage in config.pipeline.stages]
    if not names:
        raise ConfigError("the pipeline has no stages")
    if len(set(names)) != len(names):
        raise ConfigError(f"duplicate stage names in {names}")
    gateway = config.gateway
    if gateway.host not in ("127.0.0.1", "localhost", "::1") and not gateway.token:
        raise ConfigError(f"gateway.host = {gateway.host!r} is reachable from other hosts: "
                          "set gateway.token (or STAGEPOOL_GATEWAY_TOKEN)")
    for stage in config.pipeline.stages:
        if (stage.max_attempts < 1 or stage.lease_ms < 100 or stage.time_limit_s <= 0
                or not 0 <= stage.retry_backoff_s <= stage.retry_backoff_max_s):
            raise ConfigError(f"stage {stage.name}: max_attempts >= 1, lease_ms >= 100, "
                              "time_limit_s > 0 and 0 <= retry_backoff_s <= retry_backoff_max_s")
        if any(not d or "," in d for d in stage.devices):
            raise ConfigError(f"stage {stage.name}: each of devices names one GPU, got "
                              f"{stage.devices}")
        if stage.devices and stage.options.get("device", "cuda") not in ("cuda", "auto"):
            raise ConfigError(f"stage {stage.name}: with devices, each worker sees one GPU as "
                              f"'cuda'; device = {stage.options['device']!r} would not be it")
        if not 1 <= stage.max_batch <= config.ring.cells:
            raise ConfigError(f"stage {stage.name}: max_batch must be 1..ring.cells "
                              f"({config.ring.cells}), got {stage.max_batch}")
