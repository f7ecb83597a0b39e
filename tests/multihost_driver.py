"""The multi-host tests' client, run on a simulated host (tests/netns.py): it submits jobs
through the broker and reports on them from Redis, printing JSON.

    python -m tests.multihost_driver submit BROKER PREFIX COUNT PARAMS_JSON
    python -m tests.multihost_driver wait REDIS_URL NAMESPACE IDS_JSON TIMEOUT_S
    python -m tests.multihost_driver states REDIS_URL NAMESPACE IDS_JSON
"""

from __future__ import annotations

import json
import sys
import time

from stagepool.common.client import BrokerClient
from stagepool.common.jobstore import JobStore


def submit(broker: str, prefix: str, count: int, params: dict) -> list[str]:
    with BrokerClient(broker, timeout_s=30) as client:
        return [client.submit(dict(params), job_id=f"{prefix}-{i}").job_id
                for i in range(count)]


def report(store: JobStore, ids: list[str]) -> dict:
    """Each job's state, the attempts of each stage, and how many times it succeeded."""
    succeeded: dict[str, int] = {}
    last = "-"
    while True:
        chunk = store.redis.xrange(store.keys.events, min=last, count=5000)
        fresh = [entry for entry in chunk if entry[0].decode() != last]
        if not fresh:
            break
        for _, fields in fresh:
            if fields[b"event"] == b"succeeded":
                job = fields[b"job"].decode()
                succeeded[job] = succeeded.get(job, 0) + 1
        last = fresh[-1][0].decode()
    jobs = {}
    for job_id in ids:
        record = store.get(job_id) or {}
        jobs[job_id] = {
            "state": record.get("state"),
            "attempts": {k.split(".")[0]: int(v) for k, v in record.items()
                         if k.endswith(".attempt")},
            "workers": {k.split(".")[0]: v for k, v in record.items() if k.endswith(".worker")},
            "done": sorted(k.split(".")[0] for k in record if k.endswith(".done")),
            "succeeded": succeeded.get(job_id, 0),
        }
    return jobs


def main(argv: list[str]) -> None:
    command = argv[0]
    if command == "submit":
        broker, prefix, count, params = argv[1:5]
        print(json.dumps(submit(broker, prefix, int(count), json.loads(params))))
        return
    url, namespace, ids = argv[1], argv[2], json.loads(argv[3])
    store = JobStore(url, namespace)
    try:
        if command == "wait":
            from stagepool.common.wire import TERMINAL_STATES

            deadline = time.monotonic() + float(argv[4])
            while time.monotonic() < deadline:
                if all(state in TERMINAL_STATES for state in store.states(ids)):
                    break
                time.sleep(0.2)
        print(json.dumps(report(store, ids)))
    finally:
        store.close()


if __name__ == "__main__":
    main(sys.argv[1:])
