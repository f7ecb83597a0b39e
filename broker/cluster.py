"""`stagepool up`: a local cluster in the foreground.

Starts (1) `redis-server` on a free loopback port with its data in the state dir, unless a URL
is given; (2) the broker; (3) the HTTP gateway (on gateway.port; 0 picks a free one);
(4) N workers per stage, each its own process. It supervises them:
a child that dies is started again (with backoff), so a killed worker is replaced while the
broker recovers its job. SIGINT/SIGTERM stops everything, workers first (they drain).
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

from ..common.config import Config
from ..common.errors import ConfigError

log = logging.getLogger(__name__)

_RESTART_BACKOFF_S = 0.5


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
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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
    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_path: Path):
        self.name = name
        self.argv = argv
        self.env = env
        self.log_path = log_path
        self.process: subprocess.Popen | None = None
        self.restarts = 0
        self.started_at = 0.0

    def start(self) -> None:
        with open(self.log_path, "ab") as out:
            self.process = subprocess.Popen(self.argv, env=self.env, stdout=out,
                                            stderr=subprocess.STDOUT)
        self.started_at = time.monotonic()


class Cluster:
    def __init__(self, config: Config, config_path: str | None, state_dir: Path,
                 workers: dict[str, int], redis_url: str | None = None, persist: bool = True,
                 gateway: bool = True):
        self.config = config
        self.config_path = config_path
        self.state_dir = state_dir
        self.workers = workers
        self.redis_url = redis_url
        self.persist = persist
        self.gateway = gateway
        self.redis_process: subprocess.Popen | None = None
        self.children: list[Child] = []
        self._stop = False

    def start(self) -> dict:
        self.state_dir.mkdir(parents=True, exist_ok=True)
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
        for stage in self.config.pipeline.stages:
            devices = host_gpus() if stage.devices == ["all"] else stage.devices
            for i in range(self.workers.get(stage.name, stage.workers)):
                name = f"{stage.name}-{i}"
                argv = base + ["worker", "--stage", stage.name] + config_args
                placed = env
                if devices:  # one GPU per worker, round robin over the stage's GPUs
                    placed = dict(env, CUDA_VISIBLE_DEVICES=devices[i % len(devices)])
                self.children.append(Child(name, argv, placed, logs / f"{name}.log"))
        for child in self.children:
            child.start()
        info = {
            "redis_url": self.redis_url, "broker": endpoint, "gateway": gateway,
            "namespace": self.config.redis.namespace, "pid": os.getpid(),
            "children": {c.name: c.process.pid for c in self.children},
        }
        self._write_info(info)
        return info

    def _write_info(self, info: dict) -> None:
        info["children"] = {c.name: c.process.pid for c in self.children if c.process}
        tmp = self.state_dir / "cluster.json.tmp"
        tmp.write_text(json.dumps(info, indent=2))
        tmp.replace(self.state_dir / "cluster.json")

    def supervise(self, info: dict, until=None) -> None:
        """Restart dead children until stopped (or until `until()` returns True)."""
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        while not self._stop and not (until and until()):
            changed = False
            for child in self.children:
                if child.process.poll() is not None:
                    since = time.monotonic() - child.started_at
                    if since < _RESTART_BACKOFF_S * (1 + min(child.restarts, 10)):
                        continue
                    log.warning("%s exited with %s; restarting", child.name,
                                child.process.returncode)
                    child.restarts += 1
                    child.start()
                    changed = True
            if changed:
                self._write_info(info)
            time.sleep(0.1)

    def _on_signal(self, *_) -> None:
        self._stop = True

    def stop(self) -> None:
        servers = ("broker", "gateway")
        workers = [c for c in self.children if c.name not in servers]
        brokers = [c for c in self.children if c.name in servers]
        for group in (workers, brokers):
            for child in group:
                if child.process and child.process.poll() is None:
                    child.process.send_signal(signal.SIGTERM)
            for child in group:
                if child.process:
                    try:
                        child.process.wait(timeout=self.config.worker.drain_timeout_s)
                    except subprocess.TimeoutExpired:
                        child.process.kill()
                        child.process.wait()
        if self.redis_process is not None:
            self.redis_process.terminate()
            try:
                self.redis_process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.redis_process.kill()
