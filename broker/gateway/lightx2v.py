"""LightX2V-compatible routes, so LightX2V's clients can switch to stagepool unchanged.

    POST   /v1/tasks/image/          TaskRequest -> {"task_id", "task_status", ...}
    POST   /v1/tasks/video/
    POST   /v1/tasks/{image,video}/form  the same as a multipart form, the image as image_file
    GET    /v1/tasks/                every recent task's status
    GET    /v1/tasks/{id}/status     pending | processing | completed | failed | cancelled
    GET    /v1/tasks/{id}/result     the image or video file (404 until completed)
    DELETE /v1/tasks/{id}            {"stop_status": "success" | "do_nothing", "reason"}
    GET    /v1/tasks/queue/status    pending and active counts

Request fields map onto the families' params: prompt, negative_prompt, seed (random when not
given, as LightX2V does), infer_steps, guidance_scale (Qwen-Image's true_cfg_scale), fps;
target_shape [h, w] -> height and width ([n]: square); target_video_length -> num_frames
(video; images have one frame); aspect_ratio is passed on for the family to size the output by;
image_path (base64, a path under inputs.dir, a URL where allowed; comma-separated for a
multi-image edit) -> params.image, stored (inputs.py). What the deployment cannot serve is
refused with 422, never run without it: an image for a text-only pipeline, an audio_path, a
lora_name. Other fields (use_prompt_enhancer, ...) and unknown ones are accepted and ignored.

`completed` means the job succeeded and its result file exists where the gateway serves it.
"""

from __future__ import annotations

import random
from datetime import datetime
from pathlib import Path

import msgspec

from starlette.requests import Request
from starlette.responses import FileResponse, Response

from ...common.errors import Code, RemoteError
from .http import HTTPError, Op, Param, in_thread, json_response, query_int, read_body, \
    read_json
from .lightx2v_service import makes_images
from .native import JOB_ID_PARAM, job_result
from ...common.httpwire import (
    ErrorBody, Job, QueueStatus, StopTaskResponse, TaskRequest, TaskResponse,
    TaskStatus,
)
from ...common.wire import TERMINAL_STATES
from ...stages.families.params import check_lora

_SECONDS = 1000.0


def task_params(task: TaskRequest, kind: str, cfg_field: str = "guidance_scale") -> dict:
    """The job params of a LightX2V request; `cfg_field`: the family's name for the CFG scale
    (Qwen-Image's is true_cfg_scale)."""
    params: dict = {"prompt": task.prompt, "infer_steps": task.infer_steps, "task": kind,
                    "seed": task.seed if task.seed is not None else random.randrange(2**32)}
    if task.negative_prompt:
        params["negative_prompt"] = task.negative_prompt
    if task.target_shape:
        params["height"], params["width"] = (task.target_shape * 2)[:2]
    elif task.aspect_ratio:
        params["aspect_ratio"] = task.aspect_ratio
    params["num_frames"] = task.target_video_length if kind == "video" else 1
    if task.guidance_scale is not None:
        params[cfg_field] = task.guidance_scale
    if task.fps is not None:
        params["fps"] = task.fps
    return params


def task_status(job: Job, result_ready: bool, results_dirs: list[Path]) -> TaskStatus:
    state, error = job.state, job.error
    if state.startswith("queued:") and not any("started_ms" in s for s in job.stages.values()):
        status = "pending"  # nothing has run yet; waiting between stages is processing
    elif state == "succeeded":
        status = "completed" if result_ready else "failed"
        if not result_ready:
            error = "the job succeeded but its result file is not where this gateway serves it"
    elif state in ("failed", "dead", "expired"):
        status = "failed"
    elif state == "cancelled":
        status = "cancelled"
    else:
        status = "processing"
    first = next(iter(job.stages.values()), {})
    started_ms = first.get("started_ms")
    ended = status in ("completed", "failed", "cancelled")
    files = job.files()
    return TaskStatus(
        task_id=job.job_id, status=status, stage=job.stage, progress=job.progress,
        error=error or None, error_type=_error_type(error) if status == "failed" else "",
        start_time=_when(started_ms), end_time=_when(job.updated_ms) if ended else None,
        save_result_path=(relative_result(results_dirs, next(iter(files.values()), ""))
                          if status == "completed" else ""),
    )


