"""Redis URLs: a Sentinel URL finds the primary through a real sentinel (`redis-server
--sentinel`), and a bad one is refused with its form."""

from __future__ import annotations

import shutil
import subprocess
import time

import pytest

from stagepool.broker.cluster import free_port
from stagepool.common import transitions as tx
from stagepool.common.errors import ConfigError
from stagepool.common.jobstore import JobStore
from stagepool.common.redisurl import connect


def test_a_sentinel_url_reaches_the_primary_it_names(tmp_path, redis_server, namespace):
    port = free_port()
    conf = tmp_path / "sentinel.conf"
    conf.write_text(f"port {port}\nbind 127.0.0.1\ndir {tmp_path}\n"
                    f"sentinel monitor stagepool 127.0.0.1 {redis_server.port} 1\n")
    sentinel = subprocess.Popen([shutil.which("redis-server"), str(conf), "--sentinel"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        store = JobStore(f"redis+sentinel://127.0.0.1:{port}/stagepool/0", namespace)
        deadline = time.monotonic() + 10
        while True:  # the sentinel answers once it has started
            try:
                assert store.apply(tx.Submit("s1", "p", b"{}", "encode", b"d")).ok
                break
            except Exception:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        direct = JobStore(redis_server.url, namespace)
        assert direct.get("s1")["state"] == "queued:encode"  # the same primary
        direct.close()
        store.close()
    finally:
        sentinel.terminate()
        sentinel.wait(10)


@pytest.mark.parametrize("url", ["redis+sentinel://host:26379", "redis+sentinel:///svc",
                                 "redis+sentinel://host:port/svc", "redis+sentinel://h/svc/x"])
def test_a_bad_sentinel_url_is_refused_with_its_form(url):
    with pytest.raises(ConfigError, match="redis\\+sentinel://|bad sentinel address"):
        connect(url)
