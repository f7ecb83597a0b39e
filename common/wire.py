"""Wire schemas: every ZMQ control message (the ring's record, `Dispatch`, and the workers'
`Release` notice are in dispatch.py).

Messages are tagged msgspec Structs (`{"type": "submit", ...}` in JSON, the same map in
msgpack). A socket has one decoder for the union it accepts and matches on the decoded type.
New fields always get defaults, so older peers keep decoding newer messages.

A control connection starts with `Hello` (protocol version and a schema hash); the broker
answers `Welcome` or `Error(version_mismatch)`. Every request carries `rid`, echoed in its reply,
so a client can drop late replies to requests it gave up on.

Frames are single: one msgpack or JSON document per ZMQ message, never positional parts.
JSON is accepted on the control socket for clients without msgpack; the broker answers in the
encoding it received.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any, Literal

import msgspec

from .errors import Code, ProtocolError

PROTOCOL_VERSION = 1
MAX_FRAME_BYTES = 1 << 20  # a control frame above this is refused with `too_large`
MAX_PARAMS_BYTES = 64 << 10  # a job's params, as JSON
JOB_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
# The states a job never leaves (jobs.lua keeps the same set).
TERMINAL_STATES = frozenset({"succeeded", "failed", "cancelled", "dead", "expired"})

Stage = str
TransportName = Literal["shm", "tcp", "verbs"]


class Message(msgspec.Struct, tag_field="type", forbid_unknown_fields=False, omit_defaults=True):
    """Base of every control message."""


# -- handshake -----------------------------------------------------------------------------


class Hello(Message, tag="hello"):
    version: int
    schema: str = ""
    client: str = ""
    rid: int = 0


class Welcome(Message, tag="welcome"):
    version: int
    schema: str
    broker_id: str
    rid: int = 0


# -- clients -------------------------------------------------------------------------------


class Submit(Message, tag="submit"):
    """Create a job. `job_id` is optional; the same id twice is one job (idempotent)."""

    params: dict[str, Any] = {}
    job_id: str | None = None
    pipeline: str = ""
    priority: int = 0
    # Wall clock, ms since the epoch (0: none): a job none of whose stages can start by then
    # ends "expired" at that stage's start instead of running there.
    deadline_ms: int = 0
    rid: int = 0


class Submitted(Message, tag="submitted"):
    job_id: str
    created: bool
    rid: int = 0


class GetStatus(Message, tag="status"):
    job_id: str
    rid: int = 0


class JobStatus(Message, tag="job"):
    """A job record as clients see it. `stages` maps stage name to its timings and attempt."""

    job_id: str
    state: str
    pipeline: str = ""
    params: dict[str, Any] = {}
    error: str = ""
    result: Any = None
    created_ms: int = 0
    updated_ms: int = 0
    stages: dict[str, dict[str, Any]] = {}
    stage: str = ""  # the stage the job is in, or ended in
    progress: float | None = None  # 0..1: the running stage's steps; 1.0 once succeeded
    rid: int = 0


class Cancel(Message, tag="cancel"):
    job_id: str
    rid: int = 0


class CancelResult(Message, tag="cancel_result"):
    job_id: str
    cancelled: bool
    state: str
    rid: int = 0


class Retry(Message, tag="retry"):
    """Run an ended job (failed, dead, cancelled, expired) again from the stage it ended in."""

    job_id: str
    rid: int = 0


class RetryResult(Message, tag="retry_result"):
    job_id: str
    retried: bool
    state: str  # queued:<stage> when retried; else the state that refused it
    rid: int = 0


class ListJobs(Message, tag="jobs"):
    """Jobs newest first. `state`: a state (`failed`, `denoising`, `queued:denoise`) or a
    group (`queued`, `running`, `active`, `ended`); `stage`: the stage a job is in or ended
    in; created in [since_ms, before_ms) (0: no bound)."""

    state: str = ""
    stage: str = ""
    since_ms: int = 0
    before_ms: int = 0
    limit: int = 50
    rid: int = 0


class JobList(Message, tag="job_list"):
    jobs: list[JobStatus] = []
    next_before_ms: int = 0  # pass as before_ms for the next page; 0: this was the last
    rid: int = 0


class Purge(Message, tag="purge"):
    """Delete ended jobs in `state` ("": any ended state) that ended over `older_than_s` ago."""

    older_than_s: float
    state: str = ""
    rid: int = 0


class Purged(Message, tag="purged"):
    purged: int
    rid: int = 0


# -- workers -------------------------------------------------------------------------------


class RingAttach(Message, tag="ring"):
    """How to reach one stage's ring, by any backend the broker offers."""

    stage: Stage
    shm_name: str = ""
    tcp_endpoint: str = ""
    host: str = ""
    verbs: dict[str, Any] = {}
    nbytes: int = 0