def _when(ms: int | None) -> str | None:
    """A time as LightX2V's server reports it: ISO 8601, local, no zone."""
    return datetime.fromtimestamp(ms / _SECONDS).isoformat() if ms else None


def _error_type(error: str) -> str:
    """The exception class an error names (`ValueError: ...`), as LightX2V reports it."""
    head = error.split(":", 1)[0].strip()
    return head if head.isidentifier() else "RuntimeError" if error else ""


def relative_result(dirs: list, path: str) -> str:
    """A result file's name under the results directory that holds it (what LightX2V's
    `save_result_path` is, and `/v1/files/download/{name}` serves); never a server path."""
    if not path:
        return ""
    resolved = Path(path).resolve()
    for root in dirs:
        if resolved.is_relative_to(root):
            return str(resolved.relative_to(root))
    return resolved.name


def _ready(observer, job: Job) -> bool:
    files = job.files()
    if not files:
        return job.state == "succeeded"
    return all((path := observer.result_file(job, kind)) is not None and path.is_file()
               for kind in files)


def _status_of(observer, job_id: str) -> TaskStatus | None:
    job = observer.job(job_id)
    return (None if job is None
            else task_status(job, _ready(observer, job), observer.results_dirs))


async def _create(request: Request, kind: str) -> Response:
    app = request.app.state
    task = await read_json(request, TaskRequest, app.submit_body_bytes)
    return await _submit(app, task, kind)


async def _create_form(request: Request, kind: str) -> Response:
    """LightX2V's multipart routes: the TaskRequest's fields as form fields, the image as an
    `image_file` upload (stored like any input, never written where the client says)."""
    app = request.app.state
    limit = app.inputs.settings.max_bytes
    # Read within a bound first: starlette spools file parts to disk with no limit of its own.
    body = await read_body(request, app.submit_body_bytes)

    async def replay():
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=2, max_fields=64,
                                                          max_part_size=limit)
    except Exception as exc:  # starlette's MultiPartException and parser errors
        raise HTTPError(400, Code.BAD_REQUEST, f"not a multipart form: {exc}") from None
    fields, upload = {}, None
    try:
        for name, value in form.multi_items():
            if name == "image_file" and hasattr(value, "read"):
                upload = await value.read(limit + 1)
            elif isinstance(value, str) and name in _TASK_FIELDS:
                fields[name] = _form_value(name, value)
    finally:
        await form.close()
    try:
        task = msgspec.convert(fields, TaskRequest, strict=False)
    except msgspec.ValidationError as exc:
        raise HTTPError(422, Code.INVALID_REQUEST, f"invalid form: {exc}") from None
    if upload is not None:
        if task.image_path:
            raise HTTPError(422, Code.INVALID_PARAMS, "give image_file or image_path, not both")
        task = msgspec.structs.replace(
            task, image_path=await in_thread(app.inputs.store_bytes, upload, "image_file"))
    return await _submit(app, task, kind)


def _form_value(name: str, value: str):
    """A form field as its TaskRequest type: lists (target_shape) come as JSON or "h,w"."""
    if name == "target_shape":
        text = value.strip().strip("[]")
        try:
            return [int(x) for x in text.replace(",", " ").split()] if text else []
        except ValueError:
            raise HTTPError(422, Code.INVALID_REQUEST,
                            f"target_shape: expected [height, width], got {value[:40]!r}") from None
    return value


_TASK_FIELDS = set(TaskRequest.__struct_fields__)


async def _submit(app, task: TaskRequest, kind: str) -> Response:
    submitted = await _submit_task(app, task, kind)
    return json_response(TaskResponse(task_id=submitted.job_id, task_status="pending",
                                      save_result_path=task.save_result_path or submitted.job_id))


