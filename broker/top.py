"""`stagepool top`: a live terminal view of queues, workers and recent jobs (rich).

It reads what the gateway reads (the Observer: Redis and the broker), so it works with or
without a gateway running. Ctrl-C leaves.
"""

from __future__ import annotations

import time

from rich.console import Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from ..common.config import Config
from ..common.errors import StagepoolError
from .gateway.observe import Observer
from ..common.httpwire import Job, Queues

_RECENT = 12
_STATE_STYLE = {"succeeded": "green", "failed": "red", "dead": "red", "expired": "red", "cancelled": "yellow",
                "queued": "cyan"}


def _n(value) -> str:
    return "-" if value is None else str(value)


def render(queues: Queues, jobs: list[Job], history: dict[str, list[int]]) -> Group:
    stages = Table(title="stages", expand=True, title_justify="left")
    for column in ("stage", "queued", "oldest", "trend", "ring", "backlog", "in flight",
                   "workers"):
        stages.add_column(column, justify="left" if column in ("stage", "trend") else "right")
    for q in queues.stages:
        ring = f"{q.ring_depth}/{q.ring_capacity}" if q.ring_depth is not None else "-"
        stages.add_row(q.stage, str(q.depth), f"{q.oldest_age_s:.1f}s",
                       sparkline(history.get(q.stage, [])), ring, _n(q.backlog),
                       _n(q.in_flight), _n(q.workers))
    totals = queues.totals
    broker = Text("broker up", style="green") if queues.broker_up else Text("broker DOWN",
                                                                            style="bold red")
    summary = Text.assemble(broker, f"   active {totals['active']}   jobs {totals['jobs']}   "
                                    f"results {totals['results']}   dead {totals['dead']}")
    recent = Table(title="recent jobs", expand=True, title_justify="left")
    for column in ("job", "state", "stage", "progress", "age", "error"):
        recent.add_column(column, overflow="ellipsis", no_wrap=True)
    now_ms = queues.now_ms
    for job in jobs:
        progress = f"{job.progress:.0%}" if job.progress is not None else ""
        recent.add_row(job.job_id[:16], Text(job.state, style=_STATE_STYLE.get(job.state, "")),
                       job.stage, progress, f"{(now_ms - job.created_ms) / 1000:.1f}s",
                       job.error[:60])
    return Group(summary, stages, recent)


_BARS = " ▁▂▃▄▅▆▇█"


def sparkline(values: list[int], width: int = 30) -> str:
    values = values[-width:]
    if not values:
        return ""
    top = max(values) or 1
    return "".join(_BARS[round(v / top * (len(_BARS) - 1))] for v in values)


def run_top(config: Config, broker_endpoint: str, interval_s: float, once: bool) -> int:
    observer = Observer(config, broker_endpoint)
    history: dict[str, list[int]] = {}

    def frame():
        queues = observer.queues()
        for q in queues.stages:
            history.setdefault(q.stage, []).append(q.depth)
            del history[q.stage][:-120]
        return render(queues, observer.jobs(_RECENT), history)

    try:
        if once:
            from rich.console import Console

            Console().print(frame())
            return 0
        with Live(frame(), refresh_per_second=4, screen=False) as live:
            while True:
                time.sleep(interval_s)
                try:
                    live.update(frame())
                except StagepoolError as exc:
                    live.update(Text(f"unreachable: {exc}", style="bold red"))
    except KeyboardInterrupt:
        return 0
    finally:
        observer.close()