class Register(Message, tag="register"):
    worker_id: str
    stage: Stage
    host: str
    pid: int
    transport: TransportName = "shm"
    cells: int = 1  # lease cells wanted: the most dispatches the worker holds at once
    replaces: str = ""  # our previous identity, given up after a failed batch: drop it
    device: str = ""  # what the stage runs on: "cpu", "cuda" (see the heartbeat's `gpu`)
    rid: int = 0


class Registered(Message, tag="registered"):
    """The broker's answer: our lease cells in the consume ring, and where to hand on."""

    broker_id: str
    cell: int  # the first of `cells`
    consume: RingAttach
    produce: RingAttach | None = None
    next_stage: Stage = ""
    lease_ms: int = 10_000
    heartbeat_ms: int = 1000
    max_attempts: int = 3
    redis_url: str = ""
    namespace: str = ""
    # The store's settings, the deployment's (not each worker's own file): the events
    # stream's cap and how long an ended job's record is kept.
    events_maxlen: int = 100_000
    retention_s: float = 0.0
    cells: list[int] = []  # our lease cells, as many as Register asked for
    # Every priority lane's ring of each (common/ring/lanes.py); `consume` and `produce` are
    # their main lanes, which hold the lease cells.
    consume_lanes: list[RingAttach] = []
    produce_lanes: list[RingAttach] = []
    rid: int = 0


class GpuStats(msgspec.Struct, omit_defaults=True):
    """A worker's GPU as NVML sees it (the whole card), and this worker's own share."""

    index: int  # NVML's index of the card
    name: str = ""
    memory_used_mib: float = 0.0  # by every process on the card
    memory_total_mib: float = 0.0
    utilization_pct: float = 0.0  # of the last sample period, NVML's
    process_reserved_mib: float = 0.0  # held by this worker's torch allocator


class Heartbeat(Message, tag="heartbeat"):
    worker_id: str
    busy: bool = False
    jobs_done: int = 0  # attempts this worker committed since it started
    gpu: GpuStats | None = None
    session: str = ""  # our Mooncake session: a heartbeat proves it alive to the broker
    rid: int = 0


class HeartbeatAck(Message, tag="heartbeat_ack"):
    broker_id: str
    # Producers (Mooncake sessions) some worker failed to reach lately: pulls from them fail
    # at once, so the jobs that need them go back a stage instead of waiting out a timeout.
    dead_peers: list[str] = []
    revived_peers: list[str] = []  # peers found dead that have heartbeated since: trust again
    rid: int = 0


class Unregister(Message, tag="unregister"):
    worker_id: str
    rid: int = 0


class VerbsConnect(Message, tag="verbs_connect"):
    """A worker's RC QP details for one ring; answered by `VerbsAccept` with the broker's."""

    worker_id: str
    stage: Stage
    qp: dict[str, Any]
    rid: int = 0


class VerbsAccept(Message, tag="verbs_accept"):
    qp: dict[str, Any]
    rid: int = 0


class GetQueues(Message, tag="queues"):
    rid: int = 0


class QueueInfo(msgspec.Struct, omit_defaults=True):
    stage: Stage
    depth: int  # published, not yet claimed (ring occupancy)
    backlog: int = 0  # waiting in the broker for ring space
    in_flight: int = 0  # leases held
    workers: int = 0
    capacity: int = 0


class Queues(Message, tag="queue_list"):
    queues: list[QueueInfo]
    recovered: int = 0
    rid: int = 0


class GetWorkers(Message, tag="workers"):
    rid: int = 0


