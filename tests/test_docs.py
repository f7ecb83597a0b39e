"""The redis-cli example in docs/wire.md works as written against a real cluster."""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from stagepool.common.client import BrokerClient

pytestmark = pytest.mark.cluster

DOC = Path(__file__).resolve().parents[1] / "docs" / "wire.md"


def _example(name: str) -> str:
    match = re.search(rf"<!-- example: {name} -->\n```sh\n(.*?)```", DOC.read_text(), re.S)
    assert match, f"docs/wire.md lost its {name} example"
    return match.group(1)


def test_the_redis_cli_example_submits_a_job_that_succeeds(tmp_path, redis_server,
                                                            cluster_factory, monkeypatch):
    import tests.conftest as conftest

    # The doc uses the default namespace: run this cluster under it.
    cluster = conftest.Cluster(tmp_path, redis_server.url, "stagepool", workers=1)
    try:
        with BrokerClient(cluster.broker) as client:
            cluster.wait_ready(client, 1)
            lines = _example("redis-cli").strip().splitlines()
            env = dict(os.environ, PORT=str(redis_server.port))
            subprocess.run(["sh", "-c", lines[0]], env=env, check=True, capture_output=True)
            deadline = time.monotonic() + 30
            while True:
                out = subprocess.run(["sh", "-c", lines[1]], env=env, check=True,
                                     capture_output=True).stdout.strip()
                if out == b"succeeded":
                    break
                assert time.monotonic() < deadline, out
                time.sleep(0.1)
            assert client.status("doc-1").params == {"prompt": "a red fox"}
    finally:
        cluster.stop()
