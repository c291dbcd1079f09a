"""Fixtures of the integration tests: servers with other settings, the ledger's SQLite file read
directly (to prove that a refused request wrote nothing), raw calls with hand-built bytes."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sqlite3
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator
from contextlib import (
    AbstractAsyncContextManager,
    aclosing,
    asynccontextmanager,
    closing,
    contextmanager,
)
from pathlib import Path
from typing import Any, cast

import grpc
import httpx
import pytest
import uvicorn
from asgi_lifespan import LifespanManager
from starlette.types import ASGIApp

from casledger.http_bridge.app import BridgeSettings, create_app
from casledger.service.api.casledger.v1 import ledger_pb2 as pb
from casledger.service.client import LedgerCallError, LedgerClient, connect
from casledger.service.config import Settings
from casledger.service.server import RunningServer, serve
from casledger.service.storage import Durability
from casledger.service.storage.sqlite import sqlite_path
from tests.support import postgres

# The content limit of `small_server`.
SMALL_LIMIT = 1024
# The watch queue of `slow_server` (the smallest the settings allow).
SLOW_QUEUE = 16

RawCall = Callable[[str, bytes], Awaitable[bytes]]
NewLedger = Callable[[str], str]


def read_revision(db: Path) -> int:
    """The ledger's latest revision, read from the SQLite file with the stdlib driver."""
    with closing(sqlite3.connect(db)) as connection:
        (value,) = connection.execute("SELECT coalesce(max(revision), 0) FROM versions").fetchone()
    return int(value)


@pytest.fixture
def ledger_revision(settings: Settings) -> Callable[[], int]:
    """Reads the latest revision of the `server` fixture's ledger straight from its file (or
    its PostgreSQL database, over a connection of its own)."""
    if not settings.db.startswith("sqlite:"):
        return lambda: postgres.latest_revision(settings.db)
    path = Path(sqlite_path(settings.db))
    return lambda: read_revision(path)


@pytest.fixture
async def small_server(settings: Settings, new_ledger: NewLedger
                       ) -> AsyncIterator[RunningServer]:
    """A server whose content limit is SMALL_LIMIT bytes."""
    small = settings.replace(db=new_ledger("small"), max_content_bytes=SMALL_LIMIT)
    async with serve(small) as running:
        yield running


@pytest.fixture
async def small_client(small_server: RunningServer) -> AsyncIterator[LedgerClient]:
    async with connect(small_server.target) as ledger:
        yield ledger


@pytest.fixture
async def slow_server(settings: Settings, new_ledger: NewLedger
                      ) -> AsyncIterator[RunningServer]:
    """A server whose watchers may queue only SLOW_QUEUE live versions. Durability NORMAL: the
    slow-watcher test writes thousands of versions and does not test fsync."""
    slow = settings.replace(db=new_ledger("slow"), watch_queue=SLOW_QUEUE,
                            durability=Durability.NORMAL)
    async with serve(slow) as running:
        yield running


@pytest.fixture
async def raw_call(server: RunningServer) -> AsyncIterator[RawCall]:
    """Calls a unary Ledger method with request bytes as given (so they may hold fields the
    generated classes cannot set); a failure raises LedgerCallError like the client does."""
    async with grpc.aio.insecure_channel(server.target) as channel:

        async def call(method: str, request: bytes) -> bytes:
            stub = channel.unary_unary(f"/casledger.v1.Ledger/{method}",
                                       request_serializer=_identity,
                                       response_deserializer=_identity)
            try:
                response: bytes = await stub(request, timeout=10)
            except grpc.aio.AioRpcError as error:
                raise LedgerCallError.from_rpc_error(error) from None
            return response

        yield call


def _identity(data: bytes) -> bytes:
    return data


async def wait_for_watchers(server: RunningServer, count: int) -> None:
    """Until `count` watchers are subscribed: a watch from revision 0 sees only what is committed
    after it subscribed, and the client has no other way to know that it has."""
    async with asyncio.timeout(10):
        while server.store.hub.watchers < count:  # noqa: ASYNC110 (the hub has no event)
            await asyncio.sleep(0.005)


@pytest.fixture
def watching() -> Callable[[RunningServer, int], Awaitable[None]]:
    return wait_for_watchers


async def collect_events(client: LedgerClient, *, until: int, prefix: str = "",
                         start_revision: int = 1) -> list[pb.WatchEvent]:
    """Watch from `start_revision` and return every event up to revision `until` (inclusive)."""
    events: list[pb.WatchEvent] = []
    watch = cast(AsyncGenerator[pb.WatchEvent, None], client.watch(prefix, start_revision))
    async with asyncio.timeout(20), aclosing(watch) as stream:
        async for event in stream:
            events.append(event)
            if event.resource.revision >= until:
                break
    return events