async def _submit_task(app, task: TaskRequest, kind: str):
    """The task as a job (its image stored), submitted: the broker's Submitted."""
    params = task_params(task, kind, app.cfg_field)
    if task.audio_path:
        raise HTTPError(422, Code.INVALID_PARAMS, "audio_path: this deployment has no audio "
                        "model; the request is refused rather than run without its audio")
    if task.lora_name:  # the broker refuses one the deployment does not serve
        check_lora({"lora_name": task.lora_name}, app.loras)
        params["lora_name"] = task.lora_name
    if task.image_path:
        params["image"] = await in_thread(app.inputs.store, task.image_path, "image_path")
    return await in_thread(app.observer.submit, params, task.task_id, 0)


async def create_image(request: Request) -> Response:
    return await _create(request, "image")


async def create_video(request: Request) -> Response:
    return await _create(request, "video")


async def create_image_form(request: Request) -> Response:
    return await _create_form(request, "image")


async def create_video_form(request: Request) -> Response:
    return await _create_form(request, "video")


async def create_task(request: Request) -> Response:
    """The legacy route: the task type is the pipeline's (video where its jobs default to
    several frames, else image)."""
    app = request.app.state
    return await _create(request, "video" if app.pipeline_makes_video else "image")


async def create_image_sync(request: Request) -> Response:
    """Submit, wait for the end (woken by it, at most `timeout_seconds`), answer the PNG, as
    LightX2V's does: 504 after cancelling on a timeout, 409 cancelled, 500 failed (413 for a
    ValueError)."""
    app = request.app.state
    timeout_s = query_int(request, "timeout_seconds", 600, 1, 3600)
    task = await read_json(request, TaskRequest, app.submit_body_bytes)
    job_id = (await _submit_task(app, task, "image")).job_id
    observer = app.observer
    await app.waiters.wait(job_id, timeout_s, lambda: observer.ended(job_id))
    job = await in_thread(observer.job, job_id)
    if job is None or job.state not in TERMINAL_STATES:
        await in_thread(observer.cancel, job_id)
        raise HTTPError(504, "timeout", f"Task {job_id} timed out after {timeout_s} seconds")
    if job.state == "cancelled":
        raise HTTPError(409, Code.CONFLICT, job.error or "Task cancelled")
    if job.state != "succeeded":
        status = 413 if _error_type(job.error) == "ValueError" else 500
        raise HTTPError(status, "failed", job.error or f"Task {job.state}")
    path = observer.result_file(job, "image")
    if path is None or not path.is_file():
        raise HTTPError(500, "failed", f"Task {job_id} completed but its image is not here")
    return FileResponse(path, media_type="image/png", filename="result.png",
                        content_disposition_type="inline")


async def list_tasks(request: Request) -> Response:
    observer = request.app.state.observer

    def statuses():  # as LightX2V's: an object keyed by task id
        return {job.job_id: task_status(job, _ready(observer, job), observer.results_dirs)
                for job in observer.jobs(100)}

    return json_response(await in_thread(statuses))


async def get_status(request: Request) -> Response:
    job_id = request.path_params["job_id"]
    status = await in_thread(_status_of, request.app.state.observer, job_id)
    if status is None:
        raise HTTPError(404, Code.NOT_FOUND, "Task not found")
    return json_response(status)


async def get_result(request: Request) -> Response:
    job_id = request.path_params["job_id"]
    status = await in_thread(_status_of, request.app.state.observer, job_id)
    if status is None:
        raise HTTPError(404, Code.NOT_FOUND, "Task not found")
    if status.status != "completed":
        raise HTTPError(404, Code.NOT_FOUND, "Task not completed")
    return await job_result(request)


