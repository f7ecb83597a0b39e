"""Four hosts for real: Redis and the broker on A, encode on B, denoise on C, and on D decode
with a second encode and denoise worker. Each host is a network namespace with its own PID,
UTS and mount namespace and a private /dev/shm (tests/netns.py), so every hop between stages
crosses hosts: tcp rings to the broker, Mooncake between workers. The only address set by
hand is the broker's; Redis is offered on loopback (with an ACL user) and the tcp ring on a
wildcard bind, and the workers find their own advertised addresses. Every bind is beyond
loopback, so every surface runs with the deployment's keys (CURVE, the ring's MAC).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import pytest

from stagepool.common.security import ENV_KEYS_DIR, generate

from .netns import Network, usable

REASON = usable()
pytestmark = [pytest.mark.cluster, pytest.mark.skipif(bool(REASON), reason=REASON or "-")]

BROKER = "tcp://10.77.0.1:5555"
REDIS_PASSWORD = "multi-host-secret"
REDIS_URL = f"redis://stagepool:{REDIS_PASSWORD}@127.0.0.1:6379/0"  # as host A sees it
NAMESPACE = "mh"
LEASE_MS = 2000
WORKER_TIMEOUT_MS = 2000

CONFIG = """
[pipeline]
name = "tiny"
{stages}
[redis]
url = "{redis_url}"
namespace = "{namespace}"

[ring]
tcp_bind = "tcp://0.0.0.0:5556"
claim_grace_ms = 1000
publish_grace_ms = 1000

[broker]
endpoint = "{broker}"
reaper_interval_ms = 100
worker_timeout_ms = {worker_timeout_ms}

[worker]
heartbeat_ms = 300
claim_wait_s = 0.2

[security]
keys_dir = "{keys_dir}"

