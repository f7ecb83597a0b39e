"""Every runnable example in README.md and docs/ runs as written, against a real cluster.

A block is runnable when a `<!-- run: NAME -->` line precedes it. The README's `terminal-1`
block (`stagepool up`) runs in the background, as a user's first terminal; every other block
then runs in order as a second terminal would after `eval "$(stagepool env)"`: shell blocks in
`bash -e`, Python blocks in the venv's python, JavaScript in node (the `zeromq` package from
npm, installed once into .venv/node). Then the same for the blocks named `images-...`: the
image-editing cluster of docs/gateway.md (`images-up`, its own state dir, which each of its
blocks names), on the `fox.png` the first session wrote. The working directory is a fresh one holding the
repository's `.venv` and `configs`, so the state dir and models are this test's own; the only
setting added is STAGEPOOL_GATEWAY_PORT=0 (port 8000 may be taken on a test machine).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stagepool.common.client import BrokerClient

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"<!-- run: ([\w-]+) -->\n```(\w+)\n(.*?)```", re.S)
NODE_MODULES = ROOT / ".venv" / "node" / "node_modules"
# The job ids the examples submit, each of which must succeed.
EXAMPLE_JOBS = ["fox-1", "doc-1", "py-1", "zmq-1", "js-1", "curl-1"]
# The image examples (docs/gateway.md's image-editing cluster): their blocks' names start so.
IMAGES = "images-"
IMAGE_JOBS = ["edit-1", "edit-2", "edit-3", "fox-edit"]


def blocks() -> list[tuple[str, str, str, Path]]:
    found = []
    for doc in DOCS:
        found += [(name, lang, code, doc) for name, lang, code in BLOCK.findall(doc.read_text())]
    return found


def _node_modules() -> Path:
    if not (NODE_MODULES / "zeromq").exists():
        if shutil.which("npm") is None:
            pytest.fail("node and npm are needed for docs/wire.md's Node example "
                        "(make test installs Debian's nodejs and npm)")
        subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--prefix",
                        str(NODE_MODULES.parent), "zeromq@6.8.0"], check=True,
                       capture_output=True, timeout=300)
    return NODE_MODULES


def _cluster_env(cwd: Path, base: dict, state_dir: str) -> dict:
    out = subprocess.run(["bash", "-c", f". .venv/bin/activate && stagepool env --state-dir "
                          f"{state_dir}"], cwd=cwd, env=base, check=True, capture_output=True,
                         text=True).stdout
    env = dict(base)
    for line in out.splitlines():
        name, _, value = line.removeprefix("export ").partition("=")
        env[name] = value.strip("'")
    env["PATH"] = f"{cwd / '.venv' / 'bin'}:{env['PATH']}"
    return env


def _run(name: str, lang: str, code: str, cwd: Path, env: dict) -> str:
    if lang == "sh":
        # A block of the image session names its cluster itself (its own state dir).
        argv = ["bash", "-e", "-c", code if name.startswith(IMAGES) else
                'eval "$(stagepool env)"\n' + code]
    elif lang == "python":
        argv = [sys.executable, "-c", code]
    elif lang == "js":
        argv = ["node", "-e", code]
    else:
        raise AssertionError(f"example {name}: no runner for {lang}")
    result = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (
        f"example {name} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result.stdout


def _session(found: list, up_name: str, state_dir: str, job_ids: list[str], work: Path,
             base: dict, log_path: Path) -> dict[str, str]:
    """`up_name`'s block in the background, as a first terminal; then the session's other
    blocks in order, as a second one; each of `job_ids` must succeed. Ctrl-C ends it, which
    must stop the cluster cleanly. The blocks' outputs by name."""
    [(_, _, up_code, _)] = [b for b in found if b[0] == up_name]
    session = [b for b in found if (b[0].startswith(IMAGES) == up_name.startswith(IMAGES))
               and b[0] != up_name]
    log = open(log_path, "wb")
    up = subprocess.Popen(["bash", "-e", "-c", up_code], cwd=work, env=base, stdout=log,
                          stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180  # the first start builds the tiny models
        while not (work / state_dir / "cluster.json").exists():
            assert up.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, "stagepool up never started"
            time.sleep(0.2)
        env = _cluster_env(work, base, state_dir)
        with BrokerClient(env["STAGEPOOL_BROKER_ENDPOINT"]) as client:
            while not all(q.workers for q in client.queues().queues):
                assert time.monotonic() < deadline, "the workers never registered"
                time.sleep(0.2)
            outputs = {name: _run(name, lang, code, work, env) for name, lang, code, _ in session}
            deadline = time.monotonic() + 120
            for job_id in job_ids:
                while (state := client.status(job_id).state) != "succeeded":
                    assert not state.startswith(("failed", "dead", "cancelled")), (job_id, state)
                    assert time.monotonic() < deadline, f"{job_id} still {state}"
                    time.sleep(0.1)
    finally:
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGINT)  # Ctrl-C in terminal 1
        code = up.wait(timeout=120)
        log.close()
    assert code == 0, log_path.read_text()[-3000:]
    return outputs


def test_every_marked_example_runs_as_written(tmp_path):
    found = blocks()
    names = [name for name, *_ in found]
    assert {"terminal-1", "terminal-2", "python", "redis-cli", "wire-redis-cli",
            "wire-zmq-node", "gateway-curl", "client-batch", "images-up", "images-curl",
            "images-cli", "images-wire-redis-cli"} <= set(names), names
    assert len(names) == len(set(names)), "two examples share a name"
    work = tmp_path / "work"
    work.mkdir()
    (work / ".venv").symlink_to(ROOT / ".venv")
    (work / "configs").symlink_to(ROOT / "configs")
    base = {k: v for k, v in os.environ.items() if not k.startswith("STAGEPOOL_")}
    base.update(STAGEPOOL_GATEWAY_PORT="0", NODE_PATH=str(_node_modules()))

    outputs = _session(found, "terminal-1", ".stagepool", EXAMPLE_JOBS, work, base,
                       tmp_path / "terminal-1.log")
    assert (work / "fox.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (work / "curl-1.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert outputs["python"].startswith("succeeded ")
    assert outputs["client-batch"].count(" succeeded ") == 3
    assert "welcome" in outputs["wire-zmq-node"] and "submitted" in outputs["wire-zmq-node"]

    # The image examples edit the fox the first session drew.
    _session(found, "images-up", ".stagepool-edit", IMAGE_JOBS, work, base,
             tmp_path / "images-up.log")
    for name in ("edit-1.png", "fox-red.png"):
        assert (work / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
