"""stagepool against monolithic diffusers on GPUs: the same Wan2.1 jobs, side by side.

    python3 bench/gpu.py one --models DIR [--frames 33,81] [--steps 20] [--repeat 2]
    python3 bench/gpu.py two --models DIR [--frames 81] [--steps 20] [--jobs 8]
    python3 bench/gpu.py one --models DIR --device cpu --height 32 --width 32 ...  (smoke)

DIR is a Wan2.1 Diffusers directory; one that does not exist is built first with random
weights at the real Wan2.1-T2V-1.3B shapes (`stagepool models init-random`).

one  On GPU 0, per frame count: the monolithic pipeline (diffusers' WanPipeline, text
     encoder and transformer in bfloat16, VAE in float32, in one process) plus the MP4 write
     the decode stage does (stages.model.write_frames), then the same jobs through a stagepool
     cluster (one encode, one denoise, one decode worker on GPU 0). Each side warms up on a
     2-step job of the same shape, then runs `--repeat` jobs one at a time. Reports end to
     end, per-stage and hand-off times, and each process's peak GPU memory.
two  `--jobs` jobs at once on GPUs 0 and 1: data-parallel monolithic (one pipeline process per
     GPU, half the jobs each) against stagepool (a denoise and a decode worker per GPU, the
     encode worker on GPU 0). Reports jobs per minute and each process's peak GPU memory.

Peak memory is torch's peak reserved memory (the allocator's pool; what the process keeps
from other processes) as each process reports it; the CUDA context adds about 0.5 GiB to each.
Prints JSON; `--out FILE` writes it too.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a lighthouse on a cliff at dawn, waves breaking below, cinematic"


def job_params(args, frames: int, seed: int, steps: int | None = None) -> dict:
    params = {"prompt": PROMPT, "num_frames": frames, "seed": seed,
              "infer_steps": steps or args.steps}
    if args.height:
        params.update(height=args.height, width=args.width)
    return params


# --- the monolithic side: one process, the whole pipeline ------------------------------------

def mono_main(spec: dict) -> None:
    """A child process: load WanPipeline on the device, run the warm-up jobs, print "ready",
    wait for "go" on stdin, run the jobs; one JSON line per job, then the peak memory."""
    import torch
    from diffusers import AutoencoderKLWan, WanPipeline

    from stagepool.stages.families.wan import WanFamily
    from stagepool.stages.model import write_frames

    device = torch.device(spec["device"])
    dtype = getattr(torch, spec["dtype"])
    vae = AutoencoderKLWan.from_pretrained(spec["models"], subfolder="vae", dtype=torch.float32)
    pipe = WanPipeline.from_pretrained(spec["models"], vae=vae, dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    family = WanFamily.__new__(WanFamily)  # for its defaults only: the same params as a stage
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    spans: dict[str, float] = {}

    def timed(name, fn):
        def wrapper(*a, **kw):
            sync()
            started = time.perf_counter()
            out = fn(*a, **kw)
            sync()
            spans[name] = spans.get(name, 0.0) + time.perf_counter() - started
            return out
        return wrapper

    pipe.encode_prompt = timed("encode", pipe.encode_prompt)
    pipe.vae.decode = timed("vae", pipe.vae.decode)
    out_dir = Path(spec["out_dir"])

    def run(params: dict, name: str) -> dict:
        p = family.params(params)
        spans.clear()
        sync()
        started = time.perf_counter()
        frames = pipe(prompt=p["prompt"], negative_prompt=p["negative_prompt"],
                      height=p["height"], width=p["width"], num_frames=p["num_frames"],
                      num_inference_steps=int(p["infer_steps"]),
                      guidance_scale=p["guidance_scale"],
                      max_sequence_length=p["max_sequence_length"],
                      generator=torch.Generator("cpu").manual_seed(int(p["seed"])),
                      output_type="np").frames[0]
        pipe_s = time.perf_counter() - started
        write_frames(frames, out_dir / name, fps=16)
        total_s = time.perf_counter() - started
        return {"job": name, "total_s": total_s, "encode_s": spans["encode"],
                "vae_s": spans["vae"], "write_s": total_s - pipe_s,
                "denoise_s": pipe_s - spans["encode"] - spans["vae"], "frames": len(frames)}

    for i, params in enumerate(spec["warmup"]):
        run(params, f"warmup-{os.getpid()}-{i}")
    print(json.dumps({"ready": True}), flush=True)
    if spec.get("barrier"):
        sys.stdin.readline()
    for i, params in enumerate(spec["jobs"]):
        print(json.dumps(run(params, f"mono-{os.getpid()}-{i}")), flush=True)
    print(json.dumps({"peak_reserved_mib": _peak_mib(torch, device)}), flush=True)


def _peak_mib(torch, device) -> float:
    return torch.cuda.max_memory_reserved() / 2**20 if device.type == "cuda" else 0.0


class Mono:
    """A monolithic child process on one GPU."""

    def __init__(self, args, gpu: str | None, warmup: list, jobs: list, barrier: bool):
        spec = {"device": args.device, "dtype": args.dtype, "models": str(args.models),
                "out_dir": str(args.work / "mono"), "warmup": warmup, "jobs": jobs,
                "barrier": barrier}
        env = dict(os.environ)
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpu
        self.process = subprocess.Popen(
            [sys.executable, __file__, "_mono", json.dumps(spec)], env=env,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.jobs: list[dict] = []
        self.peak_mib = 0.0

    def wait_ready(self) -> None:
        line = self.process.stdout.readline()
        if not line:
            raise SystemExit(f"monolithic process exited ({self.process.wait()})")

    def go(self) -> None:
        self.process.stdin.write("go\n")
        self.process.stdin.flush()

    def finish(self) -> None:
        for line in self.process.stdout:
            record = json.loads(line)
            if "peak_reserved_mib" in record:
                self.peak_mib = record["peak_reserved_mib"]
            else:
                record["ended"] = time.perf_counter()
                self.jobs.append(record)
        if self.process.wait() != 0:
            raise SystemExit(f"monolithic process failed ({self.process.returncode})")


# --- the stagepool side: a real cluster ------------------------------------------------------

CONFIG = """
[pipeline]
name = "bench-gpu"
{stages}
[redis]
namespace = "bench-gpu"

