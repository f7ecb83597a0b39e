"""The gateway's ASGI app and its server.

Starlette with msgspec bodies rather than FastAPI: our messages are already msgspec structs
(the ZMQ wire, the ingress stream), msgspec emits their JSON Schema for the OpenAPI spec, and
decoding is strict and fast, so one schema language covers every way in, without pydantic.

Lifecycle: `serve` builds the Observer (Redis + broker clients), the Metrics (starts the
events tail thread) and the Waiters (the ended feed's thread), runs uvicorn until SIGINT/SIGTERM, then stops the tail and closes the
clients. Requests run their Redis and broker work in Starlette's thread pool.
"""

from __future__ import annotations

import logging
from importlib import resources
from typing import Any

import msgspec
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ...common.config import Config
from . import lightx2v, lightx2v_service, native
from ..pipeline import describe as describe_pipeline
from .http import BearerAuth, Op, error_response, wrap
from .metrics import Metrics
from .observe import Observer
from ...common.httpwire import ErrorBody
from .inputs import Inputs
from .waiters import Waiters
from ...stages.families import pipeline_schema
from ...stages.families.params import configured_loras, images_per_job, takes_images
from .lightx2v_service import default_frames

log = logging.getLogger("stagepool.gateway")

OPS: list[Op] = [*native.OPS, *lightx2v.OPS, *lightx2v_service.OPS]
STATIC = resources.files("stagepool.broker.gateway").joinpath("static")
_PUBLIC_PREFIXES = ("/static/",)
_PUBLIC_PATHS = {"/", "/openapi.json", "/favicon.ico"} | {op.path for op in OPS if op.public}


