"""arq: each stage's function enqueues the next stage on its queue.

    arq peerapps.arq_app.S1
"""

import asyncio
import os

from arq import create_pool
from arq.connections import RedisSettings

from . import DONE_KEY, redis_url

SETTINGS = RedisSettings.from_dsn(redis_url())
# arq polls its queue (a sorted set) every poll_delay; the default is 0.5 s. BENCH_ARQ_POLL_S
# lets the driver give it a fair (lower) one.
POLL_DELAY_S = float(os.environ.get("BENCH_ARQ_POLL_S", "0.005"))


async def s1(ctx, job_id):
    await ctx["redis"].enqueue_job("s2", job_id, _queue_name="s2")


async def s2(ctx, job_id):
    await ctx["redis"].enqueue_job("s3", job_id, _queue_name="s3")


async def s3(ctx, job_id):
    await ctx["redis"].lpush(DONE_KEY, job_id)


def _settings(name, fn):
    return type(name.upper(), (), {
        "functions": [fn], "queue_name": name, "redis_settings": SETTINGS, "max_jobs": 1,
        "poll_delay": POLL_DELAY_S, "keep_result": 0, "handle_signals": True,
    })


S1, S2, S3 = _settings("s1", s1), _settings("s2", s2), _settings("s3", s3)


class Submitter:
    """Enqueue from synchronous code: its own event loop and pool."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.pool = self.loop.run_until_complete(create_pool(SETTINGS))

    def submit(self, job_id: str) -> None:
        self.loop.run_until_complete(self.pool.enqueue_job("s1", job_id, _queue_name="s1"))

    def submit_all(self, job_ids: list[str], in_flight: int = 32) -> None:
        """All at once, as far as the connection pool allows (`in_flight` at a time)."""
        limit = asyncio.Semaphore(in_flight)

        async def one(j):
            async with limit:
                await self.pool.enqueue_job("s1", j, _queue_name="s1")

        async def all_of_them():
            await asyncio.gather(*(one(j) for j in job_ids))

        self.loop.run_until_complete(all_of_them())

    def close(self) -> None:
        self.loop.run_until_complete(self.pool.aclose())
        self.loop.close()
