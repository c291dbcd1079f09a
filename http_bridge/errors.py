"""Ledger errors -> HTTP: one table keyed on ``ErrorInfo.reason``, problem+json bodies (RFC 9457).

The bridge maps on the reason first and falls back on the gRPC code only for failures that carry
no casledger reason (the service unreachable, a deadline, an upstream bug): UNAVAILABLE -> 503
and DEADLINE_EXCEEDED -> 504, both with ``Retry-After``; anything unexpected -> 502, because the
fault is upstream. The bridge never answers 500 for a ledger error.
"""

from __future__ import annotations

from typing import Any

import grpc
from starlette.responses import JSONResponse, Response

from casledger.service.client import LedgerCallError

from .jsonio import FastJSONResponse

PROBLEM_JSON = "application/problem+json"
PROBLEM_BASE = "https://casledger.dev/problems/"
RETRY_AFTER_S = 1

# reason -> (HTTP status, title). Every casledger reason has a row (a test checks it).
HTTP_STATUS: dict[str, tuple[int, str]] = {
    "INVALID_ARGUMENT": (400, "Invalid request"),
    "INVALID_NAME": (400, "Invalid resource name"),
    "INVALID_CONTENT": (400, "Invalid content"),
    "INVALID_PAGE_TOKEN": (400, "Invalid page token"),
    "INVALID_PRECONDITION": (400, "Invalid precondition"),
    "INVALID_PATCH": (400, "Malformed patch document"),
    "UNSUPPORTED_PATCH_TYPE": (415, "Unsupported patch media type"),
    "UNKNOWN_FIELD": (400, "Unknown field"),
    "CONTENT_TOO_LARGE": (413, "Content too large"),
    "IDEMPOTENCY_KEY_REUSED": (422, "Idempotency key reused"),
    "PRECONDITION_REQUIRED": (428, "Precondition required"),
    "VERSION_MISMATCH": (412, "Precondition failed"),
    "MODIFIED_SINCE": (412, "Precondition failed"),
    "ALREADY_EXISTS": (409, "Resource already exists"),
    "NOT_FOUND": (404, "Not found"),
    "PATCH_CONFLICT": (409, "Patch does not apply"),
    "WATCHER_TOO_SLOW": (503, "Watcher too slow"),
    "SHUTTING_DOWN": (503, "Service shutting down"),
    "STORAGE_UNAVAILABLE": (503, "Storage unavailable"),
    # The service's own load shedding: the server is temporarily overloaded (RFC 9110 §15.6.4),
    # not this client over a rate (429); a retry after Retry-After, here or elsewhere, may pass.
    "OVERLOADED": (503, "Service overloaded"),
    "UNAUTHENTICATED": (401, "Unauthenticated"),
    "PERMISSION_DENIED": (403, "Permission denied"),
}

# For failures without a casledger reason: the gRPC code decides.
CODE_STATUS: dict[grpc.StatusCode, tuple[int, str]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "Invalid request"),
    grpc.StatusCode.NOT_FOUND: (404, "Not found"),
    grpc.StatusCode.ALREADY_EXISTS: (409, "Conflict"),
    grpc.StatusCode.FAILED_PRECONDITION: (412, "Precondition failed"),
    grpc.StatusCode.ABORTED: (409, "Conflict"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "Out of range"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "Unauthenticated"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "Permission denied"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "Too many requests"),
    grpc.StatusCode.UNAVAILABLE: (503, "Service unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "Service timed out"),
    grpc.StatusCode.CANCELLED: (503, "Service unavailable"),
}
UPSTREAM_FAILURE = (502, "Bad gateway")
_TITLE_OF_STATUS = {412: "Precondition failed", 409: "Conflict", 400: "Invalid request"}
RETRYABLE = {429, 503, 504}


def problem_type(reason: str) -> str:
    return PROBLEM_BASE + reason.lower().replace("_", "-")


def problem(status: int, title: str, detail: str, *, reason: str,
            headers: dict[str, str] | None = None, **extra: Any) -> JSONResponse:
    """An RFC 9457 problem+json response; `extra` members with None values are left out."""
    body: dict[str, Any] = {
        "type": problem_type(reason), "title": title, "status": status, "detail": detail,
        "reason": reason,
    }
    body.update({k: v for k, v in extra.items() if v is not None})
    all_headers = dict(headers or {})
    if status in RETRYABLE:
        all_headers.setdefault("Retry-After", str(RETRY_AFTER_S))
    if status == 401:
        all_headers.setdefault("WWW-Authenticate", 'Bearer realm="casledger"')
    return FastJSONResponse(body, status_code=status, headers=all_headers,
                            media_type=PROBLEM_JSON)


def status_of(error: LedgerCallError) -> tuple[int, str]:
    if error.reason in HTTP_STATUS:
        return HTTP_STATUS[error.reason]
    return CODE_STATUS.get(error.code, UPSTREAM_FAILURE)


def from_call_error(error: LedgerCallError, *, status: int | None = None,
                    detail: str | None = None, **extra: Any) -> JSONResponse:
    """The problem response for a failed ledger call (status/detail may be overridden)."""
    mapped, title = status_of(error)
    if status is not None and status != mapped:
        title = _TITLE_OF_STATUS.get(status, title)
    status = status or mapped
    meta = error.metadata
    headers: dict[str, str] = {}
    current_etag = meta.get("current_etag")
    if current_etag and status in (412, 428):
        headers["ETag"] = current_etag
    if status == 428:
        headers["Cache-Control"] = "no-store"
    retry_after = meta.get("retry_after_s", "")
    if status in RETRYABLE and retry_after.isascii() and retry_after.isdigit():
        headers["Retry-After"] = retry_after
    reason = error.reason or error.code.name
    fields: dict[str, Any] = {
        "current_etag": current_etag,
        "current_version": int(meta["current_version"]) if "current_version" in meta else None,
        "deleted_at_version": int(meta["deleted_at_version"])
        if "deleted_at_version" in meta else None,
        "field": meta.get("field"),
        "limit": int(meta["limit"]) if "limit" in meta else None,
        "path": meta.get("path"),
        "resume_revision": int(meta["resume_revision"]) if "resume_revision" in meta else None,
    }
    fields.update(extra)
    message = detail or error.message or title
    return problem(status, title, message, reason=reason, headers=headers, **fields)


class Problem(Exception):
    """Raised inside a handler to answer with a ready problem response."""

    def __init__(self, response: Response) -> None:
        super().__init__(response.status_code)
        self.response = response


def bad_request(detail: str, *, reason: str = "INVALID_ARGUMENT", **extra: Any) -> Problem:
    return Problem(problem(400, "Invalid request", detail, reason=reason, **extra))
