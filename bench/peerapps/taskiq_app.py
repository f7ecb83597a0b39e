"""Taskiq (taskiq-redis ListQueueBroker): one broker and list per stage; each kicks the next.

    taskiq worker peerapps.taskiq_app:s1_broker --workers 1 --max-async-tasks 1
"""

import asyncio

from redis.asyncio import Redis
from taskiq_redis import ListQueueBroker

from . import DONE_KEY, redis_url

s1_broker = ListQueueBroker(redis_url(), queue_name="s1")
s2_broker = ListQueueBroker(redis_url(), queue_name="s2")
s3_broker = ListQueueBroker(redis_url(), queue_name="s3")
_done = Redis.from_url(redis_url())


@s3_broker.task(task_name="s3")
async def s3(job_id: str) -> None:
    await _done.lpush(DONE_KEY, job_id)


@s2_broker.task(task_name="s2")
async def s2(job_id: str) -> None:
    await s3.kiq(job_id)


@s1_broker.task(task_name="s1")
async def s1(job_id: str) -> None:
    await s2.kiq(job_id)


class Submitter:
    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.loop.run_until_complete(s1_broker.startup())

    def submit(self, job_id: str) -> None:
        self.loop.run_until_complete(s1.kiq(job_id))

    def submit_all(self, job_ids: list[str], in_flight: int = 32) -> None:
        """All at once, as far as the connection pool allows (`in_flight` at a time)."""
        limit = asyncio.Semaphore(in_flight)

        async def one(j):
            async with limit:
                await s1.kiq(j)

        async def all_of_them():
            await asyncio.gather(*(one(j) for j in job_ids))

        self.loop.run_until_complete(all_of_them())

    def close(self) -> None:
        self.loop.run_until_complete(s1_broker.shutdown())
        self.loop.close()
