"""The async gRPC client of the ledger, used by the bridge, the CLI and internal callers alike.

``connect(target)`` owns the channel. Every failed call raises one exception type,
:class:`LedgerCallError`, carrying the gRPC code and the decoded ``ErrorInfo`` (reason and
metadata) — the only place ``grpc.aio.AioRpcError`` is translated. :meth:`LedgerClient.update`
is the read-modify-write loop every caller would otherwise write again: read, apply a function,
compare-and-swap on the version read, and on VERSION_MISMATCH read again and retry.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from contextvars import ContextVar
from typing import Any, TypeVar

import grpc
from google.rpc import error_details_pb2, status_pb2

from . import errors
from .api.casledger.v1 import ledger_pb2 as pb
from .api.casledger.v1 import ledger_pb2_grpc as pb_grpc

DEFAULT_TARGET = "127.0.0.1:50051"
DEFAULT_TIMEOUT_S = 10.0
# A connection idle this long is pinged; one whose ping is not answered within
# KEEPALIVE_TIMEOUT_S (or keepalive_s, if shorter) is closed, failing its calls with
# UNAVAILABLE. Without it a silently dead connection (a peer that vanished, a NAT or firewall
# that dropped the flow) would leave a Watch waiting forever. The service accepts pings as often
# as every --grpc-keepalive-min-s (5 s by default).
KEEPALIVE_S = 30.0
KEEPALIVE_TIMEOUT_S = 10.0
_DETAILS_KEY = "grpc-status-details-bin"
# Initial metadata of an accepted Watch: the ledger's revision at that moment.
WATCH_REVISION_KEY = "casledger-revision"
R = TypeVar("R")

# Metadata sent with every call made in this context (e.g. the bridge sets the caller's
# credentials and request id per HTTP request), without threading it through every method.
call_metadata: ContextVar[tuple[tuple[str, str], ...]] = ContextVar("call_metadata",
                                                                    default=())


class LedgerCallError(Exception):
    """A call to the ledger failed: the gRPC code plus the ErrorInfo reason and metadata."""

    def __init__(self, code: grpc.StatusCode, message: str, reason: str = "",
                 metadata: dict[str, str] | None = None) -> None:
        super().__init__(f"{code.name}: {reason + ': ' if reason else ''}{message}")
        self.code = code
        self.message = message
        self.reason = reason
        self.metadata = metadata or {}

    @property
    def current_version(self) -> int | None:
        value = self.metadata.get("current_version")
        return int(value) if value else None

    @property
    def current_etag(self) -> str | None:
        return self.metadata.get("current_etag") or None

    @classmethod
    def not_found(cls, name: str, *, deleted_at_version: int = 0) -> LedgerCallError:
        """What GetResource of the current version answers when `name` does not exist (or was
        deleted at `deleted_at_version`), made from the service's own domain error: an answer
        given without the call (the bridge's read cache) is the service's, word for word."""
        error = errors.ResourceNotFound(name=name, deleted_at_version=deleted_at_version)
        return cls(grpc.StatusCode.NOT_FOUND, error.message, error.reason, error.metadata())

    @classmethod
    def from_rpc_error(cls, error: grpc.aio.AioRpcError) -> LedgerCallError:
        return cls.from_status(error.code(), error.details(), error.trailing_metadata())

    @classmethod
    def from_status(cls, code: grpc.StatusCode, details: str | None,
                    trailing: Any) -> LedgerCallError:
        for key, value in trailing or ():
            if key == _DETAILS_KEY and isinstance(value, bytes):
                reason, metadata = _error_info(status_pb2.Status.FromString(value))
                return cls(code, details or "", reason, metadata)
        return cls(code, details or "")

    @classmethod
    def from_status_message(cls, status: status_pb2.Status) -> LedgerCallError:
        """The error of a google.rpc.Status (a Batch result), as its unary call raises it."""
        code = _CODES.get(status.code, grpc.StatusCode.UNKNOWN)
        return cls(code, status.message, *_error_info(status))


_CODES = {code.value[0]: code for code in grpc.StatusCode}


def _error_info(status: status_pb2.Status) -> tuple[str, dict[str, str]]:
    reason, metadata = "", {}
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            reason, metadata = info.reason, dict(info.metadata)
    return reason, metadata


def precondition(*, etag: str | None = None, version: int | None = None,
                 exists: bool | None = None) -> pb.Precondition | None:
    """The Precondition for whichever one argument is given (None when none is)."""
    if etag is not None:
        return pb.Precondition(etag=etag)
    if version is not None:
        return pb.Precondition(version=version)
    if exists is not None:
        return pb.Precondition(exists=exists)
    return None


class WatchStream:
    """A running Watch: iterate for events; `revision` is the ledger's revision when the
    service accepted it. Failures while streaming raise LedgerCallError."""

    def __init__(self, call: Any, revision: int) -> None:
        self._call = call
        self.revision = revision

    async def __aiter__(self) -> AsyncIterator[pb.WatchEvent]:
        try:
            async for event in self._call:
                yield event
        except grpc.aio.AioRpcError as error:
            raise LedgerCallError.from_rpc_error(error) from None

    def close(self) -> None:
        self._call.cancel()


class LedgerClient:
    """Calls the Ledger service over one channel; every unary call has a deadline."""

    def __init__(self, channel: grpc.aio.Channel, *,
                 call_timeout: float = DEFAULT_TIMEOUT_S) -> None:
        self.channel = channel
        self.stub = pb_grpc.LedgerStub(channel)
        self.call_timeout = call_timeout

    async def _call(self, method: str, request: Any, returns: type[R]) -> R:
        try:
            response = await getattr(self.stub, method)(
                request, timeout=self.call_timeout, metadata=call_metadata.get())
        except grpc.aio.AioRpcError as error:
            raise LedgerCallError.from_rpc_error(error) from None
        assert isinstance(response, returns)
        return response

    async def batch(self, operations: Sequence[pb.BatchOperation]
                    ) -> list[pb.Resource | LedgerCallError]:
        """Many single-resource calls in one Batch call (independent, as if made at once): for
        each operation, in order, its Resource or the error its unary call would have raised
        (returned, not raised). Raises only when the Batch call itself fails."""
        reply = await self._call("Batch", pb.BatchRequest(operations=operations),
                                 pb.BatchResponse)
        return [result.resource if result.HasField("resource")
                else LedgerCallError.from_status_message(result.status)
                for result in reply.results]

    async def aclose(self) -> None:
        """Finish what is in flight before the channel closes (nothing to do here)."""

    async def get(self, name: str, version: int = 0) -> pb.Resource:
        request = pb.GetResourceRequest(name=name, version=version)
        return await self._call("GetResource", request, pb.Resource)

    async def revision(self) -> int:
        """The ledger's latest committed revision: every write acknowledged before this call
        was made is at or below it (GetRevision, the read index of a linearizable read)."""
        response = await self._call("GetRevision", pb.GetRevisionRequest(),
                                    pb.GetRevisionResponse)
        return response.revision

    async def list(self, parent: str, *, page_size: int = 0,
                   page_token: str = "") -> pb.ListResourcesResponse:
        request = pb.ListResourcesRequest(parent=parent, page_size=page_size,
                                          page_token=page_token)
        return await self._call("ListResources", request, pb.ListResourcesResponse)

    async def create(self, parent: str, content: bytes, *, resource_id: str = "",
                     content_type: str = "application/json", request_id: str = "",
                     reason: str = "") -> pb.Resource:
        request = pb.CreateResourceRequest(
            parent=parent, resource_id=resource_id, content=content, content_type=content_type,
            request_id=request_id, reason=reason)
        return await self._call("CreateResource", request, pb.Resource)

    async def replace(self, name: str, content: bytes, *, content_type: str = "application/json",
                      precondition: pb.Precondition | None, request_id: str = "",
                      reason: str = "") -> pb.Resource:
        """Write a whole new content; `precondition` is required by the service."""
        request = pb.UpdateResourceRequest(
            name=name, content=pb.ResourceContent(data=content, content_type=content_type),
            precondition=precondition, request_id=request_id, reason=reason)
        return await self._call("UpdateResource", request, pb.Resource)

    async def patch(self, name: str, document: bytes, *, media_type: str,
                    precondition: pb.Precondition | None, request_id: str = "",
                    reason: str = "") -> pb.Resource:
        """Have the service apply a merge patch or JSON Patch atomically."""
        request = pb.UpdateResourceRequest(
            name=name, patch=pb.Patch(media_type=media_type, document=document),
            precondition=precondition, request_id=request_id, reason=reason)
        return await self._call("UpdateResource", request, pb.Resource)

    async def delete(self, name: str, *, precondition: pb.Precondition | None,
                     request_id: str = "", reason: str = "") -> pb.Resource:
        request = pb.DeleteResourceRequest(
            name=name, precondition=precondition, request_id=request_id, reason=reason)
        return await self._call("DeleteResource", request, pb.Resource)

    async def versions(self, name: str, *, page_size: int = 0, page_token: str = "",
                       include_content: bool = False) -> pb.ListVersionsResponse:
        request = pb.ListVersionsRequest(
            name=name, page_size=page_size, page_token=page_token,
            include_content=include_content)
        return await self._call("ListVersions", request, pb.ListVersionsResponse)

    async def history(self, name: str, *, include_content: bool = False
                      ) -> AsyncIterator[pb.Resource]:
        """Every version of `name`, oldest first, across pages."""
        token = ""
        while True:
            page = await self.versions(name, page_token=token, include_content=include_content)
            for version in page.versions:
                yield version
            token = page.next_page_token
            if not token:
                return

    async def open_watch(self, prefix: str = "", start_revision: int = 0) -> WatchStream:
        """Start a Watch and wait until the service accepted it: a bad prefix or revision
        raises here, before the first event, so a caller can still answer with an error."""
        call = self.stub.Watch(pb.WatchRequest(prefix=prefix, start_revision=start_revision),
                               timeout=None, metadata=call_metadata.get())
        try:
            metadata = await asyncio.wait_for(call.initial_metadata(), self.call_timeout)
        except (grpc.aio.AioRpcError, TimeoutError) as error:
            call.cancel()
            if isinstance(error, grpc.aio.AioRpcError):
                raise LedgerCallError.from_rpc_error(error) from None
            raise LedgerCallError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                  "the service did not accept the watch in time") from None
        if call.done():
            code = await call.code()
            if code != grpc.StatusCode.OK:
                details = await call.details()
                trailing = await call.trailing_metadata()
                raise LedgerCallError.from_status(code, details, trailing)
        revision = dict(metadata or ()).get(WATCH_REVISION_KEY, "0")
        return WatchStream(call, int(revision) if str(revision).isdigit() else 0)

    async def watch(self, prefix: str = "", start_revision: int = 0
                    ) -> AsyncIterator[pb.WatchEvent]:
        """Replay from `start_revision` (inclusive), then follow live; no deadline."""
        stream = await self.open_watch(prefix, start_revision)
        try:
            async for event in stream:
                yield event
        finally:
            stream.close()

    async def update(self, name: str, change: Callable[[bytes], bytes], *, attempts: int = 16,
                     reason: str = "") -> pb.Resource:
        """Read-modify-write with compare-and-swap: `change` maps the current content to the
        new one; on VERSION_MISMATCH the resource is read again and `change` applied again."""
        for attempt in range(attempts):
            current = await self.get(name)
            try:
                return await self.replace(
                    name, change(current.content), content_type=current.content_type,
                    precondition=pb.Precondition(etag=current.etag), reason=reason)
            except LedgerCallError as error:
                if error.reason != "VERSION_MISMATCH" or attempt == attempts - 1:
                    raise
                # Full jitter: writers that collided must not retry in lockstep, or the
                # same ones collide again and again and run out of attempts.
                await asyncio.sleep(random.uniform(0, min(0.001 * 2**attempt, 0.1)))
        raise AssertionError("unreachable")


def keepalive_options(keepalive_s: float) -> list[tuple[str, int]]:
    """Channel options that ping a connection idle for `keepalive_s` seconds (0: none)."""
    if keepalive_s <= 0:
        return []
    timeout_ms = round(min(keepalive_s, KEEPALIVE_TIMEOUT_S) * 1000)
    return [
        ("grpc.keepalive_time_ms", round(keepalive_s * 1000)),
        ("grpc.keepalive_timeout_ms", timeout_ms),
        # grpc 1.85 times an unanswered ping out after this (1 minute by default), whatever
        # keepalive_timeout_ms says: without it a dead connection took 60 s to notice.
        ("grpc.http2.ping_timeout_ms", timeout_ms),
        # Keep pinging a quiet Watch: by default gRPC stops after two pings without data.
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.keepalive_permit_without_calls", 1),
    ]


@asynccontextmanager
async def connect(target: str = DEFAULT_TARGET, *, call_timeout: float = DEFAULT_TIMEOUT_S,
                  options: list[tuple[str, Any]] | None = None,
                  tls_ca: bytes | None = None,
                  batching: bool = False,
                  keepalive_s: float = KEEPALIVE_S) -> AsyncIterator[LedgerClient]:
    """A client on a new channel to `target`; the channel closes when the block ends. With
    `tls_ca` (PEM root certificates) the channel is TLS, verifying the service against them.
    With `batching`, concurrent single-resource calls travel together in Batch calls
    (:class:`casledger.service.batching.BatchingClient`). The connection is pinged after
    `keepalive_s` seconds without traffic (0: never), see KEEPALIVE_S."""
    all_options = [("grpc.max_receive_message_length", 256 << 20),
                   *keepalive_options(keepalive_s), *(options or [])]
    channel = (grpc.aio.insecure_channel(target, options=all_options) if tls_ca is None else
               grpc.aio.secure_channel(target, grpc.ssl_channel_credentials(tls_ca),
                                       options=all_options))
    client: LedgerClient
    if batching:
        from .batching import BatchingClient

        client = BatchingClient(channel, call_timeout=call_timeout)
    else:
        client = LedgerClient(channel, call_timeout=call_timeout)
    try:
        yield client
    finally:
        await client.aclose()
        await channel.close()
