"""Celery: `chain(s1, s2, s3)` over the Redis broker; one queue (and worker pool) per stage.

    celery -A peerapps.celery_app worker -Q s1 -P solo
"""

import redis
from celery import Celery, chain

from . import DONE_KEY, redis_url

app = Celery("peers", broker=redis_url())
app.conf.update(
    task_ignore_result=True,  # a chain needs no result backend
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    task_routes={"s1": {"queue": "s1"}, "s2": {"queue": "s2"}, "s3": {"queue": "s3"}},
)
_done = redis.Redis.from_url(redis_url())


@app.task(name="s1")
def s1(job_id):
    return job_id


@app.task(name="s2")
def s2(job_id):
    return job_id


@app.task(name="s3")
def s3(job_id):
    _done.lpush(DONE_KEY, job_id)


def submit(job_id: str) -> None:
    chain(s1.s(job_id), s2.s(), s3.s()).apply_async()
