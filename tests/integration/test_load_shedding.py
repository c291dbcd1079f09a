"""Load shedding: past its bound of in-flight work a process refuses at once — the service with
RESOURCE_EXHAUSTED / OVERLOADED and ``retry_after_s``, the bridge with 503 problem+json and
``Retry-After`` — never by queueing; once the held work is done, calls succeed again. Unary work
and streams have bounds of their own. A stalled event-stream client is pushed back on, not
buffered for, and ended.

Calls are held in flight behind the SQLite store's write lock (so those tests are SQLite only):
a refused *write* proves the refusal did not queue, since a queued one would wait on the lock
that the test holds.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import grpc
import httpx
import pytest
import uvicorn
from grpc_health.v1 import health_pb2, health_pb2_grpc
from starlette.types import ASGIApp

from casledger.http_bridge import sse
from casledger.http_bridge.app import BridgeSettings, create_app
from casledger.service.api.casledger.v1 import ledger_pb2 as pb
from casledger.service.api.casledger.v1 import ledger_pb2_grpc as pb_grpc
from casledger.service.batching import BatchingClient
from casledger.service.client import LedgerCallError, connect, precondition
from casledger.service.config import Settings
from casledger.service.server import RunningServer, serve
from tests.support.batchstream import stream_batches, stream_one
from tests.support.metrics import bridge_metric, scraped
from tests.support.polling import until

JSON = {"Content-Type": "application/json"}
CREATE = {"If-None-Match": "*", **JSON}


def gauge(server: RunningServer, name: str, **labels: str) -> float:
    assert server.metrics is not None
    value = server.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


@asynccontextmanager
async def write_lock_held(server: RunningServer) -> AsyncIterator[None]:
    """Every write waits while this is held: the SQLite store's writer thread is kept busy."""
    release = threading.Event()
    thread = server.store._thread  # type: ignore[attr-defined]
    busy = asyncio.get_running_loop().run_in_executor(thread, release.wait)
    try:
        yield
    finally:
        release.set()
        await busy


@pytest.fixture
async def tight_server(settings: Settings) -> AsyncIterator[RunningServer]:
    """A server that serves 2 unary calls and 1 Watch stream at a time."""
    async with serve(settings.replace(max_in_flight=2, max_watchers=1)) as running:
        yield running


def check_overloaded(error: LedgerCallError) -> None:
    assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error.reason == "OVERLOADED"
    assert error.metadata == {"retry_after_s": "1"}


# --- the service -------------------------------------------------------------------------------


@pytest.mark.sqlite_only
async def test_service_refuses_past_max_in_flight_at_once_then_recovers(
    tight_server: RunningServer,
) -> None:
    async with connect(tight_server.target) as client:
        async with write_lock_held(tight_server):
            held = [asyncio.create_task(client.create("documents", b"{}", resource_id=f"r{i}"))
                    for i in range(2)]
            await until(lambda: gauge(tight_server, "casledger_grpc_in_flight") == 2)
            with pytest.raises(LedgerCallError) as write:
                await client.create("documents", b"{}", resource_id="r2")
            with pytest.raises(LedgerCallError) as read:
                await client.get("documents/r0")
            health = await health_pb2_grpc.HealthStub(client.channel).Check(
                health_pb2.HealthCheckRequest(service="casledger.v1.Ledger"), timeout=5)
            assert not any(task.done() for task in held)
        created = await asyncio.gather(*held)
        after = await client.get("documents/r0")
        with pytest.raises(LedgerCallError) as absent:
            await client.get("documents/r2")

    check_overloaded(write.value)
    check_overloaded(read.value)
    assert "limit of 2 in-flight calls" in write.value.message
    assert health.status == health_pb2.HealthCheckResponse.SERVING  # health is never shed
    assert [r.version for r in created] == [1, 1]
    assert after.version == 1
    assert absent.value.reason == "NOT_FOUND"  # the refused write wrote nothing
    assert gauge(tight_server, "casledger_grpc_in_flight") == 0
    assert gauge(tight_server, "casledger_grpc_shed_total",
                 rpc="casledger.v1.Ledger/CreateResource") == 1
    assert gauge(tight_server, "casledger_grpc_requests_total",
                 rpc="casledger.v1.Ledger/GetResource", code="RESOURCE_EXHAUSTED") == 1


