"""A Redis client from a URL: redis-py's own schemes, plus Sentinel.

    redis://[user:password@]host:port/db      rediss:// with TLS; unix:///path?db=0
    redis+sentinel://[user:password@]sentinel-1:26379,sentinel-2:26379/service[/db]
    rediss+sentinel://...                     the same, TLS to the primary and the sentinels

With Sentinel, the client asks the sentinels for the primary of `service` and follows it
through a failover (redis-py's `Sentinel.master_for`): one URL for every process, whichever
node is primary. The credentials are the primary's (the sentinels are asked without).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote, urlsplit

import redis
from redis.sentinel import Sentinel

from .errors import ConfigError

SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
SENTINEL_PORT = 26379


def connect(url: str, **kwargs: Any) -> redis.Redis:
    """A client for `url`; `kwargs` are redis-py's connection settings (timeouts, ...)."""
    parts = urlsplit(url)
    if parts.scheme not in SENTINEL_SCHEMES:
        return redis.Redis.from_url(url, **kwargs)
    credentials, _, hosts = parts.netloc.rpartition("@")
    username, _, password = credentials.partition(":")
    sentinels = []
    for host in filter(None, hosts.split(",")):
        name, _, port = host.rpartition(":") if ":" in host else (host, "", "")
        try:
            sentinels.append((name, int(port) if port else SENTINEL_PORT))
        except ValueError:
            raise ConfigError(f"bad sentinel address {host!r} in the Redis URL") from None
    path = [p for p in parts.path.split("/") if p]
    if not sentinels or not path or len(path) > 2 or (len(path) == 2 and not path[1].isdigit()):
        raise ConfigError("a Sentinel URL is redis+sentinel://[user:password@]host:port[,...]"
                          "/service[/db]")
    auth = {"username": unquote(username) or None, "password": unquote(password) or None}
    tls = {"ssl": True} if parts.scheme.startswith("rediss") else {}
    sentinel = Sentinel(sentinels, sentinel_kwargs={**tls,
                                                    "socket_timeout": kwargs.get("socket_timeout")})
    return sentinel.master_for(path[0], db=int(path[1]) if len(path) == 2 else 0,
                               **auth, **kwargs)
