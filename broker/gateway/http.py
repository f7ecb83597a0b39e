"""HTTP plumbing shared by the routes: the route table, bodies, errors, auth.

Every route is an `Op`: the Starlette route and its OpenAPI entry come from the same record,
so the spec cannot drift from what is served. Handlers are async, decode bodies with msgspec
(strict, size-limited) and run Redis/broker work in the thread pool. Errors become
`{"code", "message", "detail"}` with a 4xx/5xx status, and a log line; nothing a client sends
can take the gateway down.
"""

from __future__ import annotations

import hmac
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import msgspec
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from ...common.errors import (
    Code, InvalidParams, PayloadTooLarge, ProtocolError, RemoteError, StagepoolError,
    StoreUnavailable, TransportError,
)
from ...common.frames import DECODE_ERRORS
from ...common.httpwire import ErrorBody

log = logging.getLogger("stagepool.gateway")

_encoder = msgspec.json.Encoder()


@dataclass(frozen=True)
class Param:
    name: str
    where: str  # "path" | "query"
    schema: dict | Callable[[Any], dict]  # or made from the deployment's config
    description: str = ""
    required: bool = False


@dataclass(frozen=True)
class Op:
    """One route: what serves it and what the OpenAPI spec says about it."""

    method: str
    path: str
    handler: Callable
    summary: str
    tag: str
    body: type | None = None
    responses: dict[int, Any] = field(default_factory=dict)  # status -> struct | media types
    params: tuple[Param, ...] = ()
    public: bool = False  # served without the bearer token
    when: Callable[[Any], bool] | None = None  # served only where this holds of the config


class HTTPError(Exception):
    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def json_response(value: Any, status: int = 200, headers: dict | None = None) -> Response:
    return Response(_encoder.encode(value), status, headers, media_type="application/json")


def error_response(status: int, code: str, message: str) -> Response:
    return json_response(ErrorBody(code=code, message=message, detail=message), status)


async def read_body(request: Request, limit_bytes: int) -> bytes:
    """The whole body; 413 (reading no further) once it is over `limit_bytes`."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit_bytes):
        raise HTTPError(413, Code.TOO_LARGE, f"body over the limit of {limit_bytes} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit_bytes:
            raise HTTPError(413, Code.TOO_LARGE, f"body over the limit of {limit_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_json(request: Request, kind: type, limit_bytes: int):
    """The body decoded as `kind`; 413 above `limit_bytes`, 400/422 when it does not fit."""
    body = await read_body(request, limit_bytes)
    if not body:  # no body: every field takes its default
        body = b"{}"
    try:
        raw = msgspec.json.decode(body)
    except DECODE_ERRORS as exc:  # bad UTF-8 in a string, nesting past the limit too
        raise HTTPError(400, Code.BAD_REQUEST, f"body is not JSON: {exc}") from None
    if isinstance(raw, dict):  # JSON Schema's rule: 5.0 is an integer (params are left alone)
        raw = {k: [_integral(x) for x in v] if isinstance(v, list) else _integral(v)
               for k, v in raw.items()}
    try:
        return msgspec.convert(raw, kind)
    except msgspec.ValidationError as exc:
        raise HTTPError(422, Code.INVALID_REQUEST, f"invalid body: {exc}") from None


def _integral(value):
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**63:
        return int(value)
    return value


def query_int(request: Request, name: str, default: int | None, lo: int, hi: int) -> int | None:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise HTTPError(400, Code.BAD_REQUEST, f"{name} must be an integer, got {raw[:40]!r}")
    if not lo <= value <= hi:
        raise HTTPError(400, Code.BAD_REQUEST, f"{name} must be in [{lo}, {hi}], got {value}")
    return value


_REMOTE_STATUS = {Code.NOT_FOUND: 404, Code.BAD_REQUEST: 400, Code.INVALID_PARAMS: 422,
                  Code.INVALID_REQUEST: 422, Code.CONFLICT: 409,
                  Code.TOO_LARGE: 413, Code.UNAVAILABLE: 503, Code.NO_CAPACITY: 503,
                  Code.BUSY: 429}


def wrap(handler: Callable) -> Callable:
    """Errors of the handler (and of the thread-pool work it awaits) as JSON error replies."""

    async def endpoint(request: Request) -> Response:
        try:
            return await handler(request)
        except HTTPError as exc:
            log.info("%s %s -> %d %s", request.method, request.url.path, exc.status, exc.message)
            return error_response(exc.status, exc.code, exc.message)
        except (ProtocolError, PayloadTooLarge) as exc:
            status = (413 if isinstance(exc, PayloadTooLarge)
                      else 422 if isinstance(exc, InvalidParams) else 400)
            log.info("%s %s -> %d %s", request.method, request.url.path, status, exc)
            return error_response(status, exc.code, str(exc))
        except RemoteError as exc:
            status = _REMOTE_STATUS.get(exc.code, 502)
            log.info("%s %s -> %d broker: %s", request.method, request.url.path, status, exc)
            response = error_response(status, exc.code, exc.message)
            if exc.retry_after_s:
                response.headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after_s)))
            return response
        except (TransportError, StoreUnavailable) as exc:
            log.warning("%s %s -> 503 %s", request.method, request.url.path, exc)
            return error_response(503, Code.UNAVAILABLE, str(exc))
        except StagepoolError as exc:
            log.warning("%s %s -> 500 %s", request.method, request.url.path, exc)
            return error_response(500, exc.code, str(exc))
        except Exception:
            log.exception("%s %s failed", request.method, request.url.path)
            return error_response(500, Code.INTERNAL, "internal error; see the gateway log")

    endpoint.__name__ = handler.__name__
    return endpoint


async def in_thread(fn, *args, **kwargs):
    return await run_in_threadpool(fn, *args, **kwargs)


class BearerAuth:
    """ASGI middleware: every path but the public ones needs `Authorization: Bearer <token>`."""

    def __init__(self, app, token: str, public: Callable[[str], bool]):
        self.app = app
        self.expected = f"Bearer {token}".encode()
        self.public = public

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or self.public(scope["path"]):
            return await self.app(scope, receive, send)
        supplied = dict(scope["headers"]).get(b"authorization", b"")
        if hmac.compare_digest(supplied, self.expected):
            return await self.app(scope, receive, send)
        log.info("%s %s -> 401", scope["method"], scope["path"])
        response = error_response(401, "unauthorized", "send Authorization: Bearer <token>")
        response.headers["WWW-Authenticate"] = "Bearer"
        await response(scope, receive, send)