@pytest.mark.sqlite_only
async def test_a_batch_takes_a_slot_per_operation(tight_server: RunningServer) -> None:
    def creates(*ids: str) -> list[pb.BatchOperation]:
        return [pb.BatchOperation(create=pb.CreateResourceRequest(
            parent="documents", resource_id=i, content=b"{}")) for i in ids]

    async with connect(tight_server.target) as client:
        async with write_lock_held(tight_server):
            held = asyncio.create_task(client.create("documents", b"{}", resource_id="r0"))
            await until(lambda: gauge(tight_server, "casledger_grpc_in_flight") == 1)
            # One slot left: a Batch of two operations is two calls' work, refused whole.
            with pytest.raises(LedgerCallError) as refused:
                await client.batch(creates("b1", "b2"))
            one = asyncio.create_task(client.batch(creates("b3")))
            await until(lambda: gauge(tight_server, "casledger_grpc_in_flight") == 2)
            assert not held.done()
            assert not one.done()
        await held
        [created] = await one
        # Alone, a Batch larger than the whole bound is admitted.
        large = await client.batch(creates("b4", "b5", "b6"))
        with pytest.raises(LedgerCallError) as absent:
            await client.get("documents/b1")

    check_overloaded(refused.value)
    assert "a Batch takes one per operation: this one 2" in refused.value.message
    assert isinstance(created, pb.Resource)
    assert [r.version for r in large if isinstance(r, pb.Resource)] == [1, 1, 1]
    assert absent.value.reason == "NOT_FOUND"  # the refused Batch wrote nothing
    assert gauge(tight_server, "casledger_grpc_in_flight") == 0


@pytest.mark.sqlite_only
async def test_each_batch_of_a_stream_takes_a_slot_per_operation(
        tight_server: RunningServer) -> None:
    async with connect(tight_server.target) as client:
        async with write_lock_held(tight_server):
            held = asyncio.create_task(client.create("documents", b"{}", resource_id="r0"))
            await until(lambda: gauge(tight_server, "casledger_grpc_in_flight") == 1)
            # One slot left: a batch of two operations is refused whole, the stream goes on.
            replies = await stream_batches(client.channel, [
                (1, [pb.BatchOperation(create=pb.CreateResourceRequest(
                    parent="documents", resource_id=i, content=b"{}")) for i in ("b1", "b2")]),
            ])
        await held
        [after] = await stream_one(
            client, [pb.BatchOperation(get=pb.GetResourceRequest(name="documents/b1"))])

    refused = LedgerCallError.from_status_message(replies[1].status)
    check_overloaded(refused)
    assert "a Batch takes one per operation: this one 2" in refused.message
    assert isinstance(after, LedgerCallError)
    assert after.reason == "NOT_FOUND"  # the refused batch wrote nothing
    assert gauge(tight_server, "casledger_grpc_shed_total",
                 rpc="casledger.v1.Ledger/BatchStream") == 1
    assert gauge(tight_server, "casledger_grpc_in_flight") == 0


async def test_service_refuses_a_watch_past_max_watchers(tight_server: RunningServer) -> None:
    async with connect(tight_server.target) as client:
        first = await client.open_watch()
        with pytest.raises(LedgerCallError) as refused:
            await client.open_watch("documents")
        # Unary calls have a bound of their own.
        created = await client.create("documents", b"{}", resource_id="a")
        async with asyncio.timeout(10):
            async for event in first:
                assert event.resource.name == "documents/a"
                break
        first.close()
        await until(lambda: gauge(tight_server, "casledger_grpc_watch_streams") == 0)
        again = await client.open_watch()
        again.close()

    check_overloaded(refused.value)
    assert "limit of 1 in-flight Watch and BatchStream streams" in refused.value.message
    assert created.version == 1
    assert gauge(tight_server, "casledger_grpc_shed_total", rpc="casledger.v1.Ledger/Watch") == 1


