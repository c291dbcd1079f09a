"""Domain errors of the ledger, raised with fields, never with a message to parse.

Each class carries the ``reason`` that travels in ``google.rpc.ErrorInfo`` (the same idea in
SCREAMING_SNAKE) and the structured metadata a client needs to act on it. The mapping to gRPC
status codes lives in ``servicer.py``; the mapping to HTTP statuses in ``http_bridge/errors.py``.

    LedgerError
    ├── InvalidArgument                INVALID_ARGUMENT (field)
    │   ├── InvalidName                INVALID_NAME
    │   ├── InvalidContent             INVALID_CONTENT
    │   ├── InvalidPageToken           INVALID_PAGE_TOKEN
    │   ├── InvalidPrecondition        INVALID_PRECONDITION
    │   ├── InvalidPatch               INVALID_PATCH
    │   ├── UnsupportedPatchType       UNSUPPORTED_PATCH_TYPE
    │   ├── UnknownField               UNKNOWN_FIELD
    │   ├── ContentTooLarge            CONTENT_TOO_LARGE (limit)
    │   └── IdempotencyKeyReused       IDEMPOTENCY_KEY_REUSED
    ├── PreconditionRequired           PRECONDITION_REQUIRED (current_version, current_etag)
    ├── VersionMismatch                VERSION_MISMATCH (current_version, current_etag)
    ├── ModifiedSince                  MODIFIED_SINCE (current_version, current_etag)
    ├── ResourceAlreadyExists          ALREADY_EXISTS (current_version, current_etag)
    ├── ResourceNotFound               NOT_FOUND (deleted_at_version)
    ├── PatchConflict                  PATCH_CONFLICT
    ├── WatcherTooSlow                 WATCHER_TOO_SLOW (resume_revision)
    ├── ShuttingDown                   SHUTTING_DOWN (resume_revision)
    ├── StorageUnavailable             STORAGE_UNAVAILABLE
    ├── Overloaded                     OVERLOADED (retry_after_s)
    ├── Unauthenticated                UNAUTHENTICATED
    └── PermissionDenied               PERMISSION_DENIED (principal, scope | name)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar


@dataclass(frozen=True, slots=True)
class CurrentState:
    """What a refused write is told about the resource as it stands."""

    version: int
    etag: str


class LedgerError(Exception):
    """Base of every error the ledger reports to a caller."""

    reason: ClassVar[str] = "LEDGER_ERROR"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def metadata(self) -> dict[str, str]:
        """The ErrorInfo metadata: string keys to string values."""
        return {}


class InvalidArgument(LedgerError):
    """The request itself is wrong; retrying it unchanged cannot succeed."""

    reason = "INVALID_ARGUMENT"

    def __init__(self, message: str, *, field: str) -> None:
        super().__init__(message)
        self.field = field

    def metadata(self) -> dict[str, str]:
        return {"field": self.field}


class InvalidName(InvalidArgument):
    reason = "INVALID_NAME"


class InvalidContent(InvalidArgument):
    reason = "INVALID_CONTENT"


class InvalidPageToken(InvalidArgument):
    reason = "INVALID_PAGE_TOKEN"

    def __init__(self, message: str = "the page token is not one this server issued for this "
                 "request", *, field: str = "page_token") -> None:
        super().__init__(message, field=field)


class InvalidPrecondition(InvalidArgument):
    reason = "INVALID_PRECONDITION"


class InvalidPatch(InvalidArgument):
    reason = "INVALID_PATCH"


class UnsupportedPatchType(InvalidArgument):
    reason = "UNSUPPORTED_PATCH_TYPE"

    def __init__(self, media_type: str, *, field: str = "patch.media_type") -> None:
        super().__init__(
            f"patch media type {media_type!r} is not supported; use "
            "application/merge-patch+json or application/json-patch+json",
            field=field,
        )
        self.media_type = media_type


class UnknownField(InvalidArgument):
    reason = "UNKNOWN_FIELD"


class ContentTooLarge(InvalidArgument):
    reason = "CONTENT_TOO_LARGE"

    def __init__(self, size: int, limit: int, *, field: str = "content") -> None:
        super().__init__(f"content is {size} bytes; the limit is {limit} bytes", field=field)
        self.size = size
        self.limit = limit

    def metadata(self) -> dict[str, str]:
        return {"field": self.field, "limit": str(self.limit)}


class IdempotencyKeyReused(InvalidArgument):
    reason = "IDEMPOTENCY_KEY_REUSED"

    def __init__(self, name: str, request_id: str) -> None:
        super().__init__(
            f"request id {request_id!r} was already used for a different request on {name!r}",
            field="request_id",
        )
        self.name = name
        self.request_id = request_id


class _AboutCurrent(LedgerError):
    """An error that tells the caller the resource's current version and ETag, if it exists."""

    def __init__(self, message: str, *, name: str, current: CurrentState | None) -> None:
        super().__init__(message)
        self.name = name
        self.current = current

    def metadata(self) -> dict[str, str]:
        if self.current is None:
            return {"name": self.name}
        return {
            "name": self.name,
            "current_version": str(self.current.version),
            "current_etag": self.current.etag,
        }


