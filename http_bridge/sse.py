"""Server-Sent Events over the ledger's Watch: `id:` is the revision, so a reconnecting
EventSource resumes exactly after the last event it saw (``Last-Event-ID``, exclusive), and
``?start_revision=N`` replays from N (inclusive).

A pump task reads the gRPC stream into a small bounded queue; the response loop takes from the
queue, sending a heartbeat comment whenever nothing arrived for ``heartbeat_s``. A slow HTTP
client therefore pushes back on the gRPC stream instead of growing memory; the service ends a
watcher that falls too far behind, and the client gets an ``error`` event naming the revision
to resume from.

A client that stops reading altogether (a stalled connection: its TCP window stays shut) would
hold its stream forever, bounded but never freed: :class:`EventStream` ends any stream whose
client has not taken a chunk for ``STALL_HEARTBEATS`` heartbeat intervals. The watch is
cancelled and the queue dropped at once; uvicorn then closes the connection, so a client that
reads again gets what was already sent, then the end of the connection, and resumes with
``Last-Event-ID``. Per stream the bridge holds at most ``QUEUE_EVENTS`` events plus what the
gRPC and TCP flow-control windows let through.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Send

from casledger.service.api.casledger.v1 import ledger_pb2 as pb
from casledger.service.client import LedgerCallError, LedgerClient, WatchStream

from . import jsonio
from .errors import bad_request, problem_type, status_of
from .views import resource_view

QUEUE_EVENTS = 64
# A client that took no chunk for this many heartbeat intervals is ended (see EventStream).
STALL_HEARTBEATS = 2
RETRY_MS = 1000
MAX_REVISION = 2**63 - 1
EVENT_NAMES = {pb.WatchEvent.CREATED: "created", pb.WatchEvent.UPDATED: "updated",
               pb.WatchEvent.DELETED: "deleted"}
_END = object()

log = logging.getLogger("casledger.bridge")


def start_revision(request: Request) -> int:
    """Last-Event-ID (exclusive) wins over ?start_revision (inclusive); 0 = from now on."""
    last_event_id = request.headers.get("last-event-id")
    if last_event_id is not None and last_event_id.strip():
        # isascii: str.isdigit() also takes "\u00b2", which int() refuses, and "\uff11".
        if not _is_revision(last_event_id.strip(), below=MAX_REVISION):
            raise bad_request("Last-Event-ID must be a revision number", field="Last-Event-ID")
        return int(last_event_id) + 1
    raw = request.query_params.get("start_revision")
    if raw is None:
        return 0
    if not _is_revision(raw, below=MAX_REVISION + 1):
        raise bad_request("start_revision must be a non-negative integer",
                          field="start_revision")
    return int(raw)


def _is_revision(raw: str, *, below: int) -> bool:
    """ASCII digits (str.isdigit() also takes "\u00b2", which int() refuses) of a number below
    `below`: revisions are int64, and protobuf refuses a larger one with a ValueError (a 500)."""
    return raw.isascii() and raw.isdigit() and len(raw) <= 19 and int(raw) < below


def format_event(event: pb.WatchEvent) -> str:
    data = jsonio.dumps(resource_view(event.resource)).decode()
    return (f"id: {event.resource.revision}\nevent: {EVENT_NAMES.get(event.type, 'updated')}\n"
            f"data: {data}\n\n")


def format_error(error: LedgerCallError) -> str:
    status, title = status_of(error)
    body: dict[str, Any] = {"type": problem_type(error.reason or error.code.name),
                            "title": title, "status": status, "detail": error.message,
                            "reason": error.reason or error.code.name}
    if "resume_revision" in error.metadata:
        body["resume_revision"] = int(error.metadata["resume_revision"])
    return f"event: error\ndata: {json.dumps(body, separators=(',', ':'))}\n\n"


async def _pump(stream: WatchStream, queue: asyncio.Queue[object]) -> None:
    try:
        async for event in stream:
            await queue.put(event)
    except LedgerCallError as error:
        await queue.put(error)
    finally:
        await queue.put(_END)


async def events(stream: WatchStream, heartbeat_s: float) -> AsyncIterator[str]:
    queue: asyncio.Queue[object] = asyncio.Queue(QUEUE_EVENTS)
    pump = asyncio.create_task(_pump(stream, queue))
    try:
        yield f"retry: {RETRY_MS}\n: watching from revision {stream.revision}\n\n"
        while True:
            try:
                item = await asyncio.wait_for(queue.get(), heartbeat_s)
            except TimeoutError:
                yield ": heartbeat\n\n"
                continue
            if item is _END:
                return
            if isinstance(item, LedgerCallError):
                yield format_error(item)
                return
            assert isinstance(item, pb.WatchEvent)
            yield format_event(item)
    finally:
        stream.close()
        pump.cancel()
        # Its last put (of _END) must not wait for a consumer that is gone: make room.
        while not queue.empty():
            queue.get_nowait()
        with contextlib.suppress(asyncio.CancelledError):
            await pump


async def watch(request: Request, prefix: str, client: LedgerClient,
                heartbeat_s: float) -> Response:
    """The SSE response for a watch on `prefix` ("" = the whole ledger)."""
    start = start_revision(request)
    stream = await client.open_watch(prefix, start)
    headers = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
    if request.method == "HEAD":
        stream.close()
        return Response(status_code=200, headers=headers, media_type="text/event-stream")
    return EventStream(events(stream, heartbeat_s), stall_s=STALL_HEARTBEATS * heartbeat_s,
                       media_type="text/event-stream", headers=headers)


class EventStream(StreamingResponse):
    """A streaming response that gives up on a client which takes no chunk for `stall_s`
    seconds, and always closes its event source when it ends (the watch, the pump)."""

    def __init__(self, content: AsyncIterator[str], *, stall_s: float, media_type: str,
                 headers: dict[str, str]) -> None:
        super().__init__(content, media_type=media_type, headers=headers)
        self.content = content
        self.stall_s = stall_s

    async def stream_response(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code,
                    "headers": self.raw_headers})
        try:
            async for chunk in self.content:
                try:
                    await asyncio.wait_for(send({"type": "http.response.body",
                                                 "body": chunk.encode(), "more_body": True}),
                                           self.stall_s)
                except TimeoutError:
                    # Returning without the final chunk: uvicorn closes the connection.
                    log.warning("an event-stream client took nothing for %.1f s; ending its "
                                "stream", self.stall_s)
                    return
        finally:
            close = getattr(self.content, "aclose", None)
            if close is not None:
                await close()
        await send({"type": "http.response.body", "body": b"", "more_body": False})
