"""Submit-to-done latency through each way in, side by side in one run.

    python bench/gateway.py --json [--count 300]

Starts a local cluster (`configs/noop.toml`, one worker per stage, its own redis-server), then
submits `count` jobs one at a time through each entry point and waits for each to succeed:
  zmq      BrokerClient.submit, then polls the broker's status
  http     POST /v1/jobs, then polls GET /v1/jobs/{id}          (the gateway)
  ingress  XADD {ns}:ingress, then polls the Redis record        (any language)
Prints JSON with p50/p99 in milliseconds of submit alone and of submit-to-succeeded, and the
ratios of each against zmq. Timings are wall clock on a shared machine: compare the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import msgspec  # noqa: E402
import redis  # noqa: E402

from stagepool.broker.cluster import Cluster  # noqa: E402
from stagepool.common import config as config_mod  # noqa: E402
from stagepool.common.client import BrokerClient  # noqa: E402

POLL_S = 0.0005


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _summary(submit_s: list[float], done_s: list[float]) -> dict:
    return {"submit_p50_ms": round(statistics.median(submit_s) * 1e3, 3),
            "submit_p99_ms": round(_pct(submit_s, 0.99) * 1e3, 3),
            "done_p50_ms": round(statistics.median(done_s) * 1e3, 3),
            "done_p99_ms": round(_pct(done_s, 0.99) * 1e3, 3)}


def run(count: int) -> dict:
    state = Path(tempfile.mkdtemp(prefix="stagepool-bench-gw-"))
    config = config_mod.load(ROOT / "configs" / "noop.toml")
    config = msgspec.structs.replace(
        config, gateway=msgspec.structs.replace(config.gateway, port=0),
        pipeline=msgspec.structs.replace(config.pipeline, stages=[
            msgspec.structs.replace(s, workers=1) for s in config.pipeline.stages]))
    cluster = Cluster(config, str(ROOT / "configs" / "noop.toml"), state, {}, persist=False)
    info = cluster.start()
    try:
        zmq_client = BrokerClient(info["broker"])
        http = httpx.Client(base_url=info["gateway"], timeout=10)
        store = redis.Redis.from_url(info["redis_url"])
        ns = "{" + info["namespace"] + "}:"
        deadline = time.monotonic() + 60
        while True:  # every stage has its worker and the gateway answers
            try:
                queues = http.get("/v1/queues").json()
                if all(q["workers"] for q in queues["stages"]):
                    break
            except (httpx.HTTPError, KeyError, TypeError):
                pass
            if time.monotonic() > deadline:
                raise SystemExit("cluster did not come up; see " + str(state / "logs"))
            time.sleep(0.1)

        def via_zmq():
            job_id = zmq_client.submit({}).job_id
            t = time.perf_counter()
            return job_id, t, lambda: zmq_client.status(job_id).state

        def via_http():
            job_id = http.post("/v1/jobs", json={"params": {}}).json()["job_id"]
            t = time.perf_counter()
            return job_id, t, lambda: http.get(f"/v1/jobs/{job_id}").json().get("state")

        def via_ingress():
            job_id = uuid.uuid4().hex
            store.xadd(ns + "ingress", {"job": json.dumps({"job_id": job_id, "params": {}})})
            t = time.perf_counter()

            def state():
                value = store.hget(f"{ns}job:{job_id}", "state")
                return value.decode() if value else None
            return job_id, t, state

        results = {}
        for name, submit in (("zmq", via_zmq), ("http", via_http), ("ingress", via_ingress)):
            for _ in range(min(20, count)):  # warm up
                _, _, state = submit()
                while state() != "succeeded":
                    time.sleep(POLL_S)
            submit_s, done_s = [], []
            for _ in range(count):
                start = time.perf_counter()
                _, submitted, state = submit()
                submit_s.append(submitted - start)
                while state() != "succeeded":
                    time.sleep(POLL_S)
                done_s.append(time.perf_counter() - start)
            results[name] = _summary(submit_s, done_s)
        base = results["zmq"]
        for name, row in results.items():
            row["submit_p50_vs_zmq"] = round(row["submit_p50_ms"] / base["submit_p50_ms"], 2)
            row["done_p50_vs_zmq"] = round(row["done_p50_ms"] / base["done_p50_ms"], 2)
        zmq_client.close()
        http.close()
        return {"count": count, "pipeline": "noop, 3 stages, 1 worker each",
                "cpus": os.cpu_count(), "results": results}
    finally:
        cluster.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=300)
    parser.add_argument("--json", action="store_true", help="print JSON only")
    args = parser.parse_args()
    report = run(args.count)
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"{'entry':<9}{'submit p50':>12}{'p99':>9}{'done p50':>11}{'p99':>9}{'vs zmq':>8}")
    for name, r in report["results"].items():
        print(f"{name:<9}{r['submit_p50_ms']:>10.3f}ms{r['submit_p99_ms']:>7.3f}ms"
              f"{r['done_p50_ms']:>9.3f}ms{r['done_p99_ms']:>7.3f}ms{r['done_p50_vs_zmq']:>8}")


if __name__ == "__main__":
    main()
