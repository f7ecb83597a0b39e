"""The native API: `/v1/jobs`, `/v1/queues`, `/metrics`, `/healthz`.

    POST   /v1/jobs                  submit {"params": {...}, "job_id"?, "priority"?}
    GET    /v1/jobs?state&stage&since_ms&before_ms&limit
                                     newest first, filtered (common/jobquery.py)
    GET    /v1/jobs/{id}             the job, its stages and denoise progress
    DELETE /v1/jobs/{id}             cancel
    POST   /v1/jobs/{id}/retry       run an ended job again from the stage it ended in
    GET    /v1/jobs/{id}/wait        the job once it ended, or after ?timeout_s (no polling)
    GET    /v1/jobs/{id}/events      its transitions: waits, runs, retries, errors
    GET    /v1/jobs/{id}/result      the result file (?file=image|video|frames) or its JSON
    GET    /v1/queues                per stage: depth, oldest age, ring, in flight, workers
    GET    /v1/pipeline              the stages and the params schema (JSON Schema), defaults
    GET    /v1/workers               every worker: stage, host, pid, device, busy, its jobs
                                     and step, jobs done, last heartbeat, GPU memory and use
    GET    /v1/history               per stage over the last hour: attempts done and failed,
                                     run time, queue depth (the dashboard's charts)
"""

from __future__ import annotations

import mimetypes

from starlette.requests import Request
from starlette.responses import FileResponse, Response

from ...common import wire
from ...common.errors import Code
from ...common.jobquery import GROUPS, JobFilter
from ...common.wire import TERMINAL_STATES
from .history import HistoryView
from .http import HTTPError, Op, Param, in_thread, json_response, query_int, read_json
from ...common.httpwire import (
    Cancelled, ErrorBody, Job, JobEvents, JobList, Queues, Retried, Submitted, SubmitRequest,
    Workers,
)

JOB_ID_PARAM = Param("job_id", "path", {"type": "string", "pattern": r"^[A-Za-z0-9_.:-]{1,64}$"},
                     required=True)
MAX_PAGE = 1000
MAX_MS = 2**62
MAX_WAIT_S = 600


def _state(request: Request):
    return request.app.state


async def submit(request: Request) -> Response:
    app = _state(request)
    body = await read_json(request, SubmitRequest, app.submit_body_bytes)
    params = body.params
    if params.get("image") is not None and app.inputs.takes_images is not None:
        # base64, a URL, a path (or a list of them): stored and checked, then named
        params = {**params, "image": await in_thread(app.inputs.store, params["image"],
                                                      "params.image")}
    submitted = await in_thread(app.observer.submit, params, body.job_id, body.priority,
                                body.deadline_ms)
    status = 202 if submitted.via == "ingress" else 201 if submitted.created else 200
    return json_response(submitted, status, {"Location": f"/v1/jobs/{submitted.job_id}"})


async def list_jobs(request: Request) -> Response:
    active = request.query_params.get("active", "false")
    if active not in ("true", "false"):
        raise HTTPError(400, Code.BAD_REQUEST, f"active must be true or false, got {active[:20]!r}")
    query = JobFilter(
        state=request.query_params.get("state", "active" if active == "true" else ""),
        stage=request.query_params.get("stage", ""),
        since_ms=query_int(request, "since_ms", 0, 0, MAX_MS),
        before_ms=query_int(request, "before_ms", 0, 0, MAX_MS),
        limit=query_int(request, "limit", 50, 1, MAX_PAGE))
    jobs, next_before_ms = await in_thread(_state(request).observer.find, query)
    return json_response(JobList(jobs=jobs, next_before_ms=next_before_ms or None))


async def get_job(request: Request) -> Response:
    return json_response(await _job(request))


async def cancel_job(request: Request) -> Response:
    job_id = request.path_params["job_id"]
    result = await in_thread(_state(request).observer.cancel, job_id)
    return json_response(Cancelled(job_id=job_id, cancelled=result.cancelled, state=result.state))


async def retry_job(request: Request) -> Response:
    job_id = request.path_params["job_id"]
    result = await in_thread(_state(request).observer.call, wire.Retry(job_id=job_id))
    return json_response(Retried(job_id=job_id, retried=result.retried, state=result.state))


async def wait_job(request: Request) -> Response:
    """The job once it has ended, or as it is after `timeout_s` (at most MAX_WAIT_S)."""
    job_id = request.path_params["job_id"]
    timeout_s = query_int(request, "timeout_s", 30, 0, MAX_WAIT_S)
    app = _state(request)
    job = await _job(request)
    if job.state not in TERMINAL_STATES and timeout_s:
        await app.waiters.wait(job_id, timeout_s, lambda: app.observer.ended(job_id))
        job = await _job(request)
    return json_response(job)


async def job_events(request: Request) -> Response:
    job = await _job(request)
    events = await in_thread(_state(request).observer.events, job)
    return json_response(JobEvents(job_id=job.job_id, events=events))


async def job_result(request: Request) -> Response:
    job = await _job(request)
    if job.state != "succeeded":
        detail = f": {job.error}" if job.error else ""
        raise HTTPError(409, Code.NOT_READY, f"job {job.job_id} is {job.state}{detail}")
    kind = request.query_params.get("file")
    path = _state(request).observer.result_file(job, kind)
    if path is None:
        if kind or job.files():
            raise HTTPError(404, Code.NOT_FOUND,
                            f"job {job.job_id} has no servable result file {kind or ''}".strip())
        return json_response(job.result)
    if not path.is_file():
        raise HTTPError(404, Code.NOT_FOUND, f"result file {path.name} is not on this host")
    media = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return FileResponse(path, media_type=media, filename=path.name,
                        content_disposition_type="inline")


