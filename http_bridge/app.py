"""The HTTP bridge: RFC 9110 conditional requests over the ledger's gRPC API.

``create_app(settings)`` builds the Starlette app; its lifespan opens one gRPC channel to the
service (``casledger.service.client``), reused by every request, and the read cache that follows
the ledger over it (``readindex.py``). The bridge owns HTTP semantics only: ETag/If-Match <->
Precondition (``conditional.py``), ledger errors -> problem+json (``errors.py``), bodies and
limits, Server-Sent Events. It stores nothing but that cache of heads, and checks no ledger rule
itself: the service does, atomically.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

from grpc_health.v1 import health_pb2, health_pb2_grpc
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from casledger.service.api.casledger.v1 import ledger_pb2 as pb
from casledger.service.client import LedgerCallError, LedgerClient, connect
from casledger.service.limits import Gate

from . import conditional, sse
from .errors import Problem, bad_request, from_call_error, problem
from .jsonio import FastJSONResponse
from .metrics import BridgeMetrics
from .middleware import LoadShedder, RequestObserver
from .openapi import openapi_document
from .readindex import ReadCache, open_read_cache
from .security import ForwardAuthorization, target_tls
from .views import http_date, last_modified, resource_view

MERGE_PATCH = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"
ACCEPT_PATCH = f"{MERGE_PATCH}, {JSON_PATCH}"
REASON_HEADER = "Casledger-Reason"
RESOURCE_METHODS = "GET, HEAD, PUT, PATCH, DELETE, OPTIONS"
COLLECTION_METHODS = "GET, HEAD, POST, OPTIONS"
READ_METHODS = "GET, HEAD, OPTIONS"
INT64_MAX = 2**63 - 1
CONDITIONAL_HEADERS = ("If-Match", "If-None-Match", "If-Unmodified-Since", "If-Modified-Since")
EXPOSED_HEADERS = ("ETag", "Location", "Accept-Patch", "Last-Modified", "Retry-After",
                   "Preference-Applied", "X-Request-Id")


@dataclass(frozen=True, slots=True)
class BridgeSettings:
    target: str = "127.0.0.1:50051"
    http_listen: str = "127.0.0.1:8080"
    max_body_bytes: int = 1 << 20
    call_timeout_s: float = 5.0
    cors_allow_origins: tuple[str, ...] = ()
    heartbeat_s: float = 15.0
    # Load shedding (README: "Operating casledger: limits, metrics and logs").
    max_in_flight: int = 256
    max_watchers: int = 512
    # TLS (README: "Access control and TLS"): HTTPS on http_listen; TLS toward the service.
    http_tls_cert: str = ""
    http_tls_key: str = ""
    target_tls_ca: str = ""
    target_tls_name: str = ""
    # Linearizable reads from a cache of heads (README: "HTTP bridge"; readindex.py).
    read_cache: bool = True
    # Single-resource calls to the service travel in Batch calls (README: "HTTP bridge").
    batch_calls: bool = True
    read_cache_entries: int = 10_000
    read_cache_bytes: int = 64 << 20
    # Seconds without a read the cache can serve before its watch pauses; 0: never.
    read_cache_idle_s: float = 2.0

    def __post_init__(self) -> None:
        for name in ("target", "http_listen"):
            host, sep, port = getattr(self, name).rpartition(":")
            if not sep or not host or not port.isdigit() or int(port) > 65535:
                raise ValueError(f"{name} must be HOST:PORT, not {getattr(self, name)!r}")
        if not 1 <= self.max_body_bytes <= 64 << 20:
            raise ValueError("max_body_bytes must be between 1 and 67108864")
        if self.call_timeout_s <= 0 or self.heartbeat_s <= 0:
            raise ValueError("call_timeout_s and heartbeat_s must be positive")
        if self.max_in_flight < 1 or self.max_watchers < 1:
            raise ValueError("max_in_flight and max_watchers must be at least 1")
        if bool(self.http_tls_cert) != bool(self.http_tls_key):
            raise ValueError("--http-tls-cert and --http-tls-key go together: give both or "
                             "neither")
        if self.target_tls_name and not self.target_tls_ca:
            raise ValueError("--target-tls-name needs --target-tls-ca")
        if self.read_cache_entries < 1 or self.read_cache_bytes < 1:
            raise ValueError("read_cache_entries and read_cache_bytes must be at least 1")
        if not 0 <= self.read_cache_idle_s <= 86_400:
            raise ValueError("read_cache_idle_s must be between 0 (never pause) and 86400")

    @property
    def read_cache_wait_s(self) -> float:
        """How long a read waits for the cache to catch up before it asks the service."""
        return min(1.0, self.call_timeout_s)


def representation_headers(r: pb.Resource, request: Request) -> dict[str, str]:
    return {"ETag": r.etag, "Last-Modified": http_date(r.update_time)}


def resource_response(r: pb.Resource, request: Request, *, status: int = 200,
                      extra: dict[str, str] | None = None) -> Response:
    headers = representation_headers(r, request) | (extra or {})
    if request.headers.get("prefer", "").replace(" ", "").lower().find("return=minimal") >= 0:
        headers["Preference-Applied"] = "return=minimal"
        return Response(status_code=204 if status == 200 else status, headers=headers)
    # The stored media type goes out exactly as stored: `media_type=` would add a charset.
    headers["Content-Type"] = r.content_type
    return Response(r.content, status_code=status, headers=headers)


# --- request pieces ----------------------------------------------------------------------------


def ledger(request: Request) -> LedgerClient:
    client: LedgerClient = request.state.ledger
    return client


def read_cache(request: Request) -> ReadCache | None:
    reads: ReadCache | None = request.state.reads
    return reads


def settings_of(request: Request) -> BridgeSettings:
    settings: BridgeSettings = request.state.settings
    return settings


async def read_body(request: Request) -> bytes:
    """The request body, refused with 413 past the limit: from Content-Length before reading
    anything, and while streaming a body without one (chunked)."""
    limit = settings_of(request).max_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None:
        if not (declared.isascii() and declared.isdigit()):
            raise bad_request("Content-Length is not a number")
        # Compare lengths first: int() refuses more than 4300 digits.
        if len(declared.lstrip("0")) > len(str(limit)) or int(declared) > limit:
            raise _too_large(int(declared) if len(declared) <= 19 else None, limit)
    chunks, total = [], 0
    try:
        async for chunk in request.stream():
            total += len(chunk)
            if total > limit:
                raise _too_large(total, limit)
            chunks.append(chunk)
    except ClientDisconnect:
        # The client went away mid-body (or sent a body that is not HTTP, which uvicorn has
        # answered already): nothing was written, and no one will read this answer.
        raise bad_request("the connection closed before the whole body arrived") from None
    return b"".join(chunks)


def _too_large(size: int | None, limit: int) -> Problem:
    return Problem(problem(413, "Content too large",
                           f"the body is larger than the limit of {limit} bytes",
                           reason="CONTENT_TOO_LARGE", limit=limit, size=size))


def write_reason(request: Request) -> str:
    """The write's reason, from the Casledger-Reason header (UTF-8, may be percent-encoded)."""
    raw = request.headers.get(REASON_HEADER, "")
    try:
        return unquote(raw.encode("latin-1").decode("utf-8"), errors="strict")
    except (UnicodeDecodeError, UnicodeEncodeError):
        raise bad_request(f"{REASON_HEADER} must be UTF-8 text", reason="INVALID_HEADER") from None


