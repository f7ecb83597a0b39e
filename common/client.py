"""A ZMQ client of the broker's control socket: handshake, then one request at a time.

Used by the CLI, the worker runtime and tests. Any-language clients do the same with one
DEALER socket: send `hello`, then requests; see docs/wire.md.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any

import zmq

from . import wire
from .frames import Codec
from .errors import Code, RemoteError, TransportError
from .security import Keys, connect_curve


class BrokerClient:
    """Not thread-safe: one per thread. Every call has a timeout; `close` releases the socket."""

    def __init__(self, endpoint: str, *, timeout_s: float = 10.0, name: str = "",
                 keys: Keys | None = None):
        """`keys`: CURVE keys for a broker that has them (default: from the environment,
        STAGEPOOL_SECURITY_KEYS_DIR)."""
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self._codec = Codec(wire.Reply)
        self._ctx = zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        # A send with no connection up (a handshake refused, a broker restarting) waits at
        # most this long instead of forever.
        self._sock.setsockopt(zmq.SNDTIMEO, int(timeout_s * 1000))
        connect_curve(self._sock, keys if keys is not None else Keys.from_env())
        self._sock.connect(endpoint)
        self._rid = 0
        self._name = name or f"{socket.gethostname()}:{os.getpid()}"
        try:
            self.welcome: wire.Welcome = self._hello()
        except BaseException:
            self.close()
            raise

    def _hello(self) -> wire.Welcome:
        return self._call(wire.Hello(version=wire.PROTOCOL_VERSION, schema=wire.schema_hash(),
                                     client=self._name))

    def call(self, request, timeout_s: float | None = None):
        """Send one request; return its reply, or raise RemoteError / TransportError. A
        restarted broker has forgotten our handshake: we greet it again and ask once more."""
        try:
            return self._call(request, timeout_s)
        except RemoteError as exc:
            if exc.code != Code.HANDSHAKE or isinstance(request, wire.Hello):
                raise
        self.welcome = self._hello()
        return self._call(request, timeout_s)

    def _call(self, request, timeout_s: float | None = None):
        self._send(request)
        deadline = time.monotonic() + (timeout_s or self.timeout_s)
        while True:
            remaining_ms = int((deadline - time.monotonic()) * 1000)
            if remaining_ms <= 0 or not self._sock.poll(remaining_ms):
                raise TransportError(f"no reply from broker at {self.endpoint}")
            reply, _ = self._codec.decode(self._sock.recv())
            if reply.rid == request.rid:
                break
        if isinstance(reply, wire.Error):
            raise RemoteError(reply.code, reply.message, reply.retry_after_s)
        return reply

    def _send(self, request) -> int:
        """Stamp the next rid on `request` and send it; returns the rid."""
        self._rid += 1
        request.rid = self._rid
        try:
            frame = self._codec.encode(request)
        except OverflowError:  # an int beyond 64 bits: JSON carries it, and the broker speaks it
            frame = self._codec.encode(request, as_json=True)
        try:
            self._sock.send(frame)
        except zmq.Again:
            raise TransportError(f"broker at {self.endpoint} not reachable (send timed out)") from None
        return self._rid

    def submit(self, params: dict[str, Any] | None = None, job_id: str | None = None,
               priority: int = 0, deadline_ms: int = 0) -> wire.Submitted:
        return self.call(wire.Submit(params=params or {}, job_id=job_id, priority=priority,
                                     deadline_ms=deadline_ms))

    def submit_many(self, jobs: list[dict[str, Any]], window: int = 256) -> list:
        """Submit many jobs, pipelined: up to `window` requests in flight, so the broker can
        write a burst to Redis in one round trip. `jobs` holds Submit fields (params, job_id,
        priority, pipeline); the answer has, in order, a `Submitted` or a `RemoteError` each."""
        answers: list = [None] * len(jobs)
        pending: dict[int, int] = {}  # rid -> index
        sent = 0
        deadline = time.monotonic() + self.timeout_s
        while sent < len(jobs) or pending:
            while sent < len(jobs) and len(pending) < window:
                pending[self._send(wire.Submit(**jobs[sent]))] = sent
                sent += 1
            remaining_ms = int((deadline - time.monotonic()) * 1000)
            if remaining_ms <= 0 or not self._sock.poll(remaining_ms):
                raise TransportError(f"no reply from broker at {self.endpoint}")
            reply, _ = self._codec.decode(self._sock.recv())
            index = pending.pop(reply.rid, None)
            if index is None:
                continue
            deadline = time.monotonic() + self.timeout_s
            answers[index] = (RemoteError(reply.code, reply.message, reply.retry_after_s)
                              if isinstance(reply, wire.Error) else reply)
        return answers

    def status(self, job_id: str) -> wire.JobStatus:
        return self.call(wire.GetStatus(job_id=job_id))

    def cancel(self, job_id: str) -> wire.CancelResult:
        return self.call(wire.Cancel(job_id=job_id))

    def retry(self, job_id: str) -> wire.RetryResult:
        return self.call(wire.Retry(job_id=job_id))

    def jobs(self, state: str = "", stage: str = "", since_ms: int = 0, before_ms: int = 0,
             limit: int = 50) -> wire.JobList:
        return self.call(wire.ListJobs(state=state, stage=stage, since_ms=since_ms,
                                       before_ms=before_ms, limit=limit))

    def purge(self, older_than_s: float, state: str = "") -> wire.Purged:
        return self.call(wire.Purge(older_than_s=older_than_s, state=state), timeout_s=120)

    def queues(self) -> wire.Queues:
        return self.call(wire.GetQueues())

    def workers(self) -> wire.WorkerList:
        return self.call(wire.GetWorkers())

    def close(self) -> None:
        self._sock.close(linger=0)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
