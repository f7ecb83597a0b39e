"""The worker side of bench/peers.py: the same three-stage no-op chain in each peer system.

Every app reads the Redis URL from BENCH_REDIS_URL. Stage 3 of every chain ends the job by
LPUSHing its id onto `bench:done`, where the driver waits (BRPOP): the cheapest completion
signal Redis has, and the same one for every peer. Stage names are s1, s2, s3.
"""

import os



def redis_url() -> str:
    """Read when an app is imported: the driver sets it after starting its redis-server."""
    return os.environ["BENCH_REDIS_URL"]
DONE_KEY = "bench:done"