def idempotency_key(request: Request) -> str:
    return request.headers.get("idempotency-key", "")


def content_type(request: Request) -> str:
    return request.headers.get("content-type", "application/octet-stream")


def int_param(request: Request, name: str, *, minimum: int = 0, maximum: int | None = None,
              default: int = 0) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    # The service's numbers are int64: a larger one would fail in protobuf (a 500), not a 400.
    maximum = INT64_MAX if maximum is None else maximum
    # isascii: str.isdigit() also takes "\uff11" (int() reads it as 1) and "\u00b2" (int() fails).
    # len: int() refuses more than 4300 digits.
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 19 or not (
            minimum <= int(raw) <= maximum):
        raise bad_request(f"query parameter {name} must be an integer between {minimum} and "
                          f"{maximum}", field=name)
    return int(raw)


def conditions(request: Request) -> conditional.WriteConditions:
    try:
        return conditional.write_conditions(request.headers)
    except conditional.MalformedHeader as exc:
        raise _malformed(exc) from None


def _malformed(exc: conditional.MalformedHeader) -> Problem:
    return bad_request(f"malformed {exc.header} header: {exc.message}", reason="MALFORMED_HEADER",
                       header=exc.header)


# --- conditional writes ------------------------------------------------------------------------


async def current_or_none(request: Request, name: str) -> pb.Resource | None:
    try:
        return await ledger(request).get(name)
    except LedgerCallError as error:
        if error.reason == "NOT_FOUND":
            return None
        raise


