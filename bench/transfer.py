"""Tensor-transfer bandwidth, side by side in one run.

    python bench/transfer.py --json [--quick]

For each size from 64 KiB to 256 MiB, a producer process holds one tensor in its pool and
the consumer (this process) moves it, four ways:
  memcpy            torch copy_ between two buffers in this process: the floor for one copy
  local             the same-host backend: map the producer's pool, verify, view in place
  mooncake_raw      the engine's own batch_transfer_sync_read into our registered pool
  mooncake          the Mooncake backend: the same read on the engine thread, plus checksum
                    verification and pool allocation (what a stage sees)
Repetitions alternate between the ways, so machine noise hits them alike. Prints GB/s
(median of the repetitions) and the ratios the targets are stated in.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import msgspec  # noqa: E402
import torch  # noqa: E402

from stagepool.common.config import TransferConfig  # noqa: E402
from stagepool.common.transfer import Exchange, PullStatus  # noqa: E402
from stagepool.common.transfer.base import Endpoint  # noqa: E402
from stagepool.common.dispatch import TensorDesc  # noqa: E402

SIZES = [64 << 10, 1 << 20, 4 << 20, 16 << 20, 64 << 20, 256 << 20]
QUICK_SIZES = [64 << 10, 1 << 20, 16 << 20, 64 << 20]


def produce(sizes: list[int]) -> None:
    """The producer process: hold one tensor per size, print where, wait for stdin to close."""
    exchange = Exchange(TransferConfig(backend="auto", pool_mb=(sum(sizes) >> 20) + 16))
    descs = exchange.put("bench/encode", {
        str(n): torch.randint(0, 256, (n,), dtype=torch.uint8) for n in sizes})
    print(json.dumps({"endpoint": exchange.endpoint, "descs": msgspec.to_builtins(descs)}),
          flush=True)
    sys.stdin.read()
    exchange.close()


def reps_for(nbytes: int, quick: bool) -> int:
    reps = 200 if nbytes <= 1 << 20 else 12 if nbytes <= 16 << 20 else 5
    return max(3, reps // 2) if quick else reps


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", action="store_true", help="print only the JSON")
    parser.add_argument("--quick", action="store_true", help="sizes up to 64 MiB, fewer reps")
    parser.add_argument("--producer", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.producer:
        produce(json.loads(args.producer))
        return
    sizes = QUICK_SIZES if args.quick else SIZES
    proc = subprocess.Popen([sys.executable, __file__, "--producer", json.dumps(sizes)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    info = json.loads(proc.stdout.readline())
    endpoint = info["endpoint"]
    descs = {d.name: d for d in msgspec.convert(info["descs"], list[TensorDesc])}
    consumer = Exchange(TransferConfig(backend="auto", pool_mb=(max(sizes) >> 20) * 2 + 16))
    session = Endpoint.decode(endpoint).session
    results = []
    try:
        for nbytes in sizes:
            desc = descs[str(nbytes)]
            src = torch.randint(0, 256, (nbytes,), dtype=torch.uint8)
            dst = torch.empty_like(src)
            landing = consumer.pool.alloc(nbytes)

            def memcpy():
                dst.copy_(src)

            def local():
                pull = consumer.local.pull(Endpoint.decode(endpoint), [desc])
                assert pull.poll() is PullStatus.DONE, pull.failure
                pull.close()

            def mooncake_raw():
                status = consumer.mooncake.read_raw(session, [consumer.pool.base + landing],
                                                    [desc.address], [nbytes])
                assert status >= 0, status

            def mooncake():
                pull = consumer.mooncake.pull(Endpoint.decode(endpoint), [desc])
                assert pull.wait(120) is PullStatus.DONE, pull.failure
                pull.close()

            ways = {"memcpy": memcpy, "local": local, "mooncake_raw": mooncake_raw,
                    "mooncake": mooncake}
            for fn in ways.values():
                fn()  # warm: page faults, connection set-up, mappings
            seconds = {name: [] for name in ways}
            for _ in range(reps_for(nbytes, args.quick)):
                for name, fn in ways.items():
                    start = time.perf_counter()
                    fn()
                    seconds[name].append(time.perf_counter() - start)
            consumer.pool.free(landing, nbytes)
            gbps = {name: round(nbytes / statistics.median(s) / 1e9, 3)
                    for name, s in seconds.items()}
            row = {"nbytes": nbytes, "gbps": gbps,
                   "mooncake_vs_raw": round(gbps["mooncake"] / gbps["mooncake_raw"], 3),
                   "local_vs_memcpy": round(gbps["local"] / gbps["memcpy"], 3)}
            results.append(row)
            if not args.json:
                print(json.dumps(row), file=sys.stderr)
    finally:
        proc.stdin.close()
        proc.wait(30)
        proc.stdout.close()
        consumer.close()
    at_16 = next((r for r in results if r["nbytes"] == 16 << 20), None)
    print(json.dumps({
        "bench": "transfer",
        "note": "GB/s, median of alternating repetitions; producer and consumer are separate "
                "processes on this host; Mooncake over its tcp transport",
        "results": results,
        "targets": {
            "mooncake_vs_raw_min": min(r["mooncake_vs_raw"] for r in results),
            "mooncake_vs_raw_target": 0.9,
            "local_vs_memcpy_at_16MiB": at_16 and at_16["local_vs_memcpy"],
            "local_vs_memcpy_target": 0.5,
        },
    }, indent=2))


if __name__ == "__main__":
    main()
