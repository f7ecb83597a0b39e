"""`stagepool up`: a local cluster in the foreground.

Lifecycle:
  1. lock the state dir (`up.lock`, flock): a second `up` on it exits at once, naming the pid
     of the one that runs;
  2. start (a) `redis-server` on a free loopback port with its data in the state dir, unless a
     URL is given; (b) the broker; (c) the HTTP gateway (on gateway.port; 0 picks a free one);
     (d) N workers per stage. Each runs in a session of its own: a terminal's Ctrl-C reaches
     `up` alone, which stops them in order;
  3. supervise: a child that dies is started again (with backoff), so a killed worker is
     replaced while the broker recovers its job; one that fails at start (an error exit
     within START_WINDOW_S) twice in a row stops the cluster, its last log lines printed;
     autoscaled stages gain workers and drain them by their queue (autoscale.py);
  4. stop (SIGINT or SIGTERM), in order: intake first (the gateway), then the workers drain
     their current job (after worker.drain_timeout_s a second signal stops a running stage at
     its next step, and its job is re-queued), then the broker, then Redis (a clean shutdown:
     its append-only file synced). A second Ctrl-C hurries each step, still in order.
`cluster.json` in the state dir tells other commands (and tests) where things are.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import redis

from ..common.config import AutoscaleConfig, Config
from ..common.errors import ConfigError
from .autoscale import Autoscaler, PoolScaler

log = logging.getLogger(__name__)

_RESTART_BACKOFF_S = 0.5
START_WINDOW_S = 20.0  # an error exit this soon after a start is a failure to start
_HURRY_S = 5.0  # how long each step of a hurried stop waits
_SERVER_STOP_S = 10.0
_LOG_LINES = 20
_EXIT_HUNG = 70  # stages/worker.py EXIT_HUNG: a worker that exits so on purpose


class StartFailed(ConfigError):
    """A supervised process failed at start twice in a row: the cluster stops."""


def lock_state_dir(state_dir: Path):
    """Hold `state_dir/up.lock` (flock) for this process's life; ConfigError naming the pid
    of the `up` that holds it."""
    import fcntl

    state_dir.mkdir(parents=True, exist_ok=True)
    handle = open(state_dir / "up.lock", "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "?"
        handle.close()
        raise ConfigError(f"another stagepool up (pid {holder}) runs in {state_dir}: stop it "
                          "first, or give this one another --state-dir") from None
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    return handle


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_redis(state_dir: Path, persist: bool = True, fsync: str = "everysec",
                port: int = 0) -> tuple[subprocess.Popen, str]:
    """A private redis-server on a loopback port (0: a free one); returns (process, url).
    `fsync` is its appendfsync: "everysec" may lose the last second's writes to a kill,
    "always" none. Started again on the same dir and port, it reloads its append-only file."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise ConfigError("redis-server not found: install it (Debian: redis-server) or pass --redis-url")
    port = port or free_port()
    data = (state_dir / "redis").resolve()  # redis-server chdirs to --dir: paths must be absolute
    data.mkdir(parents=True, exist_ok=True)
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data),
            "--save", "", "--appendonly", "yes" if persist else "no", "--appendfsync", fsync,
            "--logfile", str(data / "redis.log")]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)  # a terminal's Ctrl-C is not for it
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise ConfigError(f"redis-server did not start; see {data / 'redis.log'}")
            time.sleep(0.05)
    client.close()
    return process, url


def host_gpus() -> list[str]:
    """This host's GPUs as CUDA_VISIBLE_DEVICES entries (their UUIDs, from `nvidia-smi -L`),
    for a stage with `devices = ["all"]`; ConfigError when there are none."""
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True,
                                 timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        listing = ""
    uuids = [line.rsplit("UUID: ", 1)[1].rstrip(")") for line in listing.splitlines()
             if "UUID: " in line]
    if not uuids:
        raise ConfigError('devices = ["all"], but nvidia-smi lists no GPU on this host')
    return uuids