async def test_a_batch_stream_holds_a_watcher_slot_while_it_is_open(
        tight_server: RunningServer) -> None:
    async with connect(tight_server.target) as client:
        watch = await client.open_watch()
        # The one slot is taken: the stream is refused as it opens, before any batch runs.
        stream: Any = pb_grpc.LedgerStub(client.channel).BatchStream(timeout=10)
        await stream.write(pb.BatchStreamRequest(id=1, operations=[pb.BatchOperation(
            create=pb.CreateResourceRequest(parent="documents", resource_id="x",
                                            content=b"{}"))]))
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stream.read()
        watch.close()
        await until(lambda: gauge(tight_server, "casledger_grpc_watch_streams") == 0)
        # Free again: a new stream takes the slot and runs its batches.
        [created] = await stream_one(
            client, [pb.BatchOperation(get=pb.GetResourceRequest(name="documents/x"))])

    error = LedgerCallError.from_rpc_error(refused.value)
    check_overloaded(error)
    assert "limit of 1 in-flight Watch and BatchStream streams" in error.message
    assert isinstance(created, LedgerCallError)
    assert created.reason == "NOT_FOUND"  # the refused stream ran nothing
    assert gauge(tight_server, "casledger_grpc_shed_total",
                 rpc="casledger.v1.Ledger/BatchStream") == 1


async def test_a_batching_client_whose_stream_is_refused_sends_batch_calls(
        tight_server: RunningServer) -> None:
    async with connect(tight_server.target) as client, \
            connect(tight_server.target, batching=True) as batching:
        assert isinstance(batching, BatchingClient)
        watch = await client.open_watch()  # the one long-lived stream the service allows
        before = gauge(tight_server, "casledger_grpc_requests_total",
                       rpc="casledger.v1.Ledger/Batch", code="OK")
        created = await batching.create("documents", b"{}", resource_id="a")
        after = gauge(tight_server, "casledger_grpc_requests_total",
                      rpc="casledger.v1.Ledger/Batch", code="OK")
        watch.close()
        await until(lambda: gauge(tight_server, "casledger_grpc_watch_streams") == 0)
        # With the slot free again, the next batch goes on a stream.
        read = await batching.get("documents/a")
        assert gauge(tight_server, "casledger_grpc_watch_streams") == 1

    assert created.version == 1
    assert after == before + 1  # the refused stream's batch went as a Batch call
    assert read.version == 1


# --- the bridge --------------------------------------------------------------------------------


@pytest.mark.sqlite_only
async def test_bridge_answers_503_past_max_in_flight_at_once_then_recovers(
    server: RunningServer, make_bridge: Any, problem: Any,
) -> None:
    async with make_bridge(BridgeSettings(target=server.target, max_in_flight=2)) as http:
        async with write_lock_held(server):
            held = [asyncio.create_task(http.put(f"/v1/documents/r{i}", content=b"{}",
                                                 headers=CREATE)) for i in range(2)]
            await until(lambda: _equals(bridge_metric(http, "casledger_http_in_flight"), 2))
            refused = await http.put("/v1/documents/r2", content=b"{}", headers={
                **CREATE, "X-Request-Id": "shed-1"})
            healthz = await http.get("/healthz")
            assert not any(task.done() for task in held)
        created = await asyncio.gather(*held)
        absent = await http.get("/v1/documents/r2")
        text = (await http.get("/metrics")).text

    body = problem(refused, 503, "OVERLOADED")
    assert "limit of 2 in-flight requests" in body["detail"]
    assert refused.headers["retry-after"] == "1"
    assert refused.headers["x-request-id"] == "shed-1"
    assert healthz.status_code == 200
    assert [r.status_code for r in created] == [201, 201]
    assert absent.status_code == 404
    assert scraped(text, "casledger_http_shed_total", kind="request") == 1
    assert scraped(text, "casledger_http_requests_total", method="PUT", route="/v1/{name}",
                   status="503") == 1
    assert scraped(text, "casledger_http_in_flight") == 0


