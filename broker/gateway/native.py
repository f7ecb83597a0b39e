"""The native API: `/v1/jobs`, `/v1/queues`, `/metrics`, `/healthz`.

    POST   /v1/jobs                  submit {"params": {...}, "job_id"?, "priority"?}
    GET    /v1/jobs?limit&before_ms  newest first; `active=true` for unfinished jobs only
    GET    /v1/jobs/{id}             the job, its stages and denoise progress
    DELETE /v1/jobs/{id}             cancel
    GET    /v1/jobs/{id}/result      the result file (?file=image|video|frames) or its JSON
    GET    /v1/queues                per stage: depth, oldest age, ring, in flight, workers
    GET    /v1/pipeline              the stages and the params schema (JSON Schema), defaults
    GET    /v1/workers               every worker: stage, host, pid, device, busy, its jobs
                                     and step, jobs done, last heartbeat, GPU memory and use
"""

from __future__ import annotations

import mimetypes

from starlette.requests import Request
from starlette.responses import FileResponse, Response

from ...common.errors import Code
from .http import HTTPError, Op, Param, in_thread, json_response, query_int, read_json
from .schema import (
    Cancelled, ErrorBody, Job, JobList, Queues, Submitted, SubmitRequest, Workers,
)

JOB_ID_PARAM = Param("job_id", "path", {"type": "string", "pattern": r"^[A-Za-z0-9_.:-]{1,64}$"},
                     required=True)
MAX_PAGE = 1000
MAX_MS = 2**62


def _state(request: Request):
    return request.app.state


async def submit(request: Request) -> Response:
    app = _state(request)
    body = await read_json(request, SubmitRequest, app.max_body_bytes)
    submitted = await in_thread(app.observer.submit, body.params, body.job_id, body.priority,
                                body.deadline_ms)
    status = 202 if submitted.via == "ingress" else 201 if submitted.created else 200
    return json_response(submitted, status, {"Location": f"/v1/jobs/{submitted.job_id}"})


async def list_jobs(request: Request) -> Response:
    limit = query_int(request, "limit", 50, 1, MAX_PAGE)
    before_ms = query_int(request, "before_ms", None, 0, MAX_MS)
    active = request.query_params.get("active", "false")
    if active not in ("true", "false"):
        raise HTTPError(400, Code.BAD_REQUEST, f"active must be true or false, got {active[:20]!r}")
    jobs = await in_thread(_state(request).observer.jobs, limit + 1, before_ms, active == "true")
    more = len(jobs) > limit
    jobs = jobs[:limit]
    return json_response(JobList(jobs=jobs, next_before_ms=jobs[-1].created_ms if more else None))


async def get_job(request: Request) -> Response:
    return json_response(await _job(request))


async def cancel_job(request: Request) -> Response:
    job_id = request.path_params["job_id"]
    result = await in_thread(_state(request).observer.cancel, job_id)
    return json_response(Cancelled(job_id=job_id, cancelled=result.cancelled, state=result.state))


async def job_result(request: Request) -> Response:
    job = await _job(request)
    if job.state != "succeeded":
        detail = f": {job.error}" if job.error else ""
        raise HTTPError(409, "not_ready", f"job {job.job_id} is {job.state}{detail}")
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
       params=(Param("limit", "query", {"type": "integer", "minimum": 1, "maximum": MAX_PAGE}),
               Param("before_ms", "query", {"type": "integer", "minimum": 0, "maximum": MAX_MS},
                     "only jobs created before this (the previous page's next_before_ms)"),
               Param("active", "query", {"type": "string", "enum": ["true", "false"]},
                     "only jobs not yet ended"))),
    Op("GET", "/v1/jobs/{job_id}", get_job, "Get a job", "jobs",
       responses={200: Job, **_ERRORS}, params=(JOB_ID_PARAM,)),
    Op("DELETE", "/v1/jobs/{job_id}", cancel_job, "Cancel a job", "jobs",
       responses={200: Cancelled, **_ERRORS}, params=(JOB_ID_PARAM,)),
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
    Op("GET", "/metrics", metrics, "Prometheus metrics", "operations",
       responses={200: ("text/plain",), 503: ErrorBody}),
    Op("GET", "/healthz", healthz, "Liveness", "operations", responses={200: ("application/json",)},
       public=True),
]