async def queues(request: Request) -> Response:
    return json_response(await in_thread(_state(request).observer.queues))


async def pipeline(request: Request) -> Response:
    return json_response(_state(request).pipeline)


async def workers(request: Request) -> Response:
    listing = await in_thread(_state(request).observer.broker_workers)
    if listing is None:
        raise HTTPError(503, Code.UNAVAILABLE, "the broker is unreachable")
    return json_response(Workers(workers=listing.workers))


async def history(request: Request) -> Response:
    return json_response(_state(request).metrics.history.view())


async def metrics(request: Request) -> Response:
    text = await in_thread(_state(request).metrics.render)
    return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")


async def healthz(request: Request) -> Response:
    return json_response({"ok": True})


async def _job(request: Request) -> Job:
    job_id = request.path_params["job_id"]
    job = await in_thread(_state(request).observer.job, job_id)
    if job is None:
        raise HTTPError(404, Code.NOT_FOUND, f"no job {job_id}")
    return job


_ERRORS = {400: ErrorBody, 404: ErrorBody, 422: ErrorBody, 503: ErrorBody}

OPS = [
    Op("POST", "/v1/jobs", submit, "Submit a job", "jobs", body=SubmitRequest,
       responses={201: Submitted, 200: Submitted, 202: Submitted, 413: ErrorBody,
                  429: ErrorBody, **_ERRORS}),
    Op("GET", "/v1/jobs", list_jobs, "List jobs, newest first", "jobs",
       responses={200: JobList, **_ERRORS},
       params=(Param("state", "query", lambda config: {"type": "string", "enum": [
                         *GROUPS, *sorted(TERMINAL_STATES),
                         *(f"queued:{s.name}" for s in config.pipeline.stages),
                         *(s.job_state() for s in config.pipeline.stages)]},
                     "a state (failed, denoising, queued:denoise) or a group: queued, running, "
                     "active, ended"),
               Param("stage", "query", lambda config: {
                         "type": "string", "enum": [s.name for s in config.pipeline.stages]},
                     "the stage a job is in, or ended in"),
               Param("since_ms", "query", {"type": "integer", "minimum": 0, "maximum": MAX_MS},
                     "only jobs created at or after this (epoch ms)"),
               Param("before_ms", "query", {"type": "integer", "minimum": 0, "maximum": MAX_MS},
                     "only jobs created before this (the previous page's next_before_ms)"),
               Param("limit", "query", {"type": "integer", "minimum": 1, "maximum": MAX_PAGE}),
               Param("active", "query", {"type": "string", "enum": ["true", "false"]},
                     "state=active"))),
    Op("GET", "/v1/jobs/{job_id}", get_job, "Get a job", "jobs",
       responses={200: Job, **_ERRORS}, params=(JOB_ID_PARAM,)),
    Op("DELETE", "/v1/jobs/{job_id}", cancel_job, "Cancel a job", "jobs",
       responses={200: Cancelled, **_ERRORS}, params=(JOB_ID_PARAM,)),
    Op("POST", "/v1/jobs/{job_id}/retry", retry_job, "Run an ended job again", "jobs",
       responses={200: Retried, 409: ErrorBody, **_ERRORS}, params=(JOB_ID_PARAM,)),
    Op("GET", "/v1/jobs/{job_id}/wait", wait_job, "The job once it has ended", "jobs",
       responses={200: Job, **_ERRORS},
       params=(JOB_ID_PARAM, Param("timeout_s", "query",
                                   {"type": "integer", "minimum": 0, "maximum": MAX_WAIT_S},
                                   "answer as the job is after this long (default 30)"))),
    Op("GET", "/v1/jobs/{job_id}/events", job_events, "A job's transitions", "jobs",
       responses={200: JobEvents, **_ERRORS}, params=(JOB_ID_PARAM,)),
    Op("GET", "/v1/jobs/{job_id}/result", job_result, "A finished job's result", "jobs",
       responses={200: ("image/png", "video/mp4", "application/octet-stream",
                        "application/json"), 409: ErrorBody, **_ERRORS},
       params=(JOB_ID_PARAM, Param("file", "query", {"type": "string"},
                                   "which result file: image, video or frames"))),
    Op("GET", "/v1/queues", queues, "Queue depth and workers per stage", "queues",
       responses={200: Queues, 503: ErrorBody}),
    Op("GET", "/v1/pipeline", pipeline, "The stages and the jobs' params schema", "queues",
       responses={200: ("application/json",)}),
    Op("GET", "/v1/workers", workers, "Every live worker, its jobs and its GPU", "queues",
       responses={200: Workers, 503: ErrorBody}),
    Op("GET", "/v1/history", history, "Per stage over the last hour: done, failed, depth",
       "queues", responses={200: HistoryView}),
    Op("GET", "/metrics", metrics, "Prometheus metrics", "operations",
       responses={200: ("text/plain",), 503: ErrorBody}),
    Op("GET", "/healthz", healthz, "Liveness", "operations", responses={200: ("application/json",)},
       public=True),
]