class PreconditionRequired(_AboutCurrent):
    reason = "PRECONDITION_REQUIRED"

    def __init__(self, *, name: str, current: CurrentState | None) -> None:
        if current is None:
            message = (f"{name} does not exist; a write needs a precondition: create it with "
                       "CreateResource (HTTP: PUT with If-None-Match: *)")
        else:
            message = (f"a write to {name} must say which version it edits: set a precondition "
                       f"(the current etag is {current.etag}, version {current.version})")
        super().__init__(message, name=name, current=current)


class VersionMismatch(_AboutCurrent):
    reason = "VERSION_MISMATCH"

    def __init__(self, *, name: str, expected: str, current: CurrentState | None) -> None:
        # The status message travels in gRPC metadata (16 KiB at most): quote only the start of
        # whatever the client sent (a 100 KB If-Match once overflowed it).
        shown = expected if len(expected) <= 120 else expected[:117] + "..."
        if current is None:
            message = f"{name} does not exist, so it cannot match {shown}"
        else:
            message = (f"{name} is at version {current.version} (etag {current.etag}), not "
                       f"{shown}: re-read it and retry")
        super().__init__(message, name=name, current=current)
        self.expected = expected


class ModifiedSince(_AboutCurrent):
    reason = "MODIFIED_SINCE"

    def __init__(self, *, name: str, since: str, current: CurrentState) -> None:
        super().__init__(
            f"{name} was modified after {since} or more than once within that second "
            f"(now version {current.version}, etag {current.etag}): re-read it and retry",
            name=name, current=current,
        )
        self.since = since


class ResourceAlreadyExists(_AboutCurrent):
    reason = "ALREADY_EXISTS"

    def __init__(self, *, name: str, current: CurrentState) -> None:
        super().__init__(f"{name} already exists (version {current.version})",
                         name=name, current=current)


class ResourceNotFound(LedgerError):
    reason = "NOT_FOUND"

    def __init__(self, *, name: str, version: int = 0, deleted_at_version: int = 0) -> None:
        if version:
            message = f"{name} has no version {version}"
        elif deleted_at_version:
            message = f"{name} was deleted at version {deleted_at_version}"
        else:
            message = f"{name} does not exist"
        super().__init__(message)
        self.name = name
        self.version = version
        self.deleted_at_version = deleted_at_version

    def metadata(self) -> dict[str, str]:
        meta = {"name": self.name}
        if self.deleted_at_version:
            meta["deleted_at_version"] = str(self.deleted_at_version)
        return meta


class PatchConflict(LedgerError):
    """A well-formed patch that does not apply to the current content (a failing `test`)."""

    reason = "PATCH_CONFLICT"

    def __init__(self, message: str, *, path: str = "") -> None:
        super().__init__(message)
        self.path = path

    def metadata(self) -> dict[str, str]:
        return {"path": self.path} if self.path else {}


class WatcherTooSlow(LedgerError):
    """A watcher fell too far behind the live stream; it may resume from `resume_revision`."""

    reason = "WATCHER_TOO_SLOW"

    def __init__(self, *, resume_revision: int) -> None:
        super().__init__(
            "the watcher fell too far behind the ledger; resume with start_revision="
            f"{resume_revision}"
        )
        self.resume_revision = resume_revision

    def metadata(self) -> dict[str, str]:
        return {"resume_revision": str(self.resume_revision)}


class ShuttingDown(LedgerError):
    """The service is stopping; a watcher may resume from `resume_revision` elsewhere or later."""

    reason = "SHUTTING_DOWN"

    def __init__(self, *, resume_revision: int) -> None:
        super().__init__(
            f"the service is shutting down; resume with start_revision={resume_revision}"
        )
        self.resume_revision = resume_revision

    def metadata(self) -> dict[str, str]:
        return {"resume_revision": str(self.resume_revision)}


class StorageUnavailable(LedgerError):
    """The store cannot be reached or is busy; the write was not applied and may be retried."""

    reason = "STORAGE_UNAVAILABLE"


class Overloaded(LedgerError):
    """The process is at its bound of in-flight work and refused this call at once, without
    doing any of it; retry after `retry_after_s` seconds (elsewhere, or with backoff)."""

    reason = "OVERLOADED"

    def __init__(self, *, limit: int, what: str = "calls", retry_after_s: int = 1) -> None:
        super().__init__(f"the service is at its limit of {limit} in-flight {what}; retry "
                         f"after {retry_after_s} s")
        self.limit = limit
        self.retry_after_s = retry_after_s

    def metadata(self) -> dict[str, str]:
        return {"retry_after_s": str(self.retry_after_s)}


class Unauthenticated(LedgerError):
    """The call carries no bearer token, or one the service does not know (or has revoked)."""

    reason = "UNAUTHENTICATED"


class PermissionDenied(LedgerError):
    """A valid token that may not do this: it lacks the `scope`, or `name` (a resource name,
    a parent collection, a watch prefix) lies outside its prefixes."""

    reason = "PERMISSION_DENIED"

    def __init__(self, message: str, *, principal: str, scope: str = "",
                 name: str = "") -> None:
        super().__init__(message)
        self.principal = principal
        self.scope = scope
        self.name = name

    def metadata(self) -> dict[str, str]:
        meta = {"principal": self.principal}
        if self.scope:
            meta["scope"] = self.scope
        if self.name:
            meta["name"] = self.name
        return meta
