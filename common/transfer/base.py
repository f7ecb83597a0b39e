"""The tensor-transfer interface: what a backend provides and promises.

A transfer moves a producer's held tensors into a consumer's hands:

  1. the producer copies its outputs into its registered `Pool` and keeps them there, *held*
     under a key (`Exchange.put`), and puts an `Endpoint` and `TensorDesc`s in the Dispatch;
  2. the consumer calls `Backend.pull(endpoint, descs)`: a `Pull` handle, never an exception;
  3. it polls the handle (`poll()` never blocks) until DONE (tensors verified against their
     checksums) or FAILED (`failure` says why, as data);
  4. after its stage has committed, the consumer asks the producer to release the key, and
     releases its own landing buffers (`Pull.close()`).

A backend only moves bytes: pools, holds and release notices are `Exchange`'s job, so every
backend gets them the same way.
"""

from __future__ import annotations

import abc
import enum
import math
import os
import socket
import time

import msgspec

from ..dispatch import TensorDesc

ITEMSIZE = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4,
            "int16": 2, "int8": 1, "uint8": 1, "bool": 1, "complex64": 8}


class PullStatus(enum.Enum):
    PENDING = "pending"
    DONE = "done"
    FAILED = "failed"


class FailureKind(enum.StrEnum):
    PRODUCER_GONE = "producer_gone"  # the producer's memory cannot be reached: re-run upstream
    CHECKSUM = "checksum"  # bytes arrived but do not match their descriptor
    TRANSFER = "transfer"  # the engine reported an error; may be retried after a backoff
    NO_ROOM = "no_room"  # our landing pool is full: retry later, the producer is fine
    BAD_DESCRIPTOR = "bad_descriptor"  # a descriptor outside the producer's pool, a bad dtype


class Failure(msgspec.Struct, frozen=True):
    """Why a pull failed. `upstream` says whether to send the job back to the producer's stage."""

    kind: FailureKind
    message: str

    @property
    def upstream(self) -> bool:
        return self.kind in (FailureKind.PRODUCER_GONE, FailureKind.CHECKSUM,
                             FailureKind.BAD_DESCRIPTOR)


class Endpoint(msgspec.Struct, array_like=True, omit_defaults=True, frozen=True):
    """Where a producer's pool can be reached; travels JSON-encoded in `Dispatch.endpoint`.

    `host` identifies a host and PID namespace: equal values mean the consumer can map the
    producer's pool through `/proc/<pid>/fd/<fd>`. `token` is the pool's random id, checked
    against its header so a reused pid or fd is never mistaken for the producer.
    """

    host: str
    pid: int
    fd: int
    token: int
    base: int  # the pool's address in the producer: descriptor addresses are base + offset
    nbytes: int
    session: str = ""  # Mooncake "ip:port" ("" where the producer has no Mooncake engine)
    notify: str = ""  # the producer's ZMQ endpoint for release notices

    def encode(self) -> str:
        return msgspec.json.encode(self).decode()

    @classmethod
    def decode(cls, text: str) -> Endpoint:
        return msgspec.json.decode(text, type=cls)


def host_identity() -> str:
    """This host and PID namespace: the scope in which /proc/<pid>/fd names our pools."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = socket.gethostname()
    try:
        pidns = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        pidns = 0
    return f"{boot}/{pidns}"


class Pull(abc.ABC):
    """One pull in flight. Owned by the thread that made it; `poll` never blocks."""

    tensors: dict  # name -> torch.Tensor; valid once DONE, until close()
    failure: Failure | None = None
    nbytes: int = 0
    backend: str = ""  # the name of the backend that made it

    @abc.abstractmethod
    def poll(self) -> PullStatus:
        """PENDING: ask again later. DONE: `tensors` are verified. FAILED: see `failure`."""

    def wait(self, timeout_s: float) -> PullStatus:
        """Poll until not PENDING or `timeout_s` passes (then PENDING)."""
        deadline = time.monotonic() + timeout_s
        status = self.poll()
        while status is PullStatus.PENDING and time.monotonic() < deadline:
            time.sleep(0.0002)
            status = self.poll()
        return status

    def close(self) -> None:
        """Give back the landing memory; the tensors must not be used afterwards."""


class Backend(abc.ABC):
    """A way to read a producer's pool. One per consumer process, used from one thread."""

    name: str

    @abc.abstractmethod
    def reaches(self, endpoint: Endpoint) -> bool:
        """Whether this backend can pull from `endpoint` at all (no I/O)."""

    @abc.abstractmethod
    def pull(self, endpoint: Endpoint, descs: list[TensorDesc]) -> Pull:
        """Start pulling `descs` from the producer. Failures come back in the handle."""

    def session(self) -> str:
        """What producers advertise in `Endpoint.session` for this backend."""
        return ""

    def close(self) -> None:
        """Release engine resources."""


class FailedPull(Pull):
    """A pull that failed before it started."""

    def __init__(self, failure: Failure):
        self.tensors = {}
        self.failure = failure

    def poll(self) -> PullStatus:
        return PullStatus.FAILED


def check_descs(endpoint: Endpoint, descs: list[TensorDesc]) -> Failure | None:
    """Descriptors must name known dtypes and lie inside the producer's pool."""
    for desc in descs:
        offset = desc.address - endpoint.base
        if desc.dtype not in ITEMSIZE:
            return Failure(FailureKind.BAD_DESCRIPTOR, f"{desc.name}: unknown dtype {desc.dtype!r}")
        if (min(desc.shape, default=0) < 0
                or math.prod(desc.shape) * ITEMSIZE[desc.dtype] != desc.nbytes):
            return Failure(FailureKind.BAD_DESCRIPTOR,
                           f"{desc.name}: shape {desc.shape} of {desc.dtype} is not "
                           f"{desc.nbytes} bytes")
        if desc.nbytes < 0 or offset < 0 or offset + desc.nbytes > endpoint.nbytes:
            return Failure(FailureKind.BAD_DESCRIPTOR,
                           f"{desc.name}: {desc.nbytes} bytes at {offset} outside the pool")
    return None