def precondition_failed(current: pb.Resource | None, detail: str) -> Problem:
    headers = {"ETag": current.etag} if current else {}
    return Problem(problem(
        412, "Precondition failed", detail, reason="VERSION_MISMATCH", headers=headers,
        current_etag=current.etag if current else None,
        current_version=current.version if current else None))


def precondition_required(request: Request, error: LedgerCallError,
                          wc: conditional.WriteConditions) -> Response:
    """The 428 that teaches the client what to send."""
    method, path = request.method, request.url.path
    etag = error.current_etag
    if etag:
        detail = (f"{method} {path} must say which version it edits. GET {path}, copy the ETag "
                  f"response header, and send it back as If-Match: {etag} (or "
                  "If-Unmodified-Since with its Last-Modified).")
        if wc.sent_etag_on_if_none_match:
            detail = ("You sent an entity-tag in If-None-Match, which means 'only if it does "
                      "NOT match'; send the ETag you read in If-Match instead. " + detail)
        required = "If-Match"
    else:
        detail = (f"{path} does not exist. To create it, send PUT {path} with "
                  "If-None-Match: * (or POST to its collection).")
        required = "If-None-Match: *"
    return from_call_error(error, detail=detail, required_header=required)


async def conditional_write(
    request: Request, name: str,
    perform: Callable[[pb.Precondition | None], Awaitable[pb.Resource]],
) -> pb.Resource:
    """Run a PUT/PATCH/DELETE under its conditional headers (RFC 9110 §13.2.2): the service
    checks the precondition and writes in one step; the bridge reads first only where the RFC's
    answer needs the current ETag."""
    wc = conditions(request)
    if wc.always_fails:
        current = await current_or_none(request, name)
        raise precondition_failed(current, "the conditional headers can never match this "
                                  "resource (a weak or excluded entity-tag in If-Match)")
    pre = wc.precondition
    if wc.create_only or wc.needs_current_etag:
        current = await current_or_none(request, name)
        if wc.create_only and current is not None:
            raise precondition_failed(current, f"{name} exists (If-None-Match: *)")
        if current is not None and conditional.evaluate_preconditions(
            request.method, request.headers, current_etag=current.etag,
            last_modified=last_modified(current), exists=True,
        ) is conditional.Outcome.PRECONDITION_FAILED:
            raise precondition_failed(current, "the conditional headers do not match the "
                                      f"current version of {name}")
        pre = wc.bind(current.etag if current else None)
    try:
        return await perform(pre)
    except LedgerCallError as error:
        if error.reason == "PRECONDITION_REQUIRED":
            raise Problem(precondition_required(request, error, wc)) from None
        raise


# --- handlers ----------------------------------------------------------------------------------


async def get_resource(request: Request, name: str) -> Response:
    version = int_param(request, "version", minimum=1, default=0) if (
        "version" in request.query_params) else 0
    reads = read_cache(request)
    if version or reads is None:
        r = await ledger(request).get(name, version)
    else:
        r = await reads.get(name, lambda: ledger(request).get(name),
                            credentials="authorization" in request.headers)
    return read_response(request, name, r, version)


