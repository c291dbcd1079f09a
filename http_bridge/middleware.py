"""ASGI middleware of the bridge: the request id, the access log and metrics; load shedding.

:class:`RequestObserver` (outermost) takes the client's ``X-Request-Id`` when it is usable
(1 to 128 visible ASCII characters) or makes one, returns it on the response, sends it to the
service as ``x-request-id`` metadata with every ledger call the request makes (appended to
:data:`casledger.service.client.call_metadata`), and once the response is over records it in
:class:`~casledger.http_bridge.metrics.BridgeMetrics` and logs one line to
``casledger.access.http``.

:class:`LoadShedder` (innermost, so CORS headers still reach a refused browser) admits a request
through one of two :class:`~casledger.service.limits.Gate`s — SSE watches through their own, for
as long as the stream is open — or answers 503 problem+json, reason OVERLOADED, with
``Retry-After`` at once: never a queue. ``/metrics``, ``/healthz`` and ``/readyz`` are never
refused (they are how an operator sees the overload).
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from casledger.service import logs
from casledger.service.client import call_metadata
from casledger.service.limits import RETRY_AFTER_S, Gate

from .errors import problem
from .metrics import PRECONDITION_STATUSES, BridgeMetrics

access_log = logging.getLogger(logs.HTTP_ACCESS)

WATCH_ROUTES = frozenset({"/v1:watch", "/v1/{prefix}:watch"})
UNLIMITED_ROUTES = frozenset({"/metrics", "/healthz", "/readyz"})
_FIXED_ROUTES = frozenset({"/healthz", "/readyz", "/openapi.json", "/metrics", "/v1:watch"})
# A problem body is a few hundred bytes; only that much is kept to read its reason.
_MAX_PROBLEM_BYTES = 16 * 1024
_MAX_LOGGED_PATH = 512


def route_template(path: str) -> str:
    """The route a path takes, as a template (a bounded set: a metrics label, never the path):
    ``/v1/{name}``, ``/v1/{collection}``, ``/v1/{name}:history``, ``/v1/{prefix}:watch``, a
    fixed route, or ``unmatched``. Shapes as ``app.dispatch`` tells them apart."""
    if path in _FIXED_ROUTES:
        return path
    if not path.startswith("/v1/"):
        return "unmatched"
    rest = path[len("/v1/"):]
    if rest.endswith(":watch"):
        return "/v1/{prefix}:watch"
    if rest.endswith(":history"):
        return "/v1/{name}:history"
    if ":" in rest or not rest:
        return "unmatched"
    return "/v1/{name}" if len(rest.split("/")) % 2 == 0 else "/v1/{collection}"


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value).decode("latin-1")
    return None


class RequestObserver:
    """Request id, metrics and access log of every HTTP request (module docstring)."""

    def __init__(self, app: ASGIApp, metrics: BridgeMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = logs.accept_request_id(_header(scope, b"x-request-id"))
        status, problem_body = 0, bytearray()

        async def observed_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [
                    *message.get("headers", ()), (b"x-request-id", request_id.encode())]}
            elif (message["type"] == "http.response.body" and status in PRECONDITION_STATUSES
                  and len(problem_body) < _MAX_PROBLEM_BYTES):
                problem_body.extend(message.get("body", b"")[:_MAX_PROBLEM_BYTES])
            await send(message)

        id_token = logs.request_id.set(request_id)
        metadata_token = call_metadata.set(
            (*call_metadata.get(), (logs.REQUEST_ID_KEY, request_id)))
        try:
            await self.app(scope, receive, observed_send)
        finally:
            call_metadata.reset(metadata_token)
            # No response started: the app raised, and Starlette's outermost layer answers 500.
            self._record(scope, status or 500, _reason(problem_body), started, request_id)
            logs.request_id.reset(id_token)

    def _record(self, scope: Scope, status: int, reason: str, started: float,
                request_id: str) -> None:
        duration = time.perf_counter() - started
        method, path = scope["method"], scope["path"]
        route = route_template(path)
        self.metrics.observe(method, route, status, duration, reason)
        level = logging.ERROR if status >= 500 and status not in (503, 504) else logging.INFO
        if not access_log.isEnabledFor(level):
            return
        client = scope.get("client")
        access_log.log(
            level, "%s %s %s", method, path[:_MAX_LOGGED_PATH], status, extra={
                "method": method, "route": route, "path": path[:_MAX_LOGGED_PATH],
                "status": status, "reason": reason or None,
                "duration_ms": round(duration * 1000, 3),
                "client": f"{client[0]}:{client[1]}" if client else None,
                "request_id": request_id})


def _reason(body: bytes | bytearray) -> str:
    """The `reason` of a problem+json body ("" when it is not one)."""
    if not body:
        return ""
    try:
        parsed: Any = json.loads(body)
    except ValueError:
        return ""
    reason = parsed.get("reason") if isinstance(parsed, dict) else None
    return reason if isinstance(reason, str) else ""


class LoadShedder:
    """Bounded in-flight requests and SSE streams; past a bound, 503 at once (module docstring).
    """

    def __init__(self, app: ASGIApp, requests: Gate, streams: Gate,
                 metrics: BridgeMetrics) -> None:
        self.app = app
        self.requests = requests
        self.streams = streams
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = route_template(scope["path"]) if scope["type"] == "http" else ""
        if scope["type"] != "http" or route in UNLIMITED_ROUTES:
            await self.app(scope, receive, send)
            return
        stream = route in WATCH_ROUTES
        gate = self.streams if stream else self.requests
        if not gate.try_enter():
            self.metrics.shed.labels("stream" if stream else "request").inc()
            what = "event streams" if stream else "requests"
            response = problem(503, "Service overloaded",
                               f"the bridge is at its limit of {gate.limit} in-flight {what}; "
                               f"retry after {RETRY_AFTER_S} s", reason="OVERLOADED",
                               headers={"Retry-After": str(RETRY_AFTER_S)})
            await response(scope, receive, send)
            return
        try:
            await self.app(scope, receive, send)
        finally:
            gate.leave()