async def _equals(value: Awaitable[float], expected: float) -> bool:
    return await value == expected


@pytest.mark.sqlite_only
async def test_an_overloaded_service_is_503_with_its_retry_after_at_the_bridge(
    settings: Settings, make_bridge: Any, problem: Any,
) -> None:
    # No read cache: its own GetRevision could take the service's one slot first.
    async with serve(settings.replace(max_in_flight=1)) as busy, make_bridge(
        BridgeSettings(target=busy.target, read_cache=False)
    ) as http:
        async with write_lock_held(busy):
            held = asyncio.create_task(http.put("/v1/documents/a", content=b"{}",
                                                headers=CREATE))
            await until(lambda: gauge(busy, "casledger_grpc_in_flight") == 1)
            refused = await http.get("/v1/documents/a")
        assert (await held).status_code == 201

    body = problem(refused, 503, "OVERLOADED")
    assert "the service is at its limit of 1 in-flight calls" in body["detail"]
    assert refused.headers["retry-after"] == "1"


async def test_bridge_bounds_event_streams_apart_from_requests(
    server: RunningServer, http_server: Any, problem: Any,
) -> None:
    app = create_app(BridgeSettings(target=server.target, max_watchers=1, max_in_flight=1))
    async with http_server(app) as url, httpx.AsyncClient(base_url=url, timeout=5) as http:
        async with http.stream("GET", "/v1:watch") as first:
            assert first.status_code == 200
            refused = await http.get("/v1/documents:watch")
            request = await http.get("/v1/documents/a")  # one request slot, still free
            assert await bridge_metric(http, "casledger_http_sse_streams") == 1
        await until(lambda: _equals(bridge_metric(http, "casledger_http_sse_streams"), 0))
        head = await http.head("/v1:watch")
        shed = await bridge_metric(http, "casledger_http_shed_total", kind="stream")

    body = problem(refused, 503, "OVERLOADED")
    assert "limit of 1 in-flight event streams" in body["detail"]
    assert refused.headers["retry-after"] == "1"
    assert request.status_code == 404
    assert head.status_code == 200
    assert shed == 1


# --- a stalled event-stream client -------------------------------------------------------------
# The chain from the ledger to a client: the service's per-watcher queue (watch_queue versions;
# overflowing ends the watcher with WATCHER_TOO_SLOW), gRPC flow control, the bridge's pump into
# a queue of QUEUE_EVENTS events, uvicorn's transport (it stops taking chunks past its high-water
# mark), TCP. Every link is bounded, so a client that stops reading costs the bridge at most
# QUEUE_EVENTS events plus the flow-control windows: the service, not the bridge, is where the
# backlog overflows. And a client that takes nothing for STALL_HEARTBEATS heartbeats is ended.

SMALL_BUFFER = 4096
CONTENT = json.dumps("x" * 16 * 1024).encode()
# 48 MiB: far more than every bounded buffer between the service and the client.
MAX_WRITES = 3000


@asynccontextmanager
async def serve_small_buffers(app: ASGIApp) -> AsyncIterator[tuple[str, int]]:
    """`app` on uvicorn whose connections have a small send buffer (inherited from the
    listening socket), so a client that stops reading stalls the bridge quickly."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SMALL_BUFFER)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = _Uvicorn(uvicorn.Config(app, lifespan="on", log_level="critical", ws="none",
                                     timeout_graceful_shutdown=1))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        await until(lambda: server.started or task.done())
        assert server.started
        yield "127.0.0.1", port
    finally:
        server.should_exit = True
        await task
        sock.close()


class _Uvicorn(uvicorn.Server):
    @contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@asynccontextmanager
async def stalled_client(host: str, port: int, path: str) -> AsyncIterator[socket.socket]:
    """Sends `GET path` with a small receive buffer, then reads nothing until told to."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_BUFFER)
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, (host, port))
        await loop.sock_sendall(sock, f"GET {path} HTTP/1.1\r\nHost: bridge\r\n\r\n".encode())
        yield sock
    finally:
        sock.close()


