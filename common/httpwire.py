"""The gateway's HTTP bodies, as the ZMQ wire's are in wire.py: msgspec structs, decoded
strictly, shared by the gateway (broker/gateway/), whose OpenAPI components come from them,
and the client library (api.py).

The native API (`/v1/jobs`, `/v1/queues`) refuses unknown fields. The LightX2V-compatible
bodies accept and ignore them, as LightX2V's own server (pydantic defaults) does, so its
clients keep working.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from .wire import WorkerInfo

Priority = Annotated[int, msgspec.Meta(ge=-(2**31), le=2**31 - 1)]
Seed = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
JobId = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.:-]{1,64}$",
                                    description="1-64 of A-Z a-z 0-9 _ . : -")]


class Strict(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=False):
    pass


# -- native API ------------------------------------------------------------------------


class SubmitRequest(Strict):
    """A job: `params` go to every stage (prompt, seed, height, width, num_frames, ...)."""

    params: dict[str, Any] = {}
    job_id: JobId | None = None
    priority: Priority = 0
    # Wall clock, ms since the epoch: a job whose next stage cannot start by then ends
    # "expired" instead of running; 0: none.
    deadline_ms: Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)] = 0


class Submitted(Strict):
    job_id: str
    created: bool  # false: a job with this id existed (submission is idempotent)
    via: Literal["broker", "ingress"] = "broker"  # ingress: the broker was down; queued in Redis


class Job(Strict):
    job_id: str
    # queued:<stage> (waiting for a worker of that stage), a stage's running state (e.g.
    # denoising), or its end: succeeded, failed, cancelled, dead, expired
    state: str
    stage: str  # the stage the job is in (or ended in)
    pipeline: str
    params: dict[str, Any]
    error: str
    result: Any
    created_ms: int
    updated_ms: int
    progress: float | None  # the running stage's reported steps, 0..1; 1 once succeeded
    stages: dict[str, dict[str, Any]]

    def files(self) -> dict[str, Any]:
        """The result's files (kind -> path), as the last stage wrote them; {} if none."""
        files = self.result.get("files") if isinstance(self.result, dict) else None
        return files if isinstance(files, dict) else {}


class JobList(Strict):
    jobs: list[Job]
    next_before_ms: int | None  # pass as before_ms for the next page; null at the end


class Retried(Strict):
    job_id: str
    retried: bool
    state: str  # queued:<stage>: the stage it runs again from


class JobEvent(Strict):
    event: str  # submitted, started, finished, retried, rewound, rebuilt, revived, or its end
    ts_ms: int
    stage: str = ""
    attempt: str = ""
    worker: str = ""
    detail: str = ""  # an error's text
    ms: int | None = None  # started: how long it waited; finished/succeeded: how long it ran


class JobEvents(Strict):
    job_id: str
    events: list[JobEvent]  # oldest first, as far back as the events stream still holds


class Cancelled(Strict):
    job_id: str
    cancelled: bool
    state: str


class QueueView(Strict):
    stage: str
    depth: int  # jobs waiting for a worker of this stage (Redis)
    oldest_age_s: float  # how long the oldest of them has waited
    ring_depth: int | None  # dispatches in the stage's ring (broker; null while unreachable)
    ring_capacity: int | None
    backlog: int | None  # dispatches waiting for ring space in the broker
    in_flight: int | None  # leases held by workers
    workers: int | None  # live workers registered for the stage


class Queues(Strict):
    stages: list[QueueView]
    broker_up: bool
    recovered: int | None  # dispatches the broker's reaper recovered since it started
    totals: dict[str, int]  # active, jobs, results, dead
    now_ms: int


class Workers(Strict):
    """Every live worker as the broker knows it (stagepool.common.wire.WorkerInfo)."""

    workers: list[WorkerInfo]


class ErrorBody(Strict):
    code: str
    message: str
    detail: str  # = message; what FastAPI-style clients read


# -- LightX2V-compatible API -----------------------------------------------------------


class TaskRequest(msgspec.Struct, forbid_unknown_fields=False):
    """LightX2V's TaskRequest fields; the ones stagepool's families use are mapped to params."""

    task_id: JobId | None = None
    prompt: str = ""
    negative_prompt: str = ""
    use_prompt_enhancer: bool = False
    image_path: str = ""
    num_fragments: int = 1
    save_result_path: str = ""
    infer_steps: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 5
    target_video_length: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 81
    seed: Seed | None = None  # random when not given, as in LightX2V
    audio_path: str = ""
    lora_name: str = ""
    video_duration: int = 5
    aspect_ratio: Annotated[str, msgspec.Meta(pattern=r"^([1-9][0-9]{0,3}:[1-9][0-9]{0,3})?$")] = ""
    # "W:H", e.g. "16:9": the family's default area at that ratio (when target_shape is empty)
    target_shape: Annotated[list[Annotated[int, msgspec.Meta(ge=1, le=16384)]],
                            msgspec.Meta(max_length=2)] = []  # [height, width]; [n]: n x n
    guidance_scale: float | None = None
    fps: Annotated[int, msgspec.Meta(ge=1, le=240)] | None = None


class TaskResponse(Strict):
    task_id: str
    task_status: str
    save_result_path: str


TaskStatusName = Literal["pending", "processing", "completed", "failed", "cancelled"]


class TaskStatus(Strict):
    """LightX2V's task status (its fields and formats), plus stage and progress."""

    task_id: str
    status: TaskStatusName
    stage: str
    progress: float | None
    error: str | None  # null unless it failed or was cancelled
    error_type: str  # the exception class a failure names ("ValueError"), "" otherwise
    start_time: str | None  # ISO 8601, local time, as LightX2V's server reports it
    end_time: str | None
    save_result_path: str  # the result's name under the results directory


class ServiceStatus(Strict):
    service_status: Literal["idle", "busy"]
    current_task: str | None
    active_tasks: list[str]
    pending_tasks: int
    queue_size: int
    total_tasks: int
    completed_tasks: int
    failed_tasks: int  # dead-lettered


class StopTaskResponse(Strict):
    stop_status: Literal["success", "do_nothing"]
    reason: str


class QueueStatus(Strict):
    is_processing: bool
    current_task: str | None
    pending_count: int
    active_count: int
    queue_size: int
    queue_available: int
