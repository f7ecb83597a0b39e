"""The tcp ring's messages: one msgpack op per frame, each answered by one reply.

Framing (tcp.py, tcpserver.py): a little-endian u32 length, then the msgpack body (and, with
a ring key, a 16-byte MAC: common/security.py).
"""

from __future__ import annotations

import struct

import msgspec

from .base import WAKE_ALL, WAKE_ANY

OPS_VERSION = 2
MAX_OP_FRAME_BYTES = 1 << 20
FRAME_HEADER = struct.Struct("<I")  # each frame: its length, then msgpack


class Op(msgspec.Struct, tag=True, array_like=True):
    rid: int
    ring: str


class Attach(Op, tag="a"):
    version: int


class Read(Op, tag="r"):
    offset: int
    nbytes: int


class Write(Op, tag="w"):
    offset: int
    data: bytes


class Store(Op, tag="s"):
    offset: int
    value: int


class FetchAdd(Op, tag="f"):
    offset: int
    delta: int


class Cas(Op, tag="c"):
    offset: int
    expected: int
    desired: int


class Wake(Op, tag="k"):
    offset: int
    count: int = WAKE_ALL
    mask: int = WAKE_ANY


class ProduceMany(Op, tag="M"):
    """Publish each (ring name, payload) in order until one is full (`Ring.produce_many`),
    then wake the sleepers of `wake` (the lanes' main ring) besides each ring's own."""

    items: list[tuple[str, bytes]]
    wake: str = ""


class Drops(Op, tag="D"):
    """Drop the lease of each (cell, word as its holder last set it)."""

    items: list[tuple[int, int]]


class ClaimAny(Op, tag="C"):
    """Claims from `lanes` (ring names, in the order to look); `ring` is where to wait."""

    lanes: list[str]
    most: int
    timeout_ms: int


class LeaseItem(msgspec.Struct, array_like=True):
    cell: int
    word: int  # the cell's word as its holder last set it: the fence
    lane: str  # the ring the claim came from
    ticket: int
    attempt: int
    job_id: str
    lease_ms: int


class Leases(Op, tag="L"):
    items: list[LeaseItem]


class Value(msgspec.Struct, tag="v", array_like=True):
    rid: int
    value: int


class Data(msgspec.Struct, tag="d", array_like=True):
    rid: int
    data: bytes


class Claimed(msgspec.Struct, tag="l", array_like=True):
    rid: int
    items: list[tuple[int, int, bytes]]  # (index in lanes, ticket, payload)


class Words(msgspec.Struct, tag="o", array_like=True):
    """Answers to `Leases` and `Drops`, per item: (LEASED, RECLAIMED or LOST, its word now)."""

    rid: int
    words: list[tuple[int, int]]


LEASED = 0
RECLAIMED = 1  # the broker freed the slot first: the lease was dropped again
LOST = 2  # the cell was fenced: the holder lost it (the slot stays claimed for the reaper)
ANSWERS = {LEASED: "leased", RECLAIMED: "reclaimed", LOST: "lost"}
ANSWER_CODES = {answer: code for code, answer in ANSWERS.items()}


class OpError(msgspec.Struct, tag="e", array_like=True):
    rid: int
    code: str
    message: str


AnyOp = Attach | Read | Write | Store | FetchAdd | Cas | Wake | ProduceMany | ClaimAny | Leases | Drops
AnyReply = Value | Data | Claimed | Words | OpError


def framed(body: bytes) -> bytes:
    """`body` with its length in front, as it goes on the wire."""
    return FRAME_HEADER.pack(len(body)) + body