[broker]
endpoint = "tcp://127.0.0.1:{port}"

[transfer]
pool_mb = 2048
"""

STAGE = """
[[pipeline.stages]]
name = "{name}"
kind = "{name}"
workers = {workers}
devices = {devices}
lease_ms = 60000
options = {{ family = "wan2.1", model_path = "{models}", dtype = "{dtype}", device = "{device}", results_dir = "{results}" }}
"""


class Cluster:
    """`stagepool up` with the given workers per stage and GPUs per stage."""

    def __init__(self, args, placement: dict[str, tuple[int, list[str]]]):
        from stagepool.broker.cluster import free_port

        self.dir = Path(tempfile.mkdtemp(prefix="cluster-", dir=args.work))
        dtype = {"encode": args.dtype, "denoise": args.dtype, "decode": "float32"}
        stages = "".join(STAGE.format(
            name=name, workers=n, devices=json.dumps(gpus if args.device != "cpu" else []),
            models=args.models, dtype=dtype[name], results=self.dir / "results",
            device="cuda" if args.device != "cpu" else "cpu")
            for name, (n, gpus) in placement.items())
        config = self.dir / "pipeline.toml"
        config.write_text(CONFIG.format(stages=stages, port=free_port()))
        self.workers = sum(n for n, _ in placement.values())
        self.log = open(self.dir / "up.log", "wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "stagepool.broker.cli", "up", "--config", str(config),
             "--state-dir", str(self.dir / "state"), "--no-gateway"],
            stdout=self.log, stderr=subprocess.STDOUT)
        info = self.dir / "state" / "cluster.json"
        _until(lambda: info.exists(), 60, "stagepool up did not start", self.process)
        from stagepool.common.client import BrokerClient

        self.client = BrokerClient(json.loads(info.read_text())["broker"], timeout_s=30)
        self.snapshot = None
        _until(lambda: sum(q.workers for q in self.client.queues().queues) >= self.workers,
               600, "the workers did not register", self.process)

    def run(self, jobs: list[dict]) -> list[dict]:
        """Submit every job at once; wait for all; returns their records with client times."""
        submitted = {}
        for params in jobs:
            started = time.perf_counter()
            job_id = self.client.submit(params).job_id
            submitted[job_id] = started
        ended: dict[str, float] = {}
        records: dict[str, object] = {}
        while len(ended) < len(submitted):
            if self.snapshot is None and time.perf_counter() - min(submitted.values()) > 5:
                # What `stagepool workers` shows mid-run (the heartbeat's NVML figures).
                import msgspec

                self.snapshot = msgspec.to_builtins(self.client.workers().workers)
            for job_id in submitted.keys() - ended.keys():
                status = self.client.status(job_id)
                if status.state in ("succeeded", "failed", "cancelled", "expired"):
                    ended[job_id] = time.perf_counter()
                    records[job_id] = status
            time.sleep(0.01)
        out = []
        for job_id, started in submitted.items():
            status = records[job_id]
            if status.state != "succeeded":
                raise SystemExit(f"job {job_id} {status.state}: {status.error}\n"
                                 f"see {self.dir}/state/logs")
            out.append(_breakdown(status, ended[job_id] - started, ended[job_id]))
        return out

    def worker_logs(self) -> dict[str, dict]:
        """Per worker: its peak reserved GPU memory and the decode split, from its log."""
        out = {}
        for path in sorted((self.dir / "state" / "logs").glob("*.log")):
            text = path.read_text(errors="replace")
            peaks = [float(m) for m in re.findall(r"peak GPU memory ([\d.]+) MiB reserved", text)]
            vae = [float(m) for m in re.findall(r"vae (\d+) ms", text)]
            write = [float(m) for m in re.findall(r"write (\d+) ms", text)]
            if peaks or vae:
                out[path.stem] = {"peak_reserved_mib": max(peaks, default=0.0),
                                  "vae_ms": vae, "write_ms": write}
        return out

    def stop(self) -> None:
        self.client.close()
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


def _breakdown(status, client_s: float, ended: float) -> dict:
    stages = status.stages
    enc, den, dec = stages["encode"], stages["denoise"], stages["decode"]
    ms = lambda a, b: (b - a) / 1e3  # noqa: E731 - record times are ms; report seconds
    return {"job": status.job_id, "client_s": client_s, "ended": ended,
            "total_s": ms(status.created_ms, dec["finished_ms"]),
            "encode_s": ms(enc["started_ms"], enc["finished_ms"]),
            "denoise_s": ms(den["started_ms"], den["finished_ms"]),
            "decode_s": ms(dec["started_ms"], dec["finished_ms"]),
            "handoff_s": [ms(status.created_ms, enc["started_ms"]),
                          ms(enc["finished_ms"], den["started_ms"]),
                          ms(den["finished_ms"], dec["started_ms"])]}


def _until(predicate, timeout_s: float, message: str, process) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if process.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(message)
        time.sleep(0.2)


# --- the two comparisons ---------------------------------------------------------------------

def one_gpu(args) -> dict:
    out = {}
    for frames in args.frames:
        warm = [job_params(args, frames, 0, steps=2)]
        jobs = [job_params(args, frames, seed) for seed in range(1, args.repeat + 1)]
        mono = Mono(args, "0" if args.device != "cpu" else None, warm, jobs, barrier=False)
        mono.wait_ready()
        mono.finish()
        cluster = Cluster(args, {"encode": (1, ["0"]), "denoise": (1, ["0"]),
                                 "decode": (1, ["0"])})
        try:
            cluster.run(warm)
            split = [cluster.run([params])[0] for params in jobs]
            workers = cluster.worker_logs()
        finally:
            cluster.stop()
        mono_s = statistics.median(j["total_s"] for j in mono.jobs)
        split_s = statistics.median(j["total_s"] for j in split)
        out[f"{frames}_frames"] = {
            "monolithic": {"jobs": mono.jobs, "median_s": mono_s, "peak_reserved_mib": mono.peak_mib},
            "stagepool": {"jobs": split, "median_s": split_s, "workers": workers},
            "overhead": split_s / mono_s - 1,
        }
        print(json.dumps({f"{frames}_frames": out[f"{frames}_frames"]}), file=sys.stderr,
              flush=True)
    return out


def two_gpus(args) -> dict:
    frames = args.frames[0]
    warm = [job_params(args, frames, 0, steps=2)]
    jobs = [job_params(args, frames, seed) for seed in range(1, args.jobs + 1)]
    gpus = ["0", "1"] if args.device != "cpu" else [None, None]
    monos = [Mono(args, gpu, warm, jobs[i::2], barrier=True) for i, gpu in enumerate(gpus)]
    for mono in monos:
        mono.wait_ready()
    started = time.perf_counter()
    for mono in monos:
        mono.go()
    for mono in monos:
        mono.finish()
    mono_s = max(j["ended"] for mono in monos for j in mono.jobs) - started

    cluster = Cluster(args, {"encode": (1, ["0"]), "denoise": (2, ["0", "1"]),
                             "decode": (2, ["0", "1"])})
    try:
        cluster.run(warm * 2)
        started = time.perf_counter()
        split = cluster.run(jobs)
        split_s = max(j["ended"] for j in split) - started
        workers = cluster.worker_logs()
    finally:
        cluster.stop()
    print(json.dumps({"workers_mid_run": cluster.snapshot}, indent=1), file=sys.stderr)
    mono_peak = max(mono.peak_mib for mono in monos)
    denoise_peak = max((w["peak_reserved_mib"] for name, w in workers.items()
                        if name.startswith("denoise")), default=0.0)
    return {
        "frames": frames, "jobs": args.jobs,
        "monolithic": {"wall_s": mono_s, "jobs_per_min": 60 * args.jobs / mono_s,
                       "peak_reserved_mib": [mono.peak_mib for mono in monos],
                       "per_job": [j for mono in monos for j in mono.jobs]},
        "stagepool": {"wall_s": split_s, "jobs_per_min": 60 * args.jobs / split_s,
                      "workers": workers, "per_job": split,
                      "workers_mid_run": cluster.snapshot},
        "throughput_ratio": mono_s / split_s,
        "denoise_peak_over_monolithic": denoise_peak / mono_peak if mono_peak else None,
    }


def machine(args) -> dict:
    info = {"python": sys.version.split()[0]}
    try:
        import diffusers
        import torch

        info.update(torch=torch.__version__, diffusers=diffusers.__version__)
        if args.device != "cpu":
            info["gpu"] = torch.cuda.get_device_name(0)
            info["gpus"] = torch.cuda.device_count()
    except ImportError:
        pass
    return info


def main() -> None:
    if sys.argv[1:2] == ["_mono"]:
        sys.path.insert(0, str(ROOT))
        return mono_main(json.loads(sys.argv[2]))
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("mode", choices=["one", "two"])
    parser.add_argument("--models", type=Path, required=True)
    parser.add_argument("--frames", default="33,81", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=2, help="one: timed jobs per frame count")
    parser.add_argument("--jobs", type=int, default=8, help="two: jobs in the batch")
    parser.add_argument("--device", default="cuda", help="cuda | cpu (a smoke run)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--height", type=int, default=0, help="default: the family's (480)")
    parser.add_argument("--width", type=int, default=0)
    parser.add_argument("--work", type=Path, default=None, help="scratch directory")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    args.work = Path(args.work or tempfile.mkdtemp(prefix="bench-gpu-")).resolve()
    args.models = args.models.resolve()
    if not (args.models / "model_index.json").exists():
        from stagepool.stages.families.shapes import init_random

        started = time.perf_counter()
        init_random(args.models, "wan2.1", "1.3B")
        print(f"built {args.models} in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    result = {"mode": args.mode, "steps": args.steps, "machine": machine(args),
              "models": str(args.models)}
    result.update(one_gpu(args) if args.mode == "one" else two_gpus(args))
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
