"""`stagepool.Client` and `stagepool.AsyncClient`: a deployment through its HTTP gateway.

    from stagepool import Client

    with Client() as client:                       # the local cluster's gateway, or url=...
        job = client.submit({"prompt": "a red fox", "seed": 1})
        done = client.wait(job.job_id, timeout_s=300)  # parked on the gateway: no polling
        png = client.result(job.job_id)            # bytes; or result(id, "fox.png") -> Path

The gateway is the one way in that works from any host: it serves result files from where
the decode stage wrote them, so a client needs no shared storage, and it holds the bearer
token's check. The gateway is found from `url`, else STAGEPOOL_GATEWAY_URL, else the
`cluster.json` of a running `stagepool up` (in STAGEPOOL_STATE_DIR or ./.stagepool), else
http://127.0.0.1:8000; the token from `token` or STAGEPOOL_GATEWAY_TOKEN.

A refusal raises `RemoteError` (its `code` as the gateway sends it: not_found, conflict,
invalid_params, busy with `retry_after_s`, ...), an unreachable gateway `TransportError`;
both are `StagepoolError`s. Replies are the gateway's own msgspec structs (`Job`, ...).
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import msgspec

from .httpwire import (
    Cancelled, ErrorBody, Job, JobEvents, JobList, Retried, Submitted,
)
from .errors import RemoteError, TransportError
from .frames import DECODE_ERRORS
from .locate import gateway_url
from .wire import TERMINAL_STATES

_WAIT_SLICE_S = 60  # one /wait request parks this long at most, then asks again


@dataclass
class _Call:
    """One HTTP request and how to read its answer."""

    method: str
    path: str
    params: dict[str, Any] = field(default_factory=dict)
    body: Any = None
    reply: type | None = None  # a struct to decode into; None: the raw bytes
    timeout_s: float | None = None  # None: the client's

    def request(self) -> dict[str, Any]:
        """httpx's `request` arguments."""
        has_body = self.body is not None
        return dict(method=self.method, url=self.path, params=self.params,
                    content=msgspec.json.encode(self.body) if has_body else None,
                    headers={"Content-Type": "application/json"} if has_body else None,
                    timeout=(self.timeout_s if self.timeout_s is not None
                             else httpx.USE_CLIENT_DEFAULT))

    def read(self, response: httpx.Response):
        if response.status_code >= 400:
            try:
                error = msgspec.json.decode(response.content, type=ErrorBody)
                code, message = error.code, error.message
            except DECODE_ERRORS:  # not our error body (ValidationError is a DecodeError)
                code, message = f"http_{response.status_code}", response.text[:500]
            retry_after = float(response.headers.get("retry-after", 0) or 0)
            raise RemoteError(code, message, retry_after)
        if self.reply is None:
            return response.content
        return msgspec.json.decode(response.content, type=self.reply)


def _submit(params, job_id, priority, deadline_s) -> _Call:
    body: dict[str, Any] = {"params": params or {}, "priority": priority}
    if job_id:
        body["job_id"] = job_id
    if deadline_s:
        body["deadline_ms"] = int((time.time() + deadline_s) * 1000)
    return _Call("POST", "/v1/jobs", body=body, reply=Submitted)


def _since_ms(since_s: float | None) -> int:
    return int((time.time() - since_s) * 1000) if since_s else 0


def _jobs(state, stage, since_ms, limit, before_ms) -> _Call:
    params: dict[str, Any] = {"limit": min(limit, 1000)}
    if state:
        params["state"] = state
    if stage:
        params["stage"] = stage
    if since_ms:
        params["since_ms"] = since_ms
    if before_ms:
        params["before_ms"] = before_ms
    return _Call("GET", "/v1/jobs", params=params, reply=JobList)


def _wait(job_id: str, remaining_s: float) -> _Call:
    """One parked /wait of at most _WAIT_SLICE_S (the HTTP timeout a little longer)."""
    slice_s = int(max(0, min(_WAIT_SLICE_S, remaining_s)))
    return _Call("GET", f"/v1/jobs/{job_id}/wait", params={"timeout_s": slice_s}, reply=Job,
                 timeout_s=slice_s + 30)


def _status(job_id: str) -> _Call:
    return _Call("GET", f"/v1/jobs/{job_id}", reply=Job)


def _cancel(job_id: str) -> _Call:
    return _Call("DELETE", f"/v1/jobs/{job_id}", reply=Cancelled)


def _retry(job_id: str) -> _Call:
    return _Call("POST", f"/v1/jobs/{job_id}/retry", reply=Retried)


def _events(job_id: str) -> _Call:
    return _Call("GET", f"/v1/jobs/{job_id}/events", reply=JobEvents)


def _result(job_id, file) -> _Call:
    return _Call("GET", f"/v1/jobs/{job_id}/result", params={"file": file} if file else {})


def _write(data: bytes, path: str | os.PathLike) -> Path:
    path = Path(path)
    tmp = path.with_name(path.name + ".part")
    tmp.write_bytes(data)
    tmp.replace(path)
    return path


def _headers(token: str | None) -> dict[str, str]:
    token = token if token is not None else os.environ.get("STAGEPOOL_GATEWAY_TOKEN", "")
    return {"Authorization": f"Bearer {token}"} if token else {}