def read_response(request: Request, name: str, r: pb.Resource, version: int) -> Response:
    """The answer to GET/HEAD of `name` (at `version`, 0 = current) once the read gave `r`:
    the one code for reads through the cache and straight from the service alike."""
    if r.deleted:
        return problem(410, "Gone", f"version {r.version} of {name} is its deletion",
                       reason="DELETED", deleted_at_version=r.version)
    try:
        outcome = conditional.evaluate_read(
            request.headers, current_etag=r.etag, last_modified=last_modified(r), exists=True)
    except conditional.MalformedHeader as exc:
        raise _malformed(exc) from None
    headers = representation_headers(r, request)
    headers["Cache-Control"] = "public, max-age=31536000, immutable" if version else "no-cache"
    if outcome is conditional.Outcome.NOT_MODIFIED:
        return Response(status_code=304, headers=headers)
    if outcome is conditional.Outcome.PRECONDITION_FAILED:
        raise precondition_failed(r, f"{name} does not match the request's preconditions")
    if request.method == "HEAD":
        headers["Content-Length"] = str(len(r.content))
        headers["Content-Type"] = r.content_type
        return Response(status_code=200, headers=headers)
    headers["Content-Type"] = r.content_type
    return Response(r.content, headers=headers)


async def put_resource(request: Request, name: str) -> Response:
    body = await read_body(request)
    client, reason, key = ledger(request), write_reason(request), idempotency_key(request)
    wc = conditions(request)
    if wc.create_only and not wc.always_fails:
        parent, _, resource_id = name.rpartition("/")
        try:
            created = await client.create(parent, body, resource_id=resource_id,
                                          content_type=content_type(request),
                                          request_id=key, reason=reason)
        except LedgerCallError as error:
            if error.reason == "ALREADY_EXISTS":
                return from_call_error(error, status=412)
            raise
        return resource_response(created, request, status=201,
                                 extra={"Location": f"/v1/{created.name}"})

    async def perform(pre: pb.Precondition | None) -> pb.Resource:
        return await client.replace(name, body, content_type=content_type(request),
                                    precondition=pre, request_id=key, reason=reason)

    return resource_response(await conditional_write(request, name, perform), request)


async def patch_resource(request: Request, name: str) -> Response:
    media_type = content_type(request).split(";", 1)[0].strip().lower()
    if media_type not in (MERGE_PATCH, JSON_PATCH):
        return problem(415, "Unsupported patch media type",
                       f"PATCH takes {MERGE_PATCH} (RFC 7396) or {JSON_PATCH} (RFC 6902), "
                       f"not {media_type or 'a body without Content-Type'}",
                       reason="UNSUPPORTED_PATCH_TYPE", headers={"Accept-Patch": ACCEPT_PATCH})
    body = await read_body(request)
    client, reason, key = ledger(request), write_reason(request), idempotency_key(request)

    async def perform(pre: pb.Precondition | None) -> pb.Resource:
        return await client.patch(name, body, media_type=media_type, precondition=pre,
                                  request_id=key, reason=reason)

    return resource_response(await conditional_write(request, name, perform), request)


async def delete_resource(request: Request, name: str) -> Response:
    client, reason, key = ledger(request), write_reason(request), idempotency_key(request)

    async def perform(pre: pb.Precondition | None) -> pb.Resource:
        return await client.delete(name, precondition=pre, request_id=key, reason=reason)

    await conditional_write(request, name, perform)
    return Response(status_code=204)


async def list_collection(request: Request, parent: str) -> Response:
    page = await ledger(request).list(
        parent, page_size=int_param(request, "page_size", maximum=1000),
        page_token=request.query_params.get("page_token", ""))
    return FastJSONResponse({"resources": [resource_view(r) for r in page.resources],
                         "next_page_token": page.next_page_token})


async def post_collection(request: Request, parent: str) -> Response:
    body = await read_body(request)
    created = await ledger(request).create(
        parent, body, content_type=content_type(request), request_id=idempotency_key(request),
        reason=write_reason(request))
    return resource_response(created, request, status=201,
                             extra={"Location": f"/v1/{created.name}"})


async def history(request: Request, name: str) -> Response:
    include = request.query_params.get("include_content", "false").lower() in ("1", "true")
    page = await ledger(request).versions(
        name, page_size=int_param(request, "page_size", maximum=1000),
        page_token=request.query_params.get("page_token", ""), include_content=include)
    return FastJSONResponse({"versions": [resource_view(v, content=include) for v in page.versions],
                         "next_page_token": page.next_page_token})


