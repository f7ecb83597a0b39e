"""Dramatiq: `pipeline([s1, s2, s3])` over RedisBroker; one queue (and worker pool) per stage.

    dramatiq peerapps.dramatiq_app --processes 1 --threads 1 --queues s1
"""

import dramatiq
import redis
from dramatiq.brokers.redis import RedisBroker

from . import DONE_KEY, redis_url

broker = RedisBroker(url=redis_url())
dramatiq.set_broker(broker)
_done = redis.Redis.from_url(redis_url())


@dramatiq.actor(queue_name="s1", max_retries=0)
def s1(job_id):
    return job_id


@dramatiq.actor(queue_name="s2", max_retries=0)
def s2(job_id):
    return job_id


@dramatiq.actor(queue_name="s3", max_retries=0)
def s3(job_id):
    _done.lpush(DONE_KEY, job_id)


def submit(job_id: str) -> None:
    dramatiq.pipeline([s1.message(job_id), s2.message(), s3.message()]).run()