class Client:
    """Blocking; safe to share between threads (httpx's connection pool)."""

    def __init__(self, url: str | None = None, *, token: str | None = None,
                 timeout_s: float = 30.0, state_dir: str | os.PathLike | None = None):
        self.url = url or gateway_url(state_dir)
        self._http = httpx.Client(base_url=self.url, headers=_headers(token),
                                  timeout=timeout_s)

    def _do(self, call: _Call):
        try:
            response = self._http.request(**call.request())
        except httpx.HTTPError as exc:
            raise TransportError(f"gateway {self.url}: {exc}") from exc
        return call.read(response)

    def submit(self, params: dict[str, Any] | None = None, *, job_id: str | None = None,
               priority: int = 0, deadline_s: float | None = None) -> Submitted:
        """Submit a job (idempotent on `job_id`). `deadline_s`: expire it if a stage cannot
        start within that many seconds from now."""
        return self._do(_submit(params, job_id, priority, deadline_s))

    def status(self, job_id: str) -> Job:
        return self._do(_status(job_id))

    def wait(self, job_id: str, timeout_s: float = 600.0) -> Job:
        """The job once it has ended (any end: check `state`); TimeoutError after
        `timeout_s`. The gateway parks each request until the job's end is published."""
        deadline = time.monotonic() + timeout_s
        while True:
            remaining_s = deadline - time.monotonic()
            job = self._do(_wait(job_id, remaining_s))
            if job.state in TERMINAL_STATES:
                return job
            if remaining_s <= 1:
                raise TimeoutError(f"job {job_id} still {job.state} after {timeout_s} s")

    def result(self, job_id: str, path: str | os.PathLike | None = None, *,
               file: str | None = None) -> bytes | Path:
        """A succeeded job's result file (`file`: image, video or frames; default its
        first) as bytes, or written to `path` (returned)."""
        data = self._do(_result(job_id, file))
        return _write(data, path) if path is not None else data

    def cancel(self, job_id: str) -> Cancelled:
        return self._do(_cancel(job_id))

    def retry(self, job_id: str) -> Retried:
        """Run an ended job (failed, dead, cancelled, expired) again from the stage it ended
        in; RemoteError(conflict) for a succeeded or running one."""
        return self._do(_retry(job_id))

    def events(self, job_id: str) -> JobEvents:
        return self._do(_events(job_id))

    def jobs(self, *, state: str = "", stage: str = "", since_s: float | None = None,
             limit: int = 50) -> list[Job]:
        """Jobs newest first: `state` a state (failed, denoising, queued:denoise) or a group
        (queued, running, active, ended), `stage` the stage they are in or ended in,
        `since_s` created in the last that many seconds; up to `limit`, over pages."""
        found: list[Job] = []
        before_ms, since_ms = 0, _since_ms(since_s)
        while len(found) < limit:
            page = self._do(_jobs(state, stage, since_ms, limit - len(found), before_ms))
            found += page.jobs
            if not page.next_before_ms:
                break
            before_ms = page.next_before_ms
        return found[:limit]

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncClient:
    """The same calls for asyncio: `async with AsyncClient() as client: await client.wait(id)`."""

    def __init__(self, url: str | None = None, *, token: str | None = None,
                 timeout_s: float = 30.0, state_dir: str | os.PathLike | None = None):
        self.url = url or gateway_url(state_dir)
        self._http = httpx.AsyncClient(base_url=self.url, headers=_headers(token),
                                       timeout=timeout_s)

    async def _do(self, call: _Call):
        try:
            response = await self._http.request(**call.request())
        except httpx.HTTPError as exc:
            raise TransportError(f"gateway {self.url}: {exc}") from exc
        return call.read(response)

    async def submit(self, params: dict[str, Any] | None = None, *, job_id: str | None = None,
                     priority: int = 0, deadline_s: float | None = None) -> Submitted:
        return await self._do(_submit(params, job_id, priority, deadline_s))

    async def status(self, job_id: str) -> Job:
        return await self._do(_status(job_id))

    async def wait(self, job_id: str, timeout_s: float = 600.0) -> Job:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            remaining_s = deadline - loop.time()
            job = await self._do(_wait(job_id, remaining_s))
            if job.state in TERMINAL_STATES:
                return job
            if remaining_s <= 1:
                raise TimeoutError(f"job {job_id} still {job.state} after {timeout_s} s")

    async def result(self, job_id: str, path: str | os.PathLike | None = None, *,
                     file: str | None = None) -> bytes | Path:
        data = await self._do(_result(job_id, file))
        return _write(data, path) if path is not None else data

    async def cancel(self, job_id: str) -> Cancelled:
        return await self._do(_cancel(job_id))

    async def retry(self, job_id: str) -> Retried:
        return await self._do(_retry(job_id))

    async def events(self, job_id: str) -> JobEvents:
        return await self._do(_events(job_id))

    async def jobs(self, *, state: str = "", stage: str = "", since_s: float | None = None,
                   limit: int = 50) -> list[Job]:
        found: list[Job] = []
        before_ms, since_ms = 0, _since_ms(since_s)
        while len(found) < limit:
            page = await self._do(_jobs(state, stage, since_ms, limit - len(found), before_ms))
            found += page.jobs
            if not page.next_before_ms:
                break
            before_ms = page.next_before_ms
        return found[:limit]

    async def close(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