async def stop_task(request: Request) -> Response:
    job_id = request.path_params["job_id"]
    try:
        result = await in_thread(request.app.state.observer.cancel, job_id)
    except RemoteError as exc:
        if exc.code != Code.NOT_FOUND:
            raise
        return json_response(StopTaskResponse(stop_status="do_nothing",
                                              reason="Task not found or already completed."))
    if result.cancelled:
        return json_response(StopTaskResponse(stop_status="success",
                                              reason="Task stopped successfully."))
    return json_response(StopTaskResponse(stop_status="do_nothing",
                                          reason=f"Task already {result.state}."))


async def queue_status(request: Request) -> Response:
    app = request.app.state
    observer = app.observer

    def gather() -> QueueStatus:
        queues = observer.queues()
        pending = queues.stages[0].depth
        active = queues.totals["active"]
        running = next((job.job_id for job in observer.jobs(50, active_only=True)
                        if not job.state.startswith("queued:")), None)
        capacity = observer.config.ring.capacity
        return QueueStatus(is_processing=active > pending, current_task=running,
                           pending_count=pending, active_count=active, queue_size=capacity,
                           queue_available=max(0, capacity - active))

    return json_response(await in_thread(gather))


_ERRORS = {404: ErrorBody, 503: ErrorBody}
_CREATE = {200: TaskResponse, 400: ErrorBody, 413: ErrorBody, 422: ErrorBody, 429: ErrorBody,
           503: ErrorBody}

OPS = [  # and lightx2v_service.OPS
    Op("POST", "/v1/tasks/image/", create_image, "Create an image task (LightX2V)", "lightx2v",
       body=TaskRequest, responses=_CREATE),
    Op("POST", "/v1/tasks/video/", create_video, "Create a video task (LightX2V)", "lightx2v",
       body=TaskRequest, responses=_CREATE),
    Op("POST", "/v1/tasks/image/form", create_image_form,
       "Create an image task from a multipart form (LightX2V)", "lightx2v", responses=_CREATE),
    Op("POST", "/v1/tasks/video/form", create_video_form,
       "Create a video task from a multipart form, image_file uploaded (LightX2V)", "lightx2v",
       responses=_CREATE),
    Op("GET", "/v1/tasks/", list_tasks, "Recent tasks (LightX2V)", "lightx2v",
       responses={200: dict[str, TaskStatus], 503: ErrorBody}),
    Op("POST", "/v1/tasks/", create_task, "Create a task of the pipeline's type (LightX2V)",
       "lightx2v", body=TaskRequest, responses=_CREATE),
    Op("POST", "/v1/tasks/image/sync", create_image_sync,
       "Create an image task and answer its PNG when done (LightX2V)", "lightx2v",
       body=TaskRequest, responses={200: ("image/png",), 400: ErrorBody, 409: ErrorBody,
                                    413: ErrorBody,
                                    422: ErrorBody, 500: ErrorBody, 504: ErrorBody},
       params=(Param("timeout_seconds", "query",
                     {"type": "integer", "minimum": 1, "maximum": 3600}),),
       when=makes_images),
    Op("GET", "/v1/tasks/queue/status", queue_status, "Queue status (LightX2V)", "lightx2v",
       responses={200: QueueStatus, 503: ErrorBody}),
    Op("GET", "/v1/tasks/{job_id}/status", get_status, "Task status (LightX2V)", "lightx2v",
       responses={200: TaskStatus, 400: ErrorBody, **_ERRORS}, params=(JOB_ID_PARAM,)),
    Op("GET", "/v1/tasks/{job_id}/result", get_result, "Task result file (LightX2V)",
       "lightx2v", responses={200: ("image/png", "video/mp4", "application/octet-stream",
                                    "application/json"), 400: ErrorBody, **_ERRORS},
       params=(JOB_ID_PARAM,)),
    Op("DELETE", "/v1/tasks/{job_id}", stop_task, "Stop a task (LightX2V)", "lightx2v",
       responses={200: StopTaskResponse, 400: ErrorBody, 503: ErrorBody},
       params=(JOB_ID_PARAM,)),
]