def options(allow: str, *, patchable: bool) -> Response:
    headers = {"Allow": allow}
    if patchable:
        headers["Accept-Patch"] = ACCEPT_PATCH
    return Response(status_code=204, headers=headers)


def method_not_allowed(request: Request, allow: str) -> Response:
    return problem(405, "Method not allowed",
                   f"{request.method} is not allowed on {request.url.path}; allowed: {allow}",
                   reason="METHOD_NOT_ALLOWED", headers={"Allow": allow})


async def dispatch(request: Request) -> Response:
    """Route `/v1/{path}` by its shape: `name:history`, `prefix:watch`, resource or collection."""
    raw_path = request.scope.get("raw_path", b"").decode("latin-1")
    path: str = request.path_params["path"]
    if "%" in raw_path.split("?", 1)[0]:
        # Names are unreserved characters only; an encoded byte (%2F above all) would smuggle
        # a different name past the router.
        return problem(400, "Invalid resource name",
                       "resource names never contain percent-encoded characters",
                       reason="INVALID_NAME", field="name")
    if any(segment in ("", ".", "..") for segment in path.split(":", 1)[0].split("/")):
        # The router tells resources from collections by counting segments: an empty or dot
        # segment would route a bad name by the wrong shape (PUT /v1/documents/ with
        # If-None-Match: * created a server-named resource).
        return problem(400, "Invalid resource name", "resource names have no empty, '.' or "
                       "'..' segments", reason="INVALID_NAME", field="name")
    method = request.method
    if path.endswith(":watch"):
        if method == "OPTIONS":
            return options(READ_METHODS, patchable=False)
        if method not in ("GET", "HEAD"):
            return method_not_allowed(request, READ_METHODS)
        return await sse.watch(request, path[: -len(":watch")], ledger(request),
                               settings_of(request).heartbeat_s)
    if path.endswith(":history"):
        if method == "OPTIONS":
            return options(READ_METHODS, patchable=False)
        if method not in ("GET", "HEAD"):
            return method_not_allowed(request, READ_METHODS)
        return await history(request, path[: -len(":history")])
    if ":" in path:
        return problem(404, "Not found", f"no such route: {request.url.path}",
                       reason="NO_ROUTE")
    if len(path.split("/")) % 2 == 0:
        handlers: dict[str, Callable[[Request, str], Awaitable[Response]]] = {
            "GET": get_resource, "HEAD": get_resource, "PUT": put_resource,
            "PATCH": patch_resource, "DELETE": delete_resource,
        }
        allow, patchable = RESOURCE_METHODS, True
    else:
        handlers = {"GET": list_collection, "HEAD": list_collection, "POST": post_collection}
        allow, patchable = COLLECTION_METHODS, False
    if method == "OPTIONS":
        return options(allow, patchable=patchable)
    handler = handlers.get(method)
    if handler is None:
        return method_not_allowed(request, allow)
    return await handler(request, path)


async def guarded(request: Request) -> Response:
    try:
        return await dispatch(request)
    except Problem as p:
        return p.response
    except LedgerCallError as error:
        return from_call_error(error)


async def watch_all(request: Request) -> Response:
    if request.method == "OPTIONS":
        return options(READ_METHODS, patchable=False)
    if request.method not in ("GET", "HEAD"):
        return method_not_allowed(request, READ_METHODS)
    try:
        return await sse.watch(request, "", ledger(request), settings_of(request).heartbeat_s)
    except Problem as p:
        return p.response
    except LedgerCallError as error:
        return from_call_error(error)


async def healthz(request: Request) -> Response:
    return FastJSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    stub = health_pb2_grpc.HealthStub(ledger(request).channel)
    try:
        reply = await stub.Check(health_pb2.HealthCheckRequest(service="casledger.v1.Ledger"),
                                 timeout=2.0)
        serving = reply.status == health_pb2.HealthCheckResponse.SERVING
    except Exception:  # any failure to get an answer means "not ready"
        serving = False
    if serving:
        return FastJSONResponse({"status": "ready"})
    return problem(503, "Service unavailable", "the ledger service is not reachable or not "
                   "serving", reason="SERVICE_UNAVAILABLE")


