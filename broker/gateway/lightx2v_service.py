"""LightX2V's service routes: what its operators' and multi-server scripts poll, and its file
downloads (the task routes are lightx2v.py's).

    DELETE /v1/tasks/all/running     every unfinished task cancelled
    GET    /v1/service/status        service_status idle | busy, counts
    GET    /v1/service/metadata      nproc_per_node, model_cls, model_path
    GET    /v1/files/download/{name} a result by its save_result_path (403 outside)
    GET    /health                   liveness, without the token
"""

from __future__ import annotations

import mimetypes

from starlette.requests import Request
from starlette.responses import FileResponse, Response

from ...common.errors import Code, RemoteError
from ...common.httpwire import ErrorBody, ServiceStatus, StopTaskResponse
from .http import HTTPError, Op, Param, in_thread, json_response


def default_frames(config) -> int | None:
    """How many frames the pipeline's jobs make by default (None: no model family)."""
    from ...stages.families import pipeline_schema
    from ...stages.families.params import defaults

    schema = pipeline_schema(config.pipeline.stages)
    return None if schema is None else defaults(schema).get("num_frames", 1)


def makes_images(config) -> bool:
    """A pipeline whose jobs make one image by default (the sync route's)."""
    return default_frames(config) == 1


async def stop_all(request: Request) -> Response:
    observer = request.app.state.observer

    def cancel_all() -> int:
        cancelled = 0
        for job_id in list(observer.store.active_ids()):
            try:
                cancelled += observer.cancel(job_id).cancelled
            except RemoteError:
                pass  # ended meanwhile
        return cancelled

    count = await in_thread(cancel_all)
    return json_response(StopTaskResponse(stop_status="success",
                                          reason=f"All tasks stopped successfully ({count})."))


async def service_status(request: Request) -> Response:
    """What LightX2V's multi-server scripts poll: `service_status` idle or busy."""
    observer = request.app.state.observer

    def gather() -> ServiceStatus:
        running = [j.job_id for j in observer.jobs(100, active_only=True)
                   if not j.state.startswith("queued:")]
        totals = observer.store.totals()
        queues = observer.queues()
        return ServiceStatus(
            service_status="busy" if running else "idle",
            current_task=running[0] if running else None, active_tasks=running,
            pending_tasks=queues.stages[0].depth, queue_size=observer.config.ring.capacity,
            total_tasks=totals["jobs"], completed_tasks=totals["results"],
            failed_tasks=totals["dead"])

    return json_response(await in_thread(gather))


async def service_metadata(request: Request) -> Response:
    config = request.app.state.observer.config
    model_stages = [s for s in config.pipeline.stages if "family" in s.options]
    main = next((s for s in model_stages if s.kind == "denoise"), None)
    return json_response({
        "nproc_per_node": sum(s.workers for s in config.pipeline.stages),
        "model_cls": main.options["family"] if main else config.pipeline.name,
        "model_path": main.options.get("model_path", "") if main else "",
        "pipeline": config.pipeline.name,
        "stages": [s.name for s in config.pipeline.stages],
    })


async def download(request: Request) -> Response:
    """A result by its name under a results directory (a task's `save_result_path`); 403 for
    anything outside them."""
    observer = request.app.state.observer
    name = request.path_params["file_path"]
    for root in observer.results_dirs:
        target = (root / name).resolve()
        if not target.is_relative_to(root):
            raise HTTPError(403, "forbidden", "Access to this file is not allowed")
        if target.is_file():
            media = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
            return FileResponse(target, media_type=media, filename=target.name)
    raise HTTPError(404, Code.NOT_FOUND, f"File not found: {name}")


async def health(request: Request) -> Response:
    return json_response({"status": "healthy"})


OPS = [
    Op("DELETE", "/v1/tasks/all/running", stop_all, "Stop every task (LightX2V)", "lightx2v",
       responses={200: StopTaskResponse, 503: ErrorBody}),
    Op("GET", "/v1/service/status", service_status, "Service status (LightX2V)", "lightx2v",
       responses={200: ServiceStatus, 503: ErrorBody}),
    Op("GET", "/v1/service/metadata", service_metadata, "Service metadata (LightX2V)",
       "lightx2v", responses={200: ("application/json",)}),
    Op("GET", "/v1/files/download/{file_path:path}", download, "A result file (LightX2V)",
       "lightx2v", responses={200: ("application/octet-stream",), 403: ErrorBody,
                              404: ErrorBody},
       params=(Param("file_path", "path", {"type": "string"}, required=True),)),
    Op("GET", "/health", health, "Liveness (LightX2V)", "lightx2v",
       responses={200: ("application/json",)}, public=True),
]
