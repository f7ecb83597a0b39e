"""The floor: plain processes moving a job id through Redis lists with BRPOP and LPUSH.

    python -m peerapps.raw s1 s2     # take from list s1, hand on to list s2
    python -m peerapps.raw s3 done   # the last stage: hand on to bench:done
"""

import signal
import sys

import redis

from . import DONE_KEY, redis_url


def main() -> None:
    source, target = sys.argv[1], sys.argv[2]
    target = DONE_KEY if target == "done" else target
    client = redis.Redis.from_url(redis_url())
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    while True:
        item = client.brpop(source, timeout=1)
        if item is not None:
            client.lpush(target, item[1])


if __name__ == "__main__":
    main()