async def openapi(request: Request) -> Response:
    return FastJSONResponse(openapi_document())


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    reason = {404: "NO_ROUTE", 405: "METHOD_NOT_ALLOWED"}.get(exc.status_code, "HTTP_ERROR")
    headers = dict(exc.headers or {})
    if exc.status_code == 405 and request.url.path.startswith("/v1"):
        # A method no route lists (TRACE, ...): Starlette's Allow would name the route's
        # methods, not what dispatch allows on this path.
        headers["Allow"] = allowed_methods(request.url.path.removeprefix("/v1").lstrip("/"))
    return problem(exc.status_code, str(exc.detail), f"{request.method} {request.url.path}: "
                   f"{exc.detail}", reason=reason, headers=headers)


def allowed_methods(path: str) -> str:
    """The Allow header of a path under /v1, as dispatch answers it."""
    if path.endswith((":watch", ":history")):
        return READ_METHODS
    return RESOURCE_METHODS if len(path.split("/")) % 2 == 0 else COLLECTION_METHODS


async def internal_error(request: Request, exc: Exception) -> Response:
    return problem(500, "Internal error", "the bridge failed unexpectedly; nothing was written "
                   "by this request unless a later read shows it", reason="INTERNAL")


def create_app(settings: BridgeSettings | None = None) -> Starlette:
    """The bridge's ASGI app; its lifespan owns the gRPC channel to ``settings.target``."""
    settings = settings or BridgeSettings()

    metrics = BridgeMetrics()

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        tls_ca, options = target_tls(settings.target_tls_ca, settings.target_tls_name)
        async with connect(settings.target, call_timeout=settings.call_timeout_s,
                           tls_ca=tls_ca, options=options,
                           batching=settings.batch_calls) as client:
            if not settings.read_cache:
                yield {"ledger": client, "settings": settings, "reads": None}
                return
            async with open_read_cache(
                client, max_entries=settings.read_cache_entries,
                max_bytes=settings.read_cache_bytes, wait_s=settings.read_cache_wait_s,
                idle_s=settings.read_cache_idle_s or None, metrics=metrics,
            ) as reads:
                yield {"ledger": client, "settings": settings, "reads": reads}

    requests, streams = Gate(settings.max_in_flight), Gate(settings.max_watchers)
    metrics.track(in_flight=lambda: requests.in_flight, sse_streams=lambda: streams.in_flight)
    # Outermost: every request gets its id, metrics and access line, CORS preflights too.
    middleware = [Middleware(RequestObserver, metrics=metrics)]
    if settings.cors_allow_origins:
        middleware.append(Middleware(
            CORSMiddleware, allow_origins=list(settings.cors_allow_origins),
            allow_methods=["GET", "HEAD", "PUT", "PATCH", "DELETE", "POST", "OPTIONS"],
            allow_headers=[*CONDITIONAL_HEADERS, "Content-Type", "Idempotency-Key", "Prefer",
                           REASON_HEADER, "Authorization", "Last-Event-ID", "X-Request-Id"],
            expose_headers=list(EXPOSED_HEADERS), max_age=600,
        ))
    middleware.append(Middleware(ForwardAuthorization))
    middleware.append(Middleware(LoadShedder, requests=requests, streams=streams,
                                 metrics=metrics))
    methods = ["GET", "HEAD", "PUT", "PATCH", "DELETE", "POST", "OPTIONS"]
    return Starlette(
        routes=[
            Route("/healthz", healthz, methods=["GET"]),
            Route("/readyz", readyz, methods=["GET"]),
            Route("/openapi.json", openapi, methods=["GET"]),
            Route("/metrics", metrics.endpoint, methods=["GET"]),
            Route("/v1:watch", watch_all, methods=methods),
            Route("/v1/{path:path}", guarded, methods=methods),
        ],
        middleware=middleware,
        lifespan=lifespan,
        exception_handlers={HTTPException: http_error, Exception: internal_error},
    )
