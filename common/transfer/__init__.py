"""Tensor transfer between workers: pools, holds and pulls (see exchange.py and base.py)."""

from .base import Endpoint, Failure, FailureKind, Pull, PullStatus
from .exchange import Exchange
from .pool import PoolFull

__all__ = ["Endpoint", "Exchange", "Failure", "FailureKind", "PoolFull", "Pull", "PullStatus"]
