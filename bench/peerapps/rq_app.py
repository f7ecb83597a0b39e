"""RQ: three queues, s2 and s3 enqueued up front with `depends_on` the previous stage.

    rq worker s1 --worker-class rq.worker.SimpleWorker --url $BENCH_REDIS_URL
"""

import redis
from rq import Queue

from . import DONE_KEY, redis_url

_conn = redis.Redis.from_url(redis_url())
_queues = {name: Queue(name, connection=_conn) for name in ("s1", "s2", "s3")}


def s1(job_id):
    return job_id


def s2(job_id):
    return job_id


def s3(job_id):
    _conn.lpush(DONE_KEY, job_id)


def submit(job_id: str) -> None:
    first = _queues["s1"].enqueue(s1, job_id)
    second = _queues["s2"].enqueue(s2, job_id, depends_on=first)
    _queues["s3"].enqueue(s3, job_id, depends_on=second)