def create_app(config: Config, observer: Observer, metrics: Metrics,
               waiters: Waiters | None = None) -> Starlette:
    by_path: dict[str, dict[str, Op]] = {}
    for op in served(config):
        by_path.setdefault(op.path, {})[op.method] = op
    routes = [Route(path, _dispatch(ops), methods=list(ops)) for path, ops in by_path.items()]
    spec = msgspec.json.encode(openapi(config))
    routes += [
        Route("/", lambda request: FileResponse(str(STATIC / "index.html")), methods=["GET"]),
        Route("/openapi.json", lambda request: Response(spec, media_type="application/json"),
              methods=["GET"]),
        Mount("/static", StaticFiles(directory=str(STATIC)), name="static"),
    ]
    app = Starlette(routes=routes, exception_handlers={
        404: _not_found, 405: _not_allowed,
    })
    app.state.observer = observer
    app.state.metrics = metrics
    app.state.waiters = waiters or Waiters(observer.store)
    app.state.max_body_bytes = config.gateway.max_body_kb << 10
    app.state.pipeline = describe_pipeline(config)
    schema = pipeline_schema(config.pipeline.stages)
    app.state.inputs = Inputs(config, observer.store,
                              images_per_job(schema) if schema is not None else None,
                              config.pipeline.name)
    # A submit may carry its images inline (base64 in JSON, or a multipart upload): room for
    # as many as a job takes, each of inputs.max_bytes, encoded, beside the usual body.
    app.state.submit_body_bytes = app.state.max_body_bytes + (
        4 * -(-config.inputs.max_bytes // 3) * (app.state.inputs.images_per_job or 0))
    app.state.loras = configured_loras(config.pipeline.stages)
    fields = set(schema.__struct_fields__) if schema is not None else set()
    # LightX2V's guidance_scale is the CFG scale, which Qwen-Image's params call true_cfg_scale
    app.state.cfg_field = "true_cfg_scale" if "true_cfg_scale" in fields else "guidance_scale"
    # LightX2V's legacy POST /v1/tasks/: a video where the pipeline's jobs default to frames
    app.state.pipeline_makes_video = (default_frames(config) or 1) > 1
    if config.gateway.token:
        app.add_middleware(BearerAuth, token=config.gateway.token, public=is_public)
    return app


def served(config: Config) -> list[Op]:
    """The routes this deployment serves (one it cannot serve is absent, from the spec too)."""
    return [op for op in OPS if op.when is None or op.when(config)]


def _dispatch(ops: dict[str, Op]):
    """One endpoint per path, so a 405's Allow lists every method the path has."""
    handlers = {method: wrap(op.handler) for method, op in ops.items()}
    if "GET" in handlers:
        handlers["HEAD"] = handlers["GET"]

    async def endpoint(request: Request) -> Response:
        return await handlers[request.method](request)

    return endpoint


def is_public(path: str) -> bool:
    return path in _PUBLIC_PATHS or path.startswith(_PUBLIC_PREFIXES)


async def _not_found(request: Request, exc) -> Response:
    return error_response(404, "not_found", f"no route {request.method} {request.url.path}")


async def _not_allowed(request: Request, exc) -> Response:
    response = error_response(405, "method_not_allowed",
                              f"{request.method} is not allowed on {request.url.path}")
    response.headers.update(getattr(exc, "headers", None) or {})  # Allow: the methods that are
    return response


def serve(config: Config, broker_endpoint: str, host: str | None = None,
          port: int | None = None) -> None:
    observer = Observer(config, broker_endpoint)
    metrics = Metrics(observer)
    metrics.start()
    waiters = Waiters(observer.store)
    waiters.start()
    app = create_app(config, observer, metrics, waiters)
    host = host or config.gateway.host
    port = config.gateway.port if port is None else port
    log.info("gateway on http://%s:%d (broker %s)", host, port, broker_endpoint)
    server = uvicorn.Server(uvicorn.Config(
        app, host=host, port=port, log_level="warning", access_log=False, lifespan="off",
        timeout_keep_alive=30, h11_max_incomplete_event_size=64 << 10,
    ))
    try:
        server.run()
    finally:
        waiters.stop()
        metrics.stop()
        observer.close()


# -- OpenAPI -------------------------------------------------------------------------------


def openapi(config: Config) -> dict[str, Any]:
    """The OpenAPI 3.1 document, from the route table and the msgspec structs."""
    types = sorted({t for op in served(config) for t in _types(op)}, key=lambda t: repr(t))
    _, components = msgspec.json.schema_components(types, ref_template="#/components/schemas/{name}")
    # What this deployment cannot serve is refused (422): the spec says so per deployment.
    task = components["TaskRequest"]["properties"]
    refused = ["audio_path"]
    if not takes_images(pipeline_schema(config.pipeline.stages)):
        refused.append("image_path")
    if not configured_loras(config.pipeline.stages):
        refused.append("lora_name")
    for field in refused:
        task[field] = {**task[field], "maxLength": 0,
                       "description": "refused (422): this deployment has none"}
    paths: dict[str, dict] = {}
    for op in served(config):
        entry: dict[str, Any] = {
            "summary": op.summary, "tags": [op.tag],
            "operationId": f"{op.handler.__name__}_{op.tag}",
            "responses": {str(code): _response(code, kind) for code, kind in op.responses.items()},
        }
        if op.params:
            entry["parameters"] = [
                {"name": p.name, "in": p.where, "required": p.required or p.where == "path",
                 "schema": p.schema(config) if callable(p.schema) else p.schema, **({"description": p.description} if p.description else {})}
                for p in op.params]
        if op.body is not None:
            entry["requestBody"] = {"required": False, "content": {
                "application/json": {"schema": _schema(op.body)}}}
        if config.gateway.token and not op.public:
            entry["security"] = [{"bearer": []}]
            entry["responses"]["401"] = _response(401, ErrorBody)
        paths.setdefault(op.path.replace(":path}", "}"), {})[op.method.lower()] = entry
    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": "stagepool gateway", "version": "1",
                 "description": "Jobs through the encode -> denoise -> decode stages; "
                                "LightX2V-compatible task routes; Prometheus metrics."},
        "paths": paths,
        "components": {"schemas": components},
    }
    if config.gateway.token:
        doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    return doc


def _types(op: Op):
    if op.body is not None:
        yield op.body
    for kind in op.responses.values():
        if not isinstance(kind, tuple):
            yield kind


def _schema(kind) -> dict:
    return msgspec.json.schema_components([kind], ref_template="#/components/schemas/{name}")[0][0]


def _response(code: int, kind) -> dict:
    description = {200: "OK", 201: "Created", 202: "Accepted (queued in Redis)",
                   400: "Bad request", 401: "Unauthorized", 404: "Not found",
                   409: "Conflict (not ready, or not retryable)", 413: "Too large", 422: "Invalid body",
                   503: "Redis or the broker is unreachable"}.get(code, "")
    if isinstance(kind, tuple):
        return {"description": description, "content": {m: {} for m in kind}}
    return {"description": description, "content": {"application/json": {"schema": _schema(kind)}}}
