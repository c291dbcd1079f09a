"""The async gRPC client of the ledger, used by the bridge, the CLI and internal callers alike.

``connect(target)`` owns the channel. Every failed call raises one exception type,
:class:`LedgerCallError`, carrying the gRPC code and the decoded ``ErrorInfo`` (reason and
metadata) — the only place ``grpc.aio.AioRpcError`` is translated. :meth:`LedgerClient.update`
is the read-modify-write loop every caller would otherwise write again: read, apply a function,
compare-and-swap on the version read, and on VERSION_MISMATCH read again and retry.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import grpc
from google.rpc import error_details_pb2, status_pb2

from .api.casledger.v1 import ledger_pb2 as pb
from .api.casledger.v1 import ledger_pb2_grpc as pb_grpc

DEFAULT_TARGET = "127.0.0.1:50051"
DEFAULT_TIMEOUT_S = 10.0
_DETAILS_KEY = "grpc-status-details-bin"


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
    def from_rpc_error(cls, error: grpc.aio.AioRpcError) -> LedgerCallError:
        reason, metadata = "", {}
        for key, value in error.trailing_metadata() or ():
            if key == _DETAILS_KEY and isinstance(value, bytes):
                status = status_pb2.Status.FromString(value)
                for detail in status.details:
                    info = error_details_pb2.ErrorInfo()
                    if detail.Unpack(info):
                        reason, metadata = info.reason, dict(info.metadata)
        return cls(error.code(), error.details() or "", reason, metadata)


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


class LedgerClient:
    """Calls the Ledger service over one channel; every unary call has a deadline."""

    def __init__(self, channel: grpc.aio.Channel, *, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        self.channel = channel
        self.stub = pb_grpc.LedgerStub(channel)
        self.timeout = timeout

    async def _call(self, method: str, request: Any, *, metadata: Any = None) -> Any:
        try:
            return await getattr(self.stub, method)(
                request, timeout=self.timeout, metadata=metadata
            )
        except grpc.aio.AioRpcError as error:
            raise LedgerCallError.from_rpc_error(error) from None

    async def get(self, name: str, version: int = 0) -> pb.Resource:
        return await self._call("GetResource", pb.GetResourceRequest(name=name, version=version))

    async def list(self, parent: str, *, page_size: int = 0,
                   page_token: str = "") -> pb.ListResourcesResponse:
        return await self._call("ListResources", pb.ListResourcesRequest(
            parent=parent, page_size=page_size, page_token=page_token))

    async def create(self, parent: str, content: bytes, *, resource_id: str = "",
                     content_type: str = "application/json", request_id: str = "",
                     reason: str = "") -> pb.Resource:
        return await self._call("CreateResource", pb.CreateResourceRequest(
            parent=parent, resource_id=resource_id, content=content, content_type=content_type,
            request_id=request_id, reason=reason))

    async def replace(self, name: str, content: bytes, *, content_type: str = "application/json",
                      precondition: pb.Precondition | None, request_id: str = "",
                      reason: str = "") -> pb.Resource:
        """Write a whole new content; `precondition` is required by the service."""
        return await self._call("UpdateResource", pb.UpdateResourceRequest(
            name=name, content=pb.ResourceContent(data=content, content_type=content_type),
            precondition=precondition, request_id=request_id, reason=reason))

    async def patch(self, name: str, document: bytes, *, media_type: str,
                    precondition: pb.Precondition | None, request_id: str = "",
                    reason: str = "") -> pb.Resource:
        """Have the service apply a merge patch or JSON Patch atomically."""
        return await self._call("UpdateResource", pb.UpdateResourceRequest(
            name=name, patch=pb.Patch(media_type=media_type, document=document),
            precondition=precondition, request_id=request_id, reason=reason))

    async def delete(self, name: str, *, precondition: pb.Precondition | None,
                     request_id: str = "", reason: str = "") -> pb.Resource:
        return await self._call("DeleteResource", pb.DeleteResourceRequest(
            name=name, precondition=precondition, request_id=request_id, reason=reason))

    async def versions(self, name: str, *, page_size: int = 0, page_token: str = "",
                       include_content: bool = False) -> pb.ListVersionsResponse:
        return await self._call("ListVersions", pb.ListVersionsRequest(
            name=name, page_size=page_size, page_token=page_token,
            include_content=include_content))

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

    async def watch(self, prefix: str = "", start_revision: int = 0
                    ) -> AsyncIterator[pb.WatchEvent]:
        """Replay from `start_revision` (inclusive), then follow live; no deadline."""
        call = self.stub.Watch(pb.WatchRequest(prefix=prefix, start_revision=start_revision))
        try:
            async for event in call:
                yield event
        except grpc.aio.AioRpcError as error:
            raise LedgerCallError.from_rpc_error(error) from None
        finally:
            call.cancel()

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
                await asyncio.sleep(min(0.001 * 2**attempt, 0.1))
        raise AssertionError("unreachable")


@asynccontextmanager
async def connect(target: str = DEFAULT_TARGET, *, timeout: float = DEFAULT_TIMEOUT_S,
                  options: list[tuple[str, Any]] | None = None) -> AsyncIterator[LedgerClient]:
    """A client on a new channel to `target`; the channel closes when the block ends."""
    channel = grpc.aio.insecure_channel(target, options=[
        ("grpc.max_receive_message_length", 256 << 20), *(options or [])])
    try:
        yield LedgerClient(channel, timeout=timeout)
    finally:
        await channel.close()
