"""Control frames on the wire: one msgpack or JSON document per ZMQ message, decoded into the
union a socket accepts (wire.py's messages), with every error hostile bytes can raise turned
into a ProtocolError for that frame alone.

A frame that opens with `{` or whitespace is JSON and is answered in JSON; anything else is
msgpack. A frame that does not decode still gets its error reply where its `rid` can be read.
"""

from __future__ import annotations

from typing import Any

import msgspec

from .errors import PayloadTooLarge, ProtocolError
from .wire import MAX_FRAME_BYTES


# What decoding hostile bytes can raise besides msgspec's own errors: invalid UTF-8 in a
# string (UnicodeDecodeError, a ValueError), nesting past the recursion limit, and integers
# past what a field holds. Every decode path turns them into a ProtocolError for that input.
DECODE_ERRORS = (msgspec.DecodeError, ValueError, RecursionError, OverflowError)


def looks_json(frame: bytes) -> bool:
    """A JSON frame (answered in JSON) rather than msgpack: it opens with `{` or whitespace."""
    return frame[:1] in (b"{", b" ", b"\n", b"\t", b"\r")


class _Rid(msgspec.Struct):
    rid: int = 0


def salvage_rid(frame: bytes) -> int:
    """The `rid` of a frame that did not decode as a request (so that its sender's error
    reply reaches the call that waits for it); 0 when it has none."""
    if len(frame) > MAX_FRAME_BYTES:
        return 0
    try:
        found = (msgspec.json.decode(frame, type=_Rid) if looks_json(frame)
                 else msgspec.msgpack.decode(frame, type=_Rid))
    except DECODE_ERRORS:
        return 0
    return found.rid if 0 <= found.rid < 2**63 else 0


class Codec:
    """One encoder and typed decoders for a socket; JSON or msgpack chosen per frame."""

    def __init__(self, accepts: Any):
        self._msgpack_decoder = msgspec.msgpack.Decoder(accepts)
        self._json_decoder = msgspec.json.Decoder(accepts)
        self._msgpack = msgspec.msgpack.Encoder()
        self._json = msgspec.json.Encoder()

    def decode(self, frame: bytes) -> tuple[Any, bool]:
        """Decode one frame; returns (message, was_json).

        Raises ProtocolError (or PayloadTooLarge) with a reason fit to send back.
        """
        if len(frame) > MAX_FRAME_BYTES:
            raise PayloadTooLarge(f"frame of {len(frame)} bytes > limit of {MAX_FRAME_BYTES}")
        is_json = looks_json(frame)
        try:
            if is_json:
                return self._json_decoder.decode(frame), True
            return self._msgpack_decoder.decode(frame), False
        except DECODE_ERRORS as exc:
            raise ProtocolError(f"undecodable {'JSON' if is_json else 'msgpack'} frame: "
                                f"{type(exc).__name__}: {str(exc)[:200]}") from None

    def encode(self, message: Any, as_json: bool = False) -> bytes:
        return self._json.encode(message) if as_json else self._msgpack.encode(message)