Collect = Callable[..., Awaitable[list[pb.WatchEvent]]]


@pytest.fixture
def collect() -> Collect:
    return collect_events


# --- the HTTP bridge -------------------------------------------------------------------------
# The real Starlette app, its lifespan run by asgi-lifespan, in front of the real gRPC service;
# or, where a real socket is needed (streaming, SSE), the same app served by uvicorn on port 0.

BRIDGE_URL = "http://bridge.test"


@asynccontextmanager
async def open_bridge(bridge_settings: BridgeSettings) -> AsyncIterator[httpx.AsyncClient]:
    """An httpx client of a bridge app (lifespan started) through httpx.ASGITransport."""
    app = create_app(bridge_settings)
    async with LifespanManager(app) as manager, httpx.AsyncClient(
        transport=httpx.ASGITransport(app=manager.app), base_url=BRIDGE_URL
    ) as http:
        yield http


class _Uvicorn(uvicorn.Server):
    """uvicorn without its signal handlers: the test process keeps its own."""

    @contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@asynccontextmanager
async def serve_http(app: ASGIApp) -> AsyncIterator[str]:
    """`app` served by uvicorn on a free loopback port, in this event loop; yields its base URL.
    Leaving the block shuts the server down (open streams get a short grace period)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, lifespan="on", log_level="warning", ws="none",
                            timeout_graceful_shutdown=2)
    server = _Uvicorn(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        async with asyncio.timeout(10):
            while not server.started:
                if task.done():
                    task.result()
                    raise RuntimeError("uvicorn stopped before it started")
                await asyncio.sleep(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task
        sock.close()


@pytest.fixture
def bridge_settings(server: RunningServer) -> BridgeSettings:
    """Bridge settings pointing at the `server` fixture. Its read cache never pauses its watch
    for want of reads: tests that count cache hits would otherwise depend on the machine's
    speed (test_bridge_read_cache tests the pause)."""
    return BridgeSettings(target=server.target, read_cache_idle_s=0)


@pytest.fixture
async def bridge(bridge_settings: BridgeSettings) -> AsyncIterator[httpx.AsyncClient]:
    """An httpx client (base_url set) of the real bridge app in front of the `server` fixture."""
    async with open_bridge(bridge_settings) as http:
        yield http


@pytest.fixture
async def live_bridge(bridge_settings: BridgeSettings) -> AsyncIterator[httpx.AsyncClient]:
    """An httpx client of the bridge served by uvicorn on a real socket (for streaming)."""
    async with serve_http(create_app(bridge_settings)) as url, httpx.AsyncClient(
        base_url=url, timeout=5
    ) as http:
        yield http


def closed_port() -> int:
    """A loopback port with nothing listening on it (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@asynccontextmanager
async def silent_target() -> AsyncIterator[str]:
    """A TCP server that accepts connections and never answers (so every gRPC call to it runs
    into its deadline); yields its `host:port`."""
    writers: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        with contextlib.suppress(ConnectionError):
            while await reader.read(65536):
                pass
        writer.close()

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.close()
        for writer in writers:
            writer.close()
        await server.wait_closed()


BridgeFactory = Callable[[BridgeSettings], AbstractAsyncContextManager[httpx.AsyncClient]]
HTTPServerFactory = Callable[[ASGIApp], AbstractAsyncContextManager[str]]
ProblemCheck = Callable[[httpx.Response, int, str], dict[str, Any]]


@pytest.fixture
def make_bridge() -> BridgeFactory:
    """`async with make_bridge(BridgeSettings(...)) as http`: a bridge with other settings."""
    return open_bridge


@pytest.fixture
def http_server() -> HTTPServerFactory:
    """`async with http_server(app) as base_url`: the app served by uvicorn on a real socket."""
    return serve_http


@pytest.fixture
def closed_target() -> str:
    """`host:port` with nothing listening."""
    return f"127.0.0.1:{closed_port()}"


@pytest.fixture
async def silent() -> AsyncIterator[str]:
    """`host:port` of a TCP server that accepts and never answers."""
    async with silent_target() as target:
        yield target


def check_problem(response: httpx.Response, status: int, reason: str) -> dict[str, Any]:
    """Asserts an RFC 9457 problem response with this status and reason; returns its body."""
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = response.json()
    assert body["status"] == status
    assert body["reason"] == reason, body
    assert body["type"] == "https://casledger.dev/problems/" + reason.lower().replace("_", "-")
    assert isinstance(body["title"], str)
    assert body["title"]
    assert isinstance(body["detail"], str)
    assert body["detail"]
    return body


@pytest.fixture
def problem() -> ProblemCheck:
    """`problem(response, status, reason)`: check_problem as a fixture."""
    return check_problem
