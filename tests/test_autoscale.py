"""The local autoscaler: the policy alone, then `stagepool up` scaling a slow stage's pool on a
burst and draining it back, with nothing lost or run twice."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from stagepool.broker.autoscale import Autoscaler
from stagepool.common.client import BrokerClient
from stagepool.common.config import AutoscaleConfig
from stagepool.common.jobstore import JobStore


def test_the_policy_scales_up_at_once_and_down_one_at_a_time_after_the_cooldown():
    scaler = Autoscaler({"denoise": AutoscaleConfig(min=1, max=3, target_depth=2,
                                                    cooldown_s=10)})
    assert scaler.decide("denoise", 1, waiting=0, in_flight=1, now=0) is None
    up = scaler.decide("denoise", 1, waiting=9, in_flight=1, now=1)
    assert (up.desired, up.direction) == (3, "up")  # ceil(10 / 2) = 5, capped at max
    assert scaler.decide("denoise", 3, waiting=3, in_flight=3, now=2) is None  # 3 wanted
    # The queue empties; held jobs count, so a pool busy with them keeps its size.
    assert scaler.decide("denoise", 3, waiting=0, in_flight=5, now=3) is None
    assert scaler.decide("denoise", 3, waiting=0, in_flight=1, now=4) is None  # cooling
    assert scaler.decide("denoise", 3, waiting=0, in_flight=1, now=13) is None
    down = scaler.decide("denoise", 3, waiting=0, in_flight=1, now=14)
    assert (down.desired, down.direction) == (2, "down")
    assert scaler.decide("denoise", 2, waiting=0, in_flight=0, now=20) is None  # a full wait
    assert scaler.decide("denoise", 2, waiting=0, in_flight=0, now=24).desired == 1
    assert scaler.decide("denoise", 1, waiting=0, in_flight=0, now=99) is None  # min
    # A new burst in the middle of a cooldown goes up at once and resets it.
    assert scaler.decide("denoise", 1, waiting=2, in_flight=1, now=100).desired == 2


def test_a_min_above_max_is_refused_at_load(tmp_path):
    from stagepool.common import config
    from stagepool.common.errors import ConfigError

    path = tmp_path / "p.toml"
    path.write_text('[[pipeline.stages]]\nname = "a"\nautoscale = {min = 3, max = 2}\n')
    with pytest.raises(ConfigError, match="min .3. > max .2."):
        config.load(path)


PIPELINE = """
[pipeline]
name = "noop"
[[pipeline.stages]]
name = "encode"
max_batch = 8
[[pipeline.stages]]
name = "denoise"
sleep_ms = 300
lease_ms = 5000
autoscale = {{ min = 1, max = 3, target_depth = 2, cooldown_s = 2 }}
[[pipeline.stages]]
name = "decode"
max_batch = 8
[redis]
namespace = "scale"
[gateway]
port = 0
[worker]
heartbeat_ms = 200
drain_timeout_s = 20
"""


def _workers(client: BrokerClient) -> dict[str, int]:
    return {q.stage: q.workers for q in client.queues().queues}


@pytest.mark.cluster
def test_up_scales_the_slow_stage_on_a_burst_and_drains_it_back(tmp_path):
    config = tmp_path / "pipeline.toml"
    config.write_text(PIPELINE.format())
    state = tmp_path / "state"
    log_path = tmp_path / "up.log"
    with open(log_path, "ab") as log:
        up = subprocess.Popen([sys.executable, "-m", "stagepool.broker.cli", "up", "--config",
                               str(config), "--state-dir", str(state)],
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not (state / "cluster.json").exists():
            assert up.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline
            time.sleep(0.1)
        info = json.loads((state / "cluster.json").read_text())
        store = JobStore(info["redis_url"], "scale")
        with BrokerClient(info["broker"]) as client:
            while _workers(client) != {"encode": 1, "denoise": 1, "decode": 1}:
                assert time.monotonic() < deadline, _workers(client)
                time.sleep(0.1)
            ids = [client.submit({"prompt": f"p{i}"}, job_id=f"burst-{i}").job_id
                   for i in range(40)]
            peak = {"encode": 1, "denoise": 1, "decode": 1}
            deadline = time.monotonic() + 120
            while any(state_ not in ("succeeded",) for state_ in store.states(ids)):
                workers = _workers(client)
                peak = {s: max(peak[s], workers[s]) for s in peak}
                assert time.monotonic() < deadline, store.states(ids)
                time.sleep(0.1)
            assert peak == {"encode": 1, "denoise": 3, "decode": 1}  # only the slow one grew
            deadline = time.monotonic() + 60
            while _workers(client)["denoise"] != 1:  # drained back, one per cooldown
                assert time.monotonic() < deadline, _workers(client)
                time.sleep(0.2)
            time.sleep(3)  # stays at min (a worker leaving is not restarted)
            assert _workers(client) == {"encode": 1, "denoise": 1, "decode": 1}
        # Nothing failed or ran twice: one commit each, no stage retried or run again.
        for job_id in ids:
            record = store.get(job_id)
            assert record["commits"] == "1" and record["denoise.attempt"] == "1", record
            assert record["denoise.retries"] == "0", record
        text = log_path.read_text()
        assert "autoscale denoise: 1 -> 3 workers" in text
        assert "autoscale denoise: 2 -> 1 workers" in text
        metrics = httpx.get(info["gateway"] + "/metrics", timeout=10).text
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for family in text_string_to_metric_families(metrics)
                   for s in family.samples}
        assert samples[("stagepool_autoscale_workers", (("stage", "denoise"),))] == 1
        assert samples[("stagepool_autoscale_decisions_total",
                        (("direction", "up"), ("stage", "denoise")))] >= 1
        assert samples[("stagepool_autoscale_decisions_total",
                        (("direction", "down"), ("stage", "denoise")))] >= 2
        store.close()
    finally:
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGTERM)
            up.wait(90)
    assert Path(log_path).exists()