class Child:
    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_path: Path,
                 stage: str = ""):
        self.name = name
        self.argv = argv
        self.env = env
        self.log_path = log_path
        self.stage = stage  # a worker's; "" for the broker and the gateway
        self.retiring = False  # drained by the autoscaler: not restarted when it exits
        self.process: subprocess.Popen | None = None
        self.restarts = 0
        self.started_at = 0.0
        self.failed_starts = 0  # error exits within START_WINDOW_S, in a row

    def start(self) -> None:
        with open(self.log_path, "ab") as out:
            self.process = subprocess.Popen(self.argv, env=self.env, stdout=out,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        self.started_at = time.monotonic()

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def signal(self, signum: int) -> None:
        if self.alive():
            try:
                self.process.send_signal(signum)
            except ProcessLookupError:
                pass

    def last_lines(self, count: int = _LOG_LINES) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-count:])


class Cluster:
    def __init__(self, config: Config, config_path: str | None, state_dir: Path,
                 workers: dict[str, int], redis_url: str | None = None, persist: bool = True,
                 gateway: bool = True, autoscale: bool = False):
        """`autoscale`: every stage without an `autoscale` policy of its own gets the default
        (min its workers, max four times that)."""
        self.config = config
        self.config_path = config_path
        self.state_dir = state_dir
        self.workers = workers
        self.redis_url = redis_url
        self.persist = persist
        self.gateway = gateway
        self.redis_process: subprocess.Popen | None = None
        self.children: list[Child] = []
        policies = {s.name: s.autoscale or AutoscaleConfig(
                        min=workers.get(s.name, s.workers), max=4 * workers.get(s.name, s.workers))
                    for s in config.pipeline.stages if s.autoscale or autoscale}
        self.scaling = PoolScaler(self, Autoscaler(policies)) if policies else None
        self._worker_env: dict[str, str] = {}
        self._worker_index: dict[str, int] = {}
        self._stop = False
        self._hurry = False
        self._lock = None

    def start(self) -> dict:
        self._lock = lock_state_dir(self.state_dir)
        logs = self.state_dir / "logs"
        logs.mkdir(exist_ok=True)
        if self.redis_url is None:
            self.redis_process, self.redis_url = start_redis(self.state_dir, self.persist,
                                                             self.config.redis.appendfsync)
        endpoint = f"tcp://127.0.0.1:{free_port()}"
        env = dict(os.environ, STAGEPOOL_REDIS_URL=self.redis_url,
                   STAGEPOOL_BROKER_ENDPOINT=endpoint)
        base = [sys.executable, "-m", "stagepool.broker.cli"]
        config_args = ["--config", self.config_path] if self.config_path else []
        self.children.append(Child("broker", base + ["broker"] + config_args, env,
                                   logs / "broker.log"))
        gateway = None
        if self.gateway:
            gateway_port = self.config.gateway.port or free_port()
            gateway = f"http://{self.config.gateway.host}:{gateway_port}"
            self.children.append(Child("gateway", base + ["gateway", "--port", str(gateway_port)]
                                       + config_args, env, logs / "gateway.log"))
        self._worker_env = env
        self._devices = {s.name: host_gpus() if s.devices == ["all"] else s.devices
                         for s in self.config.pipeline.stages}
        for stage in self.config.pipeline.stages:
            count = self.workers.get(stage.name, stage.workers)
            if self.scaling and stage.name in self.scaling.policies:
                policy = self.scaling.policies[stage.name]
                count = max(policy.min, min(policy.max, count))
            for _ in range(count):
                self.add_worker(stage.name, start=False)
        for child in self.children:
            child.start()
        info = {
            "redis_url": self.redis_url, "broker": endpoint, "gateway": gateway,
            "namespace": self.config.redis.namespace, "pid": os.getpid(),
            "config": str(Path(self.config_path).resolve()) if self.config_path else None,
            "children": {c.name: c.process.pid for c in self.children},
        }
        self._write_info(info)
        return info

    def add_worker(self, stage: str, start: bool = True) -> Child:
        """One more worker for `stage`, named `<stage>-<i>`, on the stage's next GPU."""
        i = self._worker_index.get(stage, 0)
        self._worker_index[stage] = i + 1
        name = f"{stage}-{i}"
        argv = [sys.executable, "-m", "stagepool.broker.cli", "worker", "--stage", stage]
        argv += ["--config", self.config_path] if self.config_path else []
        devices = self._devices.get(stage)
        env = self._worker_env
        if devices:  # one GPU per worker, round robin over the stage's GPUs
            env = dict(env, CUDA_VISIBLE_DEVICES=devices[i % len(devices)])
        child = Child(name, argv, env, self.state_dir / "logs" / f"{name}.log", stage=stage)
        self.children.append(child)
        if start:
            child.start()
        return child

    def pool(self, stage: str) -> list[Child]:
        """The stage's workers that are not leaving."""
        return [c for c in self.children if c.stage == stage and not c.retiring]

    def _write_info(self, info: dict) -> None:
        info["children"] = {c.name: c.process.pid for c in self.children if c.process}
        tmp = self.state_dir / "cluster.json.tmp"
        tmp.write_text(json.dumps(info, indent=2))
        tmp.replace(self.state_dir / "cluster.json")

    def supervise(self, info: dict, until=None) -> None:
        """Restart dead children until stopped (or until `until()` returns True). StartFailed
        when one fails at start twice in a row."""
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        while not self._stop and not (until and until()):
            changed = self.scaling.tick(info) if self.scaling else False
            for child in list(self.children):
                if child.process.poll() is None:
                    continue
                if child.retiring:  # drained on purpose: gone, not restarted
                    log.info("%s drained and left (exit %s)", child.name,
                             child.process.returncode)
                    self.children.remove(child)
                    changed = True
                    continue
                code = child.process.returncode
                since = time.monotonic() - child.started_at
                if 0 < code != _EXIT_HUNG and since < START_WINDOW_S:
                    child.failed_starts += 1
                elif since >= START_WINDOW_S:
                    child.failed_starts = 0
                if child.failed_starts >= 2:
                    raise StartFailed(f"{child.name} failed at start twice (exit {code}); "
                                      f"the end of {child.log_path}:\n{child.last_lines()}")
                if since < _RESTART_BACKOFF_S * (1 + min(child.restarts, 10)):
                    continue
                log.warning("%s exited with %s; restarting", child.name, code)
                child.restarts += 1
                child.start()
                changed = True
            if changed:
                self._write_info(info)
            time.sleep(0.1)

    def _on_signal(self, *_) -> None:
        if self._stop:
            self._hurry = True  # a second Ctrl-C: each step of the stop waits less
        self._stop = True

    def stop(self) -> None:
        """In order: intake, workers (drained), broker, Redis. Installs the signal handlers
        itself, so a second signal during the stop hurries it."""
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        self._stop = True
        if self.scaling:
            self.scaling.close()
        by_name = {"gateway": [], "broker": [], "workers": []}
        for child in self.children:
            by_name[child.name if child.name in by_name else "workers"].append(child)
        self._stop_group("gateway", by_name["gateway"], _SERVER_STOP_S)
        self._stop_group("workers", by_name["workers"], self.config.worker.drain_timeout_s,
                         second_signal_s=self.config.worker.stop_grace_s)
        self._stop_group("broker", by_name["broker"], _SERVER_STOP_S)
        if self.redis_process is not None and self.redis_process.poll() is None:
            self.redis_process.terminate()  # redis-server syncs its append-only file first
            try:
                self.redis_process.wait(timeout=_SERVER_STOP_S)
            except subprocess.TimeoutExpired:
                self.redis_process.kill()
                self.redis_process.wait()
            log.info("stopped redis")
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def _stop_group(self, what: str, group: list[Child], timeout_s: float,
                    second_signal_s: float = 0.0) -> None:
        """SIGTERM each; after `timeout_s` (or at once when hurried) a second SIGTERM (a
        worker then stops its running stage at the next step) and `second_signal_s` more;
        then SIGKILL."""
        for child in group:
            child.signal(signal.SIGTERM)
        second = False
        deadline = time.monotonic() + timeout_s
        while any(child.alive() for child in group):
            now = time.monotonic()
            if self._hurry:
                deadline = min(deadline, now + _HURRY_S)
            if now >= deadline:
                if second or not second_signal_s:
                    break
                second = True
                for child in group:
                    child.signal(signal.SIGTERM)
                deadline = now + (min(second_signal_s, _HURRY_S) if self._hurry
                                  else second_signal_s)
            time.sleep(0.05)
        for child in group:
            if child.alive():
                log.warning("%s did not stop in time: killed", child.name)
                child.process.kill()
            if child.process is not None:
                child.process.wait()
        if group:
            log.info("stopped %s", what)
