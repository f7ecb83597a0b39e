"""The broker's door for jobs (every submit's params checked: `admit`) and its answers about
them: status, cancel, retry, list and purge.

A cancel also stops the running attempt at its next step, through its lease cell's stop word
(no Redis read in the step loop). A retry revives an ended job at the stage it ended in with a
fresh attempt and publishes it there: the stage pulls its inputs if their producer still holds
them, and otherwise sends the job back to the stage before (the worker's `Rewind`), so a retry
never needs more than what is lost.
"""

from __future__ import annotations

import logging

from ..common import transitions as tx
from ..common import wire
from ..common.blobs import BlobStore
from ..common.config import Config
from ..common.errors import Code, InvalidParams
from ..common.jobquery import JobFilter, find
from ..common.jobstore import JobStore, job_status
from ..common.wire import CancelResult, Error, JobList, Purged, RetryResult
from ..stages.families import params as schemas
from ..stages.families import pipeline_schema
from .dispatcher import Dispatcher
from .ringhost import RingHost

log = logging.getLogger(__name__)

_PURGE_PAGE = 500


class JobDesk:
    def __init__(self, config: Config, store: JobStore, ringhost: RingHost,
                 dispatcher: Dispatcher):
        self.store = store
        self.ringhost = ringhost
        self.dispatcher = dispatcher
        self.config = config
        self.stage_names = [s.name for s in config.pipeline.stages]
        self.running_states = [s.job_state() for s in config.pipeline.stages]
        # The jobs' params schema (their family's): every submit is checked against it.
        self.params_schema = pipeline_schema(config.pipeline.stages)
        self.takes_images = schemas.takes_images(self.params_schema)
        self.loras = schemas.configured_loras(config.pipeline.stages)
        self.blobs = BlobStore(store, config.inputs.ttl_s)  # image-conditioned jobs' inputs
        self.longest_limit_s = max(s.time_limit_s for s in config.pipeline.stages)

    def admit(self, params: dict) -> None:
        """InvalidParams (naming the field) unless a job with `params` can run here: they fit
        the family's schema, name a stored image within the limits where the pipeline takes
        one (and none where it does not), a LoRA the denoise stage serves, a time limit some
        stage allows. From ZMQ, HTTP or the ingress stream alike: no stage sees a bad job."""
        if self.params_schema is not None:
            if "image" in params and not self.takes_images:
                raise InvalidParams(f"image: pipeline {self.config.pipeline.name!r} takes no "
                                    "image (it is text-only); nothing was queued")
            schemas.check(self.params_schema, params)
            for ref in schemas.image_refs(params):
                self.blobs.check(ref, self.config.inputs)
            schemas.check_lora(params, self.loras)
        schemas.check_time_limit(params, self.longest_limit_s)

    def status(self, job_id: str):
        record = self.store.get(wire.check_job_id(job_id))
        if record is None:
            return Error(code=Code.NOT_FOUND, message=f"no job {job_id}")
        return job_status(job_id, record, self.stage_names)

    def cancel(self, job_id: str):
        outcome = self.store.apply(tx.Cancel(wire.check_job_id(job_id)))
        if outcome.status == "missing":
            return Error(code=Code.NOT_FOUND, message=f"no job {job_id}")
        if outcome.ok:
            self._stop_running(job_id)
        state = outcome.values[0].decode() if outcome.values else "cancelled"
        return CancelResult(job_id=job_id, cancelled=outcome.ok, state=state)

    def retry(self, job_id: str):
        outcome = self.store.apply(tx.Revive(wire.check_job_id(job_id)))
        if outcome.status == "missing":
            return Error(code=Code.NOT_FOUND, message=f"no job {job_id}")
        if outcome.status != "retry":
            state = outcome.values[0].decode()
            why = ("a succeeded job is not run again: submit it anew" if state == "succeeded"
                   else "it was refused at the door and never ran" if state == "failed"
                   else f"it is {state}: only an ended job is retried")
            return Error(code=Code.CONFLICT, message=f"job {job_id} not retried: {why}")
        attempt, dispatch, stage = outcome.values
        stage = stage.decode()
        self.dispatcher.republish(stage, dispatch, int(attempt))
        log.info("job %s retried from %s (attempt %s)", job_id, stage, int(attempt))
        return RetryResult(job_id=job_id, retried=True, state=f"queued:{stage}")

    def list(self, request: wire.ListJobs) -> JobList:
        query = JobFilter(state=request.state, stage=request.stage, since_ms=request.since_ms,
                          before_ms=request.before_ms, limit=request.limit)
        query.check(self.stage_names, self.running_states)
        jobs, next_before_ms = find(self.store, query, self.stage_names)
        return JobList(jobs=jobs, next_before_ms=next_before_ms)

    def purge(self, request: wire.Purge):
        """Delete the ended jobs in `state` that ended over `older_than_s` ago; an unfinished
        job is never touched."""
        if request.state and request.state not in wire.TERMINAL_STATES:
            return Error(code=Code.BAD_REQUEST, message=(
                f"purge takes an ended state ({', '.join(sorted(wire.TERMINAL_STATES))}), "
                f"not {request.state!r}"))
        if not request.older_than_s >= 0:
            return Error(code=Code.BAD_REQUEST, message="older_than_s must be >= 0")
        before_ms = self.store.now_ms() - int(request.older_than_s * 1000)
        purged = offset = 0
        while True:  # a job ends after it was created: only those created before can match
            ids = self.store.redis.zrangebyscore(self.store.keys.jobs, "-inf", f"({before_ms}",
                                                 start=offset, num=_PURGE_PAGE)
            if not ids:
                break
            outcomes = self.store.run([tx.Purge(i.decode(), request.state, before_ms)
                                       for i in ids])
            purged += sum(o.ok for o in outcomes)
            offset += sum(o.status == "kept" for o in outcomes)  # the others left the set
        log.info("purged %d %s jobs that ended over %.0f s ago", purged,
                 request.state or "ended", request.older_than_s)
        return Purged(purged=purged)

    def _stop_running(self, job_id: str) -> None:
        """Ask the worker running `job_id`, if any, to stop at its next step (its lease cell's
        stop word): the GPU is free within a step, with no Redis read in the step loop."""
        for stage, ring in self.ringhost.rings.items():
            for cell in range(ring.layout.cells):
                lease = ring.read_lease(cell)
                if lease is not None and lease.job_id == job_id:
                    ring.request_stop(cell, lease.gen)
                    log.info("job %s cancelled: asked %s cell %d to stop", job_id, stage, cell)