[transfer]
backend = "auto"
timeout_s = 2.0
retries = 1
backoff_s = 0.2
pull_timeout_s = 30.0
"""

STAGE = """
[[pipeline.stages]]
name = "{name}"
state = "{state}"
kind = "{name}"
lease_ms = {lease_ms}
max_attempts = 8
retry_backoff_s = 0.1
options = {{ family = "tiny", model_path = "{models}", device = "cpu", threads = 1, results_dir = "{results}" }}
"""

PLACEMENT = {"b": ["encode"], "c": ["denoise"], "d": ["decode", "encode", "denoise"]}


class MultiHost:
    def __init__(self, tmp: Path, models: Path):
        self.tmp = tmp
        stages = "".join(STAGE.format(name=name, state=state, lease_ms=LEASE_MS, models=models,
                                      results=tmp / "results")
                         for name, state in [("encode", "encoding"), ("denoise", "denoising"),
                                             ("decode", "decoding")])
        keys_dir = tmp / "keys"  # every bind here is beyond loopback: CURVE and the ring MAC
        generate(keys_dir)
        self.config = tmp / "pipeline.toml"
        self.config.write_text(CONFIG.format(
            stages=stages, redis_url=REDIS_URL, namespace=NAMESPACE, broker=BROKER,
            worker_timeout_ms=WORKER_TIMEOUT_MS, keys_dir=keys_dir))
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("STAGEPOOL_")}
        self.env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
        self.env[ENV_KEYS_DIR] = str(keys_dir)  # the driver's and the CLI's client keys
        self.net = Network(f"sp{os.getpid() % 100000}", ["a", "b", "c", "d"])
        try:
            self._start()
        except BaseException:
            self.close()
            raise

    def _start(self) -> None:
        a = self.net["a"]
        acl = self.tmp / "users.acl"
        acl.write_text(f"user default off\nuser stagepool on >{REDIS_PASSWORD} ~* &* +@all\n")
        a.spawn([shutil.which("redis-server"), "--bind", "127.0.0.1 10.77.0.1",
                 "--port", "6379", "--save", "", "--appendonly", "no", "--aclfile", str(acl)],
                self.env, self.tmp / "redis.log")
        cli = [sys.executable, "-m", "stagepool.broker.cli"]
        a.spawn([*cli, "broker", "--config", str(self.config)], self.env,
                self.tmp / "broker.log")
        for host, stages in PLACEMENT.items():
            for stage in stages:
                self.net[host].spawn([*cli, "worker", "--stage", stage, "--config",
                                      str(self.config)], self.env,
                                     self.tmp / f"{stage}-{host}.log")
        deadline = time.monotonic() + 180
        while True:
            try:
                queues = json.loads(self.net["a"].run(
                    [*cli, "queues", "--broker", BROKER, "--json"], self.env, 30))
            except RuntimeError:
                queues = None
            if queues and all(q.get("workers", 0) >= 2 - (q["stage"] == "decode")
                              for q in queues["queues"]):
                return
            exited = [p.args[-3:] for h in self.net.hosts.values() for p in h.processes
                      if p.poll() is not None]
            assert not exited and time.monotonic() < deadline, \
                f"workers never registered ({queues}; exited: {exited}){self.logs()}"
            time.sleep(1)

    def driver(self, *args: str, timeout_s: float = 60) -> object:
        out = self.net["a"].run([sys.executable, "-m", "tests.multihost_driver", *args],
                                self.env, timeout_s)
        return json.loads(out)

    def submit(self, prefix: str, count: int, params: dict) -> list[str]:
        return self.driver("submit", BROKER, prefix, str(count), json.dumps(params))

    def wait(self, ids: list[str], timeout_s: float) -> dict:
        return self.driver("wait", REDIS_URL, NAMESPACE, json.dumps(ids), str(timeout_s),
                           timeout_s=timeout_s + 60)

    def report(self, ids: list[str]) -> dict:
        return self.driver("states", REDIS_URL, NAMESPACE, json.dumps(ids))

    def logs(self) -> str:
        return "".join(f"\n--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
                       for p in sorted(self.tmp.glob("*.log")))

    def close(self) -> None:
        self.net.close()


@pytest.fixture(scope="module")
def hosts(tmp_path_factory, tiny_models):
    cluster = MultiHost(tmp_path_factory.mktemp("multihost"), tiny_models["tiny"])
    yield cluster
    cluster.close()


def _assert_all_succeeded_once(hosts: MultiHost, jobs: dict) -> None:
    bad = {j: r for j, r in jobs.items() if r["state"] != "succeeded" or r["succeeded"] != 1}
    assert not bad, f"{bad}{hosts.logs()}"


def test_twenty_jobs_cross_every_host_with_only_the_brokers_address_set(hosts):
    ids = hosts.submit("plain", 20, {"prompt": "a lighthouse", "seed": 1})
    jobs = hosts.wait(ids, timeout_s=180)
    _assert_all_succeeded_once(hosts, jobs)
    placed = {host for job in jobs.values() for host in
              (w.split("-")[2] for w in job["workers"].values())}
    assert "d" in placed and placed & {"b", "c"}, placed
    worker_log = (hosts.tmp / "denoise-c.log").read_text()
    assert "advertising 10.77.0.3" in worker_log, "the worker did not find its own address"


def test_a_partition_of_the_denoise_host_longer_than_its_lease_loses_and_repeats_nothing(hosts):
    ids = hosts.submit("part", 6, {"prompt": "a storm", "seed": 2, "infer_steps": 200})
    deadline = time.monotonic() + 120
    while True:  # until host c runs one of them
        jobs = hosts.report(ids)
        running = [j for j, r in jobs.items() if "denoise" not in r["done"]
                   and "host-c" in r["workers"].get("denoise", "")]
        if running:
            break
        assert time.monotonic() < deadline, f"host c never ran a job: {jobs}{hosts.logs()}"
        time.sleep(0.2)
    hosts.net["c"].partition()
    time.sleep((LEASE_MS + WORKER_TIMEOUT_MS) / 1000 + 2)  # the broker must give up on c
    hosts.net["c"].heal()
    jobs = hosts.wait(ids, timeout_s=240)
    _assert_all_succeeded_once(hosts, jobs)
    assert jobs[running[0]]["attempts"]["denoise"] >= 2, \
        f"the partitioned attempt was not superseded: {jobs[running[0]]}"
    after = hosts.submit("healed", 4, {"prompt": "after", "seed": 3})
    _assert_all_succeeded_once(hosts, hosts.wait(after, timeout_s=120))


def test_a_dead_encode_host_sends_its_jobs_back_and_they_succeed_in_bounded_time(hosts):
    # Enough jobs that, with encode workers on b and d and two denoise workers, at least
    # three wait with their embeddings on b (ten were too few on a loaded CI machine).
    ids = hosts.submit("dead", 16, {"prompt": "a forest", "seed": 4, "infer_steps": 200})
    deadline = time.monotonic() + 120
    while True:  # until jobs wait for denoise with their embeddings held on b
        jobs = hosts.report(ids)
        stranded = [j for j, r in jobs.items() if r["done"] == ["encode"]
                    and "host-b" in r["workers"]["encode"]
                    and "denoise" not in r["workers"]]
        if len(stranded) >= 3:  # more than the two denoise workers can pull at once
            break
        assert time.monotonic() < deadline, f"nothing waited on b: {jobs}{hosts.logs()}"
        time.sleep(0.1)
    hosts.net["b"].partition()  # silent: its address no longer answers at all
    hosts.net["b"].kill()
    killed_at = time.monotonic()
    jobs = hosts.wait(ids, timeout_s=240)
    recovery_s = time.monotonic() - killed_at
    _assert_all_succeeded_once(hosts, jobs)
    rewound = [j for j in stranded if jobs[j]["attempts"]["encode"] >= 2]
    assert rewound == stranded, f"jobs held on b were not encoded again: {jobs}"
    logs = "".join(p.read_text(errors="replace") for p in hosts.tmp.glob("denoise-*.log"))
    waited = sum("Mooncake read from 10.77.0.2" in line and "failed (status" in line
                 for line in logs.splitlines())
    at_once = sum("pulling inputs failed" in line and "counted as dead" in line
                  for line in logs.splitlines())  # one per pull (its attempt line says it too)
    print(f"\nmulti-host: {len(stranded)} jobs held on the dead encode host; pulls from it: "
          f"{waited} tries waited out the transfer timeout, {at_once} failed at once (dead "
          f"peer); all {len(ids)} jobs done {recovery_s:.1f} s after the kill")
    assert at_once >= 1, "every pull from the dead host waited out its timeout"
    assert recovery_s < 120