async def read_to_end(sock: socket.socket) -> bytes:
    loop, chunks = asyncio.get_running_loop(), []
    async with asyncio.timeout(10):
        while chunk := await loop.sock_recv(sock, 1 << 16):
            chunks.append(chunk)
    return b"".join(chunks)


async def write_versions(server: RunningServer, count: int,
                         until: Callable[[], bool] = lambda: False) -> int:
    """Write up to `count` versions of one resource, stopping early once `until` holds;
    returns how many were written."""
    async with connect(server.target) as writer:
        current = await writer.create("documents", CONTENT, resource_id="d")
        while current.revision < count and not until():
            current = await writer.replace("documents/d", CONTENT,
                                           precondition=precondition(etag=current.etag))
        return int(current.revision)


async def test_a_stalled_sse_client_is_pushed_back_on_not_buffered(
    slow_server: RunningServer,
) -> None:
    # Heartbeats far apart: the stall timeout stays out of this test. No read cache: the
    # service's only watcher is then the SSE stream's.
    app = create_app(BridgeSettings(target=slow_server.target, heartbeat_s=60,
                                    read_cache=False))
    async with serve_small_buffers(app) as (host, port), httpx.AsyncClient(
        base_url=f"http://{host}:{port}", timeout=5
    ) as http:
        async with stalled_client(host, port, "/v1:watch?start_revision=1"):
            await until(lambda: slow_server.store.hub.watchers == 1)
            # Write until the backlog overflows the *service's* queue for this watcher (a few
            # hundred here: what the flow-control windows let through): the bridge stopped
            # pulling from the gRPC stream instead of buffering it. The service queues nothing
            # more for it either; the watcher ends at its next read.
            written = await write_versions(slow_server, MAX_WRITES, until=lambda: gauge(
                slow_server, "casledger_watchers_too_slow") == 1)
            assert written < MAX_WRITES
            assert await bridge_metric(http, "casledger_http_sse_streams") == 1
        # The client went away: the bridge lets go of the stream, its queue, its pump and
        # its watch.
        await until(lambda: _equals(bridge_metric(http, "casledger_http_sse_streams"), 0))
        await until(lambda: slow_server.store.hub.watchers == 0)

    assert sse.QUEUE_EVENTS == 64  # the bridge's own share: 64 events, about 1 MiB here


async def test_a_stalled_sse_client_is_ended_and_can_resume(
    slow_server: RunningServer,
) -> None:
    # No read cache: the service's only watcher is then the SSE stream's.
    app = create_app(BridgeSettings(target=slow_server.target, heartbeat_s=0.1,
                                    read_cache=False))
    async with serve_small_buffers(app) as (host, port), httpx.AsyncClient(
        base_url=f"http://{host}:{port}", timeout=5
    ) as http, stalled_client(host, port, "/v1:watch?start_revision=1") as client:
        await until(lambda: _equals(bridge_metric(http, "casledger_http_sse_streams"), 1))
        await write_versions(slow_server, 200)
        # Nobody read a byte, yet the bridge ended the stream and let go of the watch.
        await until(lambda: _equals(bridge_metric(http, "casledger_http_sse_streams"), 0))
        await until(lambda: slow_server.store.hub.watchers == 0)
        received = await read_to_end(client)

    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    ids = [int(i) for i in re.findall(rb"\nid: (\d+)\n", body)]
    # What was already sent arrives, in order from the start, then the connection closes
    # without the chunked body's last chunk: an EventSource reconnects with Last-Event-ID.
    assert ids == list(range(1, len(ids) + 1))
    assert len(ids) < 200
    assert not body.endswith(b"0\r\n\r\n")
