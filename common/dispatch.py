"""What travels between workers: the ring's record (`Dispatch`: where a job's next stage
finds its inputs) and the release notice (`Release`: free the outputs held for a job).

Both are msgpack. A Dispatch is array-like, to fit a ring slot; a consumer trusts nothing in
it beyond where to find the job and its inputs (docs/wire.md, section 4).
"""

from __future__ import annotations

import msgspec

from .errors import ProtocolError
from .frames import DECODE_ERRORS
from .wire import Message, Stage


class Release(Message, tag="release"):
    """Worker to worker (PUSH to the producer's notice socket): free the outputs held as `key`."""

    key: str


class TensorDesc(msgspec.Struct, array_like=True, omit_defaults=True):
    """Where a producer holds one tensor; the consumer pulls it (common/transfer)."""

    name: str
    dtype: str
    shape: list[int]
    nbytes: int
    address: int = 0
    checksum: int = 0


class Dispatch(msgspec.Struct, array_like=True, omit_defaults=True):
    """One ring slot's payload: what a consumer needs to start the job's next stage.

    Never params or tensors: the params live in Redis (`start` returns them), the tensors in
    the producer's memory. `deadline_ms` is wall-clock epoch milliseconds (0: none); it
    crosses hosts, so it cannot be monotonic.
    """

    job_id: str
    attempt: int
    stage: Stage
    priority: int = 0
    deadline_ms: int = 0
    endpoint: str = ""
    tensors: list[TensorDesc] = []


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Dispatch)


def encode_dispatch(dispatch: Dispatch) -> bytes:
    return _encoder.encode(dispatch)


def decode_dispatch(payload: bytes) -> Dispatch:
    try:
        return _decoder.decode(payload)
    except DECODE_ERRORS as exc:
        raise ProtocolError(f"undecodable dispatch record: {type(exc).__name__}: "
                            f"{str(exc)[:200]}") from None