class WorkerInfo(msgspec.Struct, omit_defaults=True):
    worker_id: str
    stage: Stage
    host: str = ""
    pid: int = 0
    transport: str = ""
    device: str = ""
    busy: bool = False
    jobs: list[str] = []  # the jobs it holds leases for now
    step: str = ""  # the first job's step in this stage ("12/50"), when the stage reports one
    jobs_done: int = 0
    registered_ms: int = 0  # wall clock, ms since the epoch
    heartbeat_ms: int = 0  # the last heartbeat, likewise
    gpu: GpuStats | None = None


class WorkerList(Message, tag="worker_list"):
    workers: list[WorkerInfo]
    rid: int = 0


class Rewind(Message, tag="rewind"):
    """Worker to broker: this attempt's inputs are gone with their producer; run the previous
    stage again. The broker records it in Redis and publishes the previous stage's dispatch."""

    job_id: str
    stage: Stage
    attempt: int
    worker_id: str
    error: str = ""
    dead_peer: str = ""  # the producer's Mooncake session, when it could not be reached
    rid: int = 0


class RewindResult(Message, tag="rewind_result"):
    status: str  # "retry" (re-queued), "failed" (retries exhausted), or a fence refusal
    rid: int = 0


class Ack(Message, tag="ack"):
    rid: int = 0


class Error(Message, tag="error"):
    """Every failure reply. `code` is one of `errors.Code`."""

    code: str
    message: str
    retry_after_s: float = 0.0  # with "busy": when to submit again
    rid: int = 0


Request = (Hello | Submit | GetStatus | Cancel | Retry | ListJobs | Purge | GetQueues
           | GetWorkers | Register | Heartbeat | Unregister | VerbsConnect | Rewind)
Reply = (Welcome | Submitted | JobStatus | CancelResult | RetryResult | JobList | Purged | Queues
         | WorkerList | Registered | HeartbeatAck | VerbsAccept | RewindResult | Ack | Error)


def public(message: Message) -> dict[str, Any]:
    """A reply as users see it (the CLI's --json): its fields, without `type` and `rid`."""
    return {k: v for k, v in msgspec.to_builtins(message).items() if k not in ("type", "rid")}


def schema_hash() -> str:
    """A short hash of the message schemas: peers with different schemas refuse each other."""
    from .dispatch import Dispatch, Release  # they use this module's base and decode errors

    info = msgspec.json.encode(msgspec.json.schema(tuple[Request, Reply, Dispatch, Release]))
    return hashlib.sha256(info).hexdigest()[:16]


def check_job_id(job_id: str) -> str:
    if not JOB_ID.match(job_id):
        raise ProtocolError(f"job id must match {JOB_ID.pattern}, got {job_id[:80]!r}")
    return job_id


def check_priority(priority: int) -> int:
    if not -(1 << 63) <= priority < (1 << 63):
        raise ProtocolError(f"priority must fit a signed 64-bit integer, got {priority}")
    return priority


def check_deadline(deadline_ms: int) -> int:
    """A submit's deadline: 0 (none) or wall-clock ms since the epoch. One already past is
    taken, and its job expires at its first stage's start: the client sees `expired`."""
    if not 0 <= deadline_ms < (1 << 63):
        raise ProtocolError(f"deadline_ms must be 0 or ms since the epoch, got {deadline_ms}")
    return deadline_ms


def check_params(params: dict[str, Any]) -> bytes:
    """The params as the JSON stored in Redis; ProtocolError if too large or not JSON."""
    try:
        blob = msgspec.json.encode(params)
    except (TypeError, msgspec.EncodeError) as exc:  # e.g. a msgpack Ext value
        raise ProtocolError(f"params must be JSON values: {exc}") from None
    if len(blob) > MAX_PARAMS_BYTES:
        raise ProtocolError(f"params of {len(blob)} bytes > limit of {MAX_PARAMS_BYTES}")
    return blob


def error_reply(exc: Exception, rid: int = 0) -> Error:
    code = getattr(exc, "code", Code.INTERNAL)
    return Error(code=str(code), message=str(exc), rid=rid,
                 retry_after_s=getattr(exc, "retry_after_s", 0.0))
