"""`stagepool up`'s own lifecycle: one cluster per state dir, a child that cannot start stops
the cluster with its reason on the console, and Ctrl-C stops everything in order."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stagepool.common.client import BrokerClient
from stagepool.common.jobstore import JobStore

from .conftest import wait_ended

pytestmark = pytest.mark.cluster

UP = [sys.executable, "-m", "stagepool.broker.cli", "up"]
PIPELINE = """
[pipeline]
name = "noop"
[[pipeline.stages]]
name = "encode"
[[pipeline.stages]]
name = "denoise"
sleep_ms = {denoise_ms}
[[pipeline.stages]]
name = "decode"
[redis]
namespace = "up"
[gateway]
port = {gateway_port}
[worker]
heartbeat_ms = 200
"""


def _config(tmp_path: Path, denoise_ms: int = 0, gateway_port: int = 0) -> Path:
    path = tmp_path / "pipeline.toml"
    path.write_text(PIPELINE.format(denoise_ms=denoise_ms, gateway_port=gateway_port))
    return path


def _start(tmp_path: Path, config: Path, log_name: str = "up.log") -> subprocess.Popen:
    """`up` in a process group of its own, as a terminal runs it."""
    with open(tmp_path / log_name, "ab") as log:
        return subprocess.Popen([*UP, "--config", str(config), "--state-dir",
                                 str(tmp_path / "state")],
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _info(tmp_path: Path, up: subprocess.Popen, timeout_s: float = 60) -> dict:
    import json

    path = tmp_path / "state" / "cluster.json"
    deadline = time.monotonic() + timeout_s
    while True:
        if path.exists():
            info = json.loads(path.read_text())
            if info["pid"] == up.pid:
                return info
        assert up.poll() is None, (tmp_path / "up.log").read_text()
        assert time.monotonic() < deadline, "up did not start"
        time.sleep(0.05)


def _stop(up: subprocess.Popen) -> None:
    if up.poll() is None:
        os.killpg(up.pid, signal.SIGTERM)
        up.wait(90)


def test_a_second_up_on_the_same_state_dir_exits_naming_the_first(tmp_path):
    config = _config(tmp_path)
    first = _start(tmp_path, config)
    try:
        _info(tmp_path, first)
        second = subprocess.run([*UP, "--config", str(config), "--state-dir",
                                 str(tmp_path / "state")], capture_output=True, text=True,
                                timeout=60)
        assert second.returncode == 1
        assert f"another stagepool up (pid {first.pid})" in second.stderr, second.stderr
        assert first.poll() is None, "the first cluster was disturbed"
    finally:
        _stop(first)


def test_a_gateway_that_cannot_bind_stops_up_with_the_reason_on_the_console(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        up = subprocess.run([*UP, "--config", str(_config(tmp_path, gateway_port=port)),
                             "--state-dir", str(tmp_path / "state")], capture_output=True,
                            text=True, timeout=120)
    assert up.returncode == 1
    assert "gateway failed at start twice" in up.stderr, up.stderr
    assert "address already in use" in up.stderr.lower(), up.stderr
    relock = subprocess.run(["flock", "-n", str(tmp_path / "state" / "up.lock"), "true"])
    assert relock.returncode == 0, "up left its state dir locked"


def test_ctrl_c_to_the_whole_group_stops_in_order_and_the_job_in_flight_is_kept(tmp_path):
    """SIGINT to `up`'s process group (what a terminal's Ctrl-C sends) with a job denoising:
    the gateway stops first, the workers drain (the job's denoise finishes, and its worker logs
    the attempt's one line), then the broker, then Redis, which syncs its append-only file.
    The next `up` finishes the job without running denoise again."""
    config = _config(tmp_path, denoise_ms=3000)
    up = _start(tmp_path, config)
    info = _info(tmp_path, up)
    store = JobStore(info["redis_url"], "up")
    with BrokerClient(info["broker"], timeout_s=30) as client:
        client.submit({}, job_id="in-flight")
    deadline = time.monotonic() + 60
    while (store.get("in-flight") or {}).get("denoise.started") is None:
        assert time.monotonic() < deadline, "denoise never started"
        time.sleep(0.05)
    store.close()
    os.killpg(up.pid, signal.SIGINT)
    assert up.wait(90) == 0
    log = (tmp_path / "up.log").read_text()
    order = [log.find(f"stopped {what}") for what in ("gateway", "workers", "broker", "redis")]
    assert -1 not in order and order == sorted(order), log
    worker_log = (tmp_path / "state" / "logs" / "denoise-0.log").read_text()
    assert re.search(r"attempt job=in-flight stage=denoise attempt=1 worker=denoise-\S+ "
                     r"ran_ms=\d+ outcome=committed", worker_log), worker_log[-2000:]
    redis_log = (tmp_path / "state" / "redis" / "redis.log").read_text()
    assert "ready to exit" in redis_log.splitlines()[-1], redis_log[-500:]

    again = _start(tmp_path, config, "up-again.log")
    try:
        info = _info(tmp_path, again)
        store = JobStore(info["redis_url"], "up")
        assert wait_ended(store, ["in-flight"], 60) == ["succeeded"]
        record = store.get("in-flight")
        assert record["denoise.attempt"] == "1", "denoise ran again after the stop"
        store.close()
    finally:
        _stop(again)


BAD_STAGES = [
    ('kind = "denoize"', "pipeline.stages[1] (denoise).kind: unknown stage kind 'denoize'"),
    ('kind = "denoise"\noptions = { family = "tiny", model_pth = "/m" }',
     "pipeline.stages[1] (denoise).options: Object contains unknown field `model_pth`"),
    ('kind = "denoise"\noptions = { family = "tinny" }',
     "pipeline.stages[1] (denoise).options.family: unknown model family 'tinny'"),
    ('kind = "denoise"\noptions = { family = "wan2.1", model_path = "/nowhere" }',
     "pipeline.stages[1] (denoise).options.model_path: no Diffusers model at '/nowhere'"),
    ('kind = "denoise"\noptions = { threads = "two" }',
     "pipeline.stages[1] (denoise).options: Expected `int | null`, got `str` - at `$.threads`"),
]


@pytest.mark.parametrize("stage,error", BAD_STAGES)
def test_a_bad_stage_config_stops_up_and_check_before_anything_starts(tmp_path, stage, error):
    config = tmp_path / "bad.toml"
    config.write_text(_config(tmp_path).read_text().replace(
        'name = "denoise"\nsleep_ms = 0', f'name = "denoise"\n{stage}'))
    check = subprocess.run([sys.executable, "-m", "stagepool.broker.cli", "check", "--config",
                            str(config)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 1 and error in check.stderr, check.stderr
    up = subprocess.run([*UP, "--config", str(config), "--state-dir", str(tmp_path / "state")],
                        capture_output=True, text=True, timeout=60)
    assert up.returncode == 1 and error in up.stderr, up.stderr
    assert not (tmp_path / "state" / "cluster.json").exists(), "a process was started"


def test_check_passes_a_good_file_and_up_refuses_workers_for_a_stage_it_lacks(tmp_path):
    config = _config(tmp_path)
    ok = subprocess.run([sys.executable, "-m", "stagepool.broker.cli", "check", "--config",
                         str(config)], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and "ok: pipeline noop" in ok.stdout
    up = subprocess.run([*UP, "--config", str(config), "--state-dir", str(tmp_path / "state"),
                         "--workers", "denoize=4"], capture_output=True, text=True, timeout=60)
    assert up.returncode != 0 and "no stage 'denoize'" in up.stderr


def test_json_logs_reach_every_process_and_the_attempt_line_has_its_fields(tmp_path):
    import json

    config = _config(tmp_path)
    with open(tmp_path / "up.log", "ab") as log:
        up = subprocess.Popen([sys.executable, "-m", "stagepool.broker.cli", "--log-format",
                               "json", "up", "--config", str(config), "--state-dir",
                               str(tmp_path / "state")],
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        info = _info(tmp_path, up)
        with BrokerClient(info["broker"]) as client:
            client.submit({"prompt": "p"}, job_id="json-1")
            deadline = time.monotonic() + 30
            while client.status("json-1").state != "succeeded":
                assert time.monotonic() < deadline
                time.sleep(0.05)
        logs = tmp_path / "state" / "logs"
        lines = [json.loads(line) for name in ("broker.log", "encode-0.log", "decode-0.log")
                 for line in (logs / name).read_text().splitlines()]  # every line is JSON
        attempts = [r for r in lines if r["message"].startswith("attempt ")]
        assert {(r["job"], r["stage"], r["outcome"]) for r in attempts} == {
            ("json-1", "encode", "committed"), ("json-1", "decode", "committed")}
        assert all(r["level"] and r["pid"] and r["logger"] for r in lines)
    finally:
        _stop(up)
