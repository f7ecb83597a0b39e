"""One error tree for stagepool. Foreign errors are translated where they cross in.

Errors that cross a process boundary travel as data (`wire.Error` with a code from `Code`),
never as pickled exceptions; `StagepoolError.code` is what goes on the wire.
"""

from __future__ import annotations

import enum


class Code(enum.StrEnum):
    """Error codes sent to peers. Stable strings: clients in any language match on them."""

    BAD_REQUEST = "bad_request"
    HANDSHAKE = "handshake_required"
    VERSION = "version_mismatch"
    TOO_LARGE = "too_large"
    NOT_FOUND = "not_found"
    UNKNOWN_WORKER = "unknown_worker"
    NO_CAPACITY = "no_capacity"
    UNAVAILABLE = "unavailable"
    INVALID_PARAMS = "invalid_params"
    INVALID_REQUEST = "invalid_request"  # well-formed, but a field has the wrong type or value
    CONFLICT = "conflict"  # the job's state does not allow it (a retry of a succeeded job)
    NOT_READY = "not_ready"  # a result asked for before the job succeeded
    BUSY = "busy"
    INTERNAL = "internal"


class StagepoolError(Exception):
    """Root of every error stagepool raises on purpose."""

    code: Code = Code.INTERNAL


class ConfigError(StagepoolError):
    """A config file or environment override is invalid."""

    code = Code.BAD_REQUEST


class ProtocolError(StagepoolError):
    """A peer sent something that does not decode, or broke the message order."""

    code = Code.BAD_REQUEST


class InvalidParams(ProtocolError):
    """A job's params do not fit its pipeline's schema (the message names the field)."""

    code = Code.INVALID_PARAMS


class PayloadTooLarge(StagepoolError):
    """A record does not fit where it must go (a ring slot, a frame limit)."""

    code = Code.TOO_LARGE


class RingError(StagepoolError):
    """A ring's memory is not what the protocol expects (bad magic, version, layout)."""


class CellLost(RingError):
    """The broker took a lease cell back (its lease expired, or the worker was dropped): the
    attempt it held is superseded, and the worker must register again for fresh cells."""


class RingFull(StagepoolError):
    """Backpressure: the ring had no free slot before the deadline."""

    code = Code.NO_CAPACITY


class TransportError(StagepoolError):
    """A remote-memory or control connection failed or timed out."""

    code = Code.UNAVAILABLE


class TransferError(StagepoolError):
    """A tensor could not be placed in or moved between worker pools."""

    code = Code.UNAVAILABLE


class StoreUnavailable(StagepoolError):
    """Redis could not be reached; the translation of redis.ConnectionError/TimeoutError."""

    code = Code.UNAVAILABLE


class StageStopped(StagepoolError):
    """Raised inside a running stage at a step boundary: its job ended (cancelled), its
    attempt was superseded, or its time limit passed. `retry`: the attempt failed (time limit)
    and the job may run again; otherwise nothing is left to do for it."""

    def __init__(self, message: str, *, retry: bool = False):
        super().__init__(message)
        self.retry = retry


class Busy(StagepoolError):
    """The deployment takes no more jobs for now (its first ring and the broker's overflow
    are full): nothing was created; submit again after `retry_after_s`."""

    code = Code.BUSY

    def __init__(self, message: str, retry_after_s: float):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class RemoteError(StagepoolError):
    """An error reply from a peer, raised on the caller's side."""

    def __init__(self, code: str, message: str, retry_after_s: float = 0.0):
        super().__init__(f"{code}: {message}")
        self.code = code  # type: ignore[assignment]
        self.message = message
        self.retry_after_s = retry_after_s
