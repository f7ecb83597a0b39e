"""Ingress: jobs written straight into Redis by any language.

    XADD {ns}:ingress * job '{"params": {...}, "job_id": "optional", "priority": 0}'

A thread reads the stream through a consumer group, submits each entry like a ZMQ `Submit`,
and acknowledges it after the job record exists: a broker killed in between re-reads its
pending entries at start, and submission is idempotent on job id (an entry without one takes
`ingress-<entry id>`), so nothing is lost or doubled. An entry that does not decode, or that
breaks its handler in any way, is acknowledged and reported: as a `failed` job record when it
names a usable job id (so its sender can read the error), and always as a `rejected` event.
Only Redis being away or the deployment being busy leaves an entry pending, to be read again.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import msgspec

from ..common.errors import Busy, ProtocolError, StagepoolError, StoreUnavailable, TransportError
from ..common import transitions as tx
from ..common import wire
from ..common.frames import DECODE_ERRORS
from ..common.jobstore import JobStore
from ..common.wire import JOB_ID

log = logging.getLogger(__name__)

_BATCH = 100
_BLOCK_MS = 500
_KEEP_BYTES = 4096  # of a rejected entry, kept on {ns}:ingress:rejected
_REJECTED_KEPT = 10_000  # entries that stream keeps (approximately)


class IngressJob(msgspec.Struct, forbid_unknown_fields=True):
    params: dict[str, Any] = {}
    job_id: str | None = None
    pipeline: str = ""
    priority: int = 0
    deadline_ms: int = 0


_decoder = msgspec.json.Decoder(IngressJob)


class Ingress:
    def __init__(self, store: JobStore, submit, consumer: str = "broker"):
        """`submit(wire.Submit)` is the broker's submit path."""
        self.store = store
        self.submit = submit
        self.consumer = consumer
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.store.ensure_ingress_group()
        self._thread = threading.Thread(target=self._run, name="ingress", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        pending = True  # first our own unacknowledged entries from a previous life
        while not self._stop.is_set():
            try:
                entries = self.store.read_ingress(self.consumer, _BATCH, _BLOCK_MS, pending)
                if pending and not entries:
                    pending = False
                    continue
                handled = []
                try:
                    for entry_id, fields in entries:
                        try:
                            self.handle(entry_id, fields)
                        except (Busy, StoreUnavailable, TransportError):
                            raise  # the entry is fine: read it again later
                        except Exception as exc:  # a poison entry: never retried forever
                            log.exception("ingress entry %r broke its handler", entry_id)
                            self._reject(entry_id, fields.get(b"job"),
                                         f"internal error on this entry: {type(exc).__name__}")
                        handled.append(entry_id)
                except Busy as exc:
                    # The rest stay pending in the stream (nothing is lost): read them again
                    # once the first ring has drained.
                    log.info("ingress: %s; waiting %.1f s", exc, exc.retry_after_s)
                    pending = True
                    self._stop.wait(exc.retry_after_s)
                self.store.ack_ingress(handled)
            except StagepoolError:
                log.warning("ingress: redis unavailable; retrying", exc_info=True)
                pending = True  # what this read left unacknowledged is read again first
                self._stop.wait(1.0)
            except Exception:
                log.exception("ingress loop error; continuing")
                self._stop.wait(0.1)

    def handle(self, entry_id: bytes, fields: dict[bytes, bytes]) -> None:
        """Submit one entry; never raises for bad input."""
        raw = fields.get(b"job")
        try:
            if raw is None:
                raise ProtocolError("entry has no 'job' field")
            try:
                job = _decoder.decode(raw)
            except DECODE_ERRORS as exc:
                raise ProtocolError(f"bad job JSON: {type(exc).__name__}: "
                                    f"{str(exc)[:200]}") from None
            # Without an id, the entry's own: an entry read again (after a restart or an
            # outage) is the same job, never a second one.
            job_id = job.job_id if job.job_id is not None else f"ingress-{entry_id.decode()}"
            self.submit(wire.Submit(params=job.params, job_id=job_id,
                                    pipeline=job.pipeline, priority=job.priority,
                                    deadline_ms=job.deadline_ms))
        except ProtocolError as exc:
            self._reject(entry_id, raw, str(exc))

    def _reject(self, entry_id: bytes, raw: bytes | None, reason: str) -> None:
        log.warning("ingress entry %s rejected: %s", entry_id.decode(), reason)
        job_id = _salvage_job_id(raw)
        if job_id:
            self.store.apply(tx.Reject(job_id, f"rejected at ingress: {reason}"))
        self.store.redis.xadd(
            self.store.keys.events,
            {"job": job_id or "", "event": "rejected", "entry": entry_id, "detail": reason[:500]},
            maxlen=self.store.events_maxlen, approximate=True,
        )
        # The entry itself (its first 4 KiB), for inspection, on a bounded stream.
        self.store.redis.xadd(
            self.store.keys.ingress_rejected,
            {"entry": entry_id, "job": (raw or b"")[:_KEEP_BYTES], "error": reason[:500]},
            maxlen=_REJECTED_KEPT, approximate=True,
        )


def _salvage_job_id(raw: bytes | None) -> str:
    try:
        value = msgspec.json.decode(raw or b"")
    except DECODE_ERRORS:
        return ""
    job_id = value.get("job_id") if isinstance(value, dict) else None
    return job_id if isinstance(job_id, str) and JOB_ID.match(job_id) else ""
