"""The Python HTTP client (`casledger.http_bridge.client`) against the real bridge and service:
captured ETags resent as If-Match, errors as LedgerHTTPError with the problem's fields,
update() under contention, and a watch that resumes after a dropped connection."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from typing import Any

import httpx
import pytest

from casledger.http_bridge.app import BridgeSettings, create_app
from casledger.http_bridge.client import (
    Document,
    LedgerHTTPClient,
    LedgerHTTPError,
    WatchEvent,
    open_client,
)
from casledger.service.server import RunningServer

Revision = Callable[[], int]


@pytest.fixture
def ledger(bridge: httpx.AsyncClient) -> LedgerHTTPClient:
    return LedgerHTTPClient(bridge)


async def refused(call: Awaitable[Any], status: int, reason: str) -> LedgerHTTPError:
    with pytest.raises(LedgerHTTPError) as info:
        await call
    error = info.value
    assert (error.status, error.reason) == (status, reason), error
    assert error.problem["status"] == status
    assert error.problem["reason"] == reason
    return error


# --- reads and writes --------------------------------------------------------------------------


async def test_create_get_and_replace_with_the_captured_etag(
    ledger: LedgerHTTPClient, bridge: httpx.AsyncClient
) -> None:
    created = await ledger.create("documents/a", b'{"n": 0}')
    assert isinstance(created, Document)
    assert (created.name, created.content, created.content_type) == (
        "documents/a", b'{"n": 0}', "application/json")
    assert created.etag.startswith('"1-')
    assert created.last_modified
    assert ledger.etags == {"documents/a": created.etag}

    got = await ledger.get("documents/a")
    assert got == created
    assert got.json() == {"n": 0}

    replaced = await ledger.replace("documents/a", b'{"n": 1}')  # If-Match from the capture
    assert replaced.etag.startswith('"2-')
    assert ledger.etags["documents/a"] == replaced.etag
    current = await bridge.get("/v1/documents/a")
    assert (current.content, current.headers["etag"]) == (b'{"n": 1}', replaced.etag)


async def test_a_stale_capture_is_refused_and_never_replaced_by_the_error(
    bridge: httpx.AsyncClient, ledger_revision: Revision
) -> None:
    alice, bob = LedgerHTTPClient(bridge), LedgerHTTPClient(bridge)
    await alice.create("documents/a", b"[0]")
    await bob.get("documents/a")
    won = await alice.replace("documents/a", b"[1]")
    before = ledger_revision()

    error = await refused(bob.replace("documents/a", b"[2]"), 412, "VERSION_MISMATCH")

    assert error.current_etag == won.etag
    assert error.current_version == 2
    assert error.problem["current_etag"] == won.etag
    # Retrying blindly must not succeed: the client did not adopt the ETag from the 412.
    await refused(bob.replace("documents/a", b"[2]"), 412, "VERSION_MISMATCH")
    assert ledger_revision() == before


async def test_a_write_without_any_etag_is_428(ledger: LedgerHTTPClient, bridge: httpx.AsyncClient
                                              ) -> None:
    other = LedgerHTTPClient(bridge)
    created = await other.create("documents/a", b"{}")

    error = await refused(ledger.replace("documents/a", b"[]"), 428, "PRECONDITION_REQUIRED")

    assert error.problem["required_header"] == "If-Match"
    assert error.current_etag == created.etag
    assert error.current_version == 1
    absent = await refused(ledger.delete("documents/b"), 404, "NOT_FOUND")
    assert absent.current_etag is None
    create = await refused(ledger.merge_patch("documents/b", {}), 428, "PRECONDITION_REQUIRED")
    assert create.problem["required_header"] == "If-None-Match: *"


async def test_create_of_an_existing_resource_is_412(ledger: LedgerHTTPClient) -> None:
    created = await ledger.create("documents/a", b"{}")

    error = await refused(ledger.create("documents/a", b"[]"), 412, "ALREADY_EXISTS")

    assert (error.current_etag, error.current_version) == (created.etag, 1)


async def test_past_versions_and_tombstones(ledger: LedgerHTTPClient) -> None:
    v1 = await ledger.create("documents/a", b"[1]")
    v2 = await ledger.replace("documents/a", b"[2]")

    old = await ledger.get("documents/a", version=1)
    assert (old.content, old.etag) == (b"[1]", v1.etag)
    assert ledger.etags["documents/a"] == v2.etag  # a past version is not what a write edits

    await ledger.delete("documents/a")
    assert "documents/a" not in ledger.etags
    gone = await refused(ledger.get("documents/a"), 404, "NOT_FOUND")
    assert gone.problem["deleted_at_version"] == 3
    tombstone = await refused(ledger.get("documents/a", version=3), 410, "DELETED")
    assert tombstone.problem["deleted_at_version"] == 3


async def test_patches(ledger: LedgerHTTPClient, ledger_revision: Revision) -> None:
    await ledger.create("documents/a", b'{"title": "draft", "tags": ["a"], "n": 1}')

    merged = await ledger.merge_patch("documents/a", {"title": "final", "n": None})
    assert merged.json() == {"title": "final", "tags": ["a"]}
    assert merged.etag.startswith('"2-')
    patched = await ledger.json_patch("documents/a", [{"op": "add", "path": "/tags/-",
                                                      "value": "b"}])
    assert patched.json() == {"title": "final", "tags": ["a", "b"]}
    assert ledger.etags["documents/a"] == patched.etag
    before = ledger_revision()

    await refused(ledger.json_patch("documents/a", [{"op": "test", "path": "/title",
                                                     "value": "draft"}]),
                  409, "PATCH_CONFLICT")
    await refused(ledger.json_patch("documents/a", [{"op": "nope", "path": "/x"}]),
                  400, "INVALID_PATCH")
    assert ledger_revision() == before


async def test_post_and_listing(ledger: LedgerHTTPClient) -> None:
    posted = [await ledger.post("documents", f'{{"i": {i}}}'.encode()) for i in range(5)]

    for document in posted:
        assert document.name.startswith("documents/")
        assert ledger.etags[document.name] == document.etag
        assert (await ledger.get(document.name)).content == document.content
    listed = [r async for r in ledger.list_resources("documents", page_size=2)]
    assert sorted(r["name"] for r in listed) == sorted(d.name for d in posted)


async def test_history_reasons_and_idempotency_keys(ledger: LedgerHTTPClient,
                                                   ledger_revision: Revision) -> None:
    await ledger.create("documents/a", b"[1]", reason="first")
    v1 = ledger.etags["documents/a"]
    first = await ledger.replace("documents/a", b"[2]", etag=v1, idempotency_key="k",
                                 reason="révision ✓ 100%")
    after = ledger_revision()
    retry = await ledger.replace("documents/a", b"[2]", etag=v1, idempotency_key="k",
                                 reason="révision ✓ 100%")
    assert retry.etag == first.etag
    assert ledger_revision() == after
    await refused(ledger.replace("documents/a", b"[3]", etag=v1, idempotency_key="k"),
                  422, "IDEMPOTENCY_KEY_REUSED")
    await ledger.delete("documents/a", reason="cleanup\tdone")

    history = [v async for v in ledger.history("documents/a", page_size=1)]

    assert [v["version"] for v in history] == [1, 2, 3]
    assert [v["reason"] for v in history] == ["first", "révision ✓ 100%", "cleanup\tdone"]
    assert [v["deleted"] for v in history] == [False, False, True]
    with_content = [v async for v in ledger.history("documents/a", include_content=True)]
    assert [v.get("content") for v in with_content] == [[1], [2], None]


# --- update() ----------------------------------------------------------------------------------


async def test_twenty_concurrent_updates_all_land(ledger: LedgerHTTPClient) -> None:
    await ledger.create("counters/c", b'{"count": 0}')

    def increment(doc: Any) -> Any:
        return {**doc, "count": doc["count"] + 1}

    # Every lost round is some other writer's win, so 20 attempts always suffice for 20.
    results = await asyncio.gather(*(ledger.update("counters/c", increment, attempts=20)
                                     for _ in range(20)))

    final = await ledger.get("counters/c")
    assert final.json() == {"count": 20}
    assert sorted(r.json()["count"] for r in results) == list(range(1, 21))
    assert len({r.etag for r in results}) == 20
    history = [v async for v in ledger.history("counters/c")]
    assert [v["version"] for v in history] == list(range(1, 22))


async def test_update_rereads_after_a_412(ledger: LedgerHTTPClient,
                                          bridge: httpx.AsyncClient) -> None:
    await ledger.create("documents/a", b'{"seen": []}')
    other = LedgerHTTPClient(bridge)
    calls: list[Any] = []

    def change(doc: Any) -> Any:
        calls.append(doc)
        return {**doc, "seen": [*doc["seen"], len(calls)]}

    async def get_then_interfere(name: str, version: int | None = None) -> Document:
        document = await LedgerHTTPClient.get(ledger, name, version)
        if not calls:  # the first read is followed by a competing write before our PUT
            await other.get(name)
            await other.merge_patch(name, {"other": True})
        return document

    ledger.get = get_then_interfere  # type: ignore[method-assign]
    result = await ledger.update("documents/a", change, reason="rmw")

    assert len(calls) == 2
    assert calls[0] == {"seen": []}
    assert calls[1] == {"seen": [], "other": True}
    assert result.json() == {"seen": [2], "other": True}
    assert result.etag.startswith('"3-')
    reasons = [v["reason"] async for v in other.history("documents/a")]
    assert reasons == ["", "", "rmw"]


async def test_update_gives_up_after_its_attempts(ledger: LedgerHTTPClient,
                                                  bridge: httpx.AsyncClient) -> None:
    await ledger.create("documents/a", b'{"n": 0}')
    other = LedgerHTTPClient(bridge)
    await other.get("documents/a")

    async def always_interfering(name: str, version: int | None = None) -> Document:
        document = await LedgerHTTPClient.get(ledger, name, version)
        await other.update(name, lambda doc: {"n": doc["n"] + 100})
        return document

    ledger.get = always_interfering  # type: ignore[method-assign]

    error = await refused(ledger.update("documents/a", lambda doc: {"n": doc["n"] + 1},
                                        attempts=3), 412, "VERSION_MISMATCH")

    assert error.current_version == 4
    assert (await other.get("documents/a")).json() == {"n": 300}


# --- open_client and watch ---------------------------------------------------------------------


class Proxy:
    """A TCP proxy in front of the bridge whose connections can be cut (a dropped network
    connection, as the client sees it) and whose new connections can be held."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.requests: list[bytearray] = []
        self.downstream = bytearray()
        self.open = asyncio.Event()
        self.open.set()
        self._writers: list[asyncio.StreamWriter] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        await self.open.wait()
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.port)
        self._writers.append(up_writer)
        request = bytearray()
        self.requests.append(request)
        await asyncio.gather(self._pipe(reader, up_writer, request),
                             self._pipe(up_reader, writer, self.downstream))

    @staticmethod
    async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter,
                    record: bytearray) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await source.read(65536):
                record.extend(data)
                sink.write(data)
                await sink.drain()
        sink.close()

    def cut(self) -> None:
        for writer in self._writers:
            writer.close()
        self._writers.clear()

    async def wait_for_downstream(self, marker: bytes) -> None:
        async with asyncio.timeout(10):
            while marker not in self.downstream:  # noqa: ASYNC110 (bytes, no event to wait on)
                await asyncio.sleep(0.005)


@contextlib.asynccontextmanager
async def proxy_to(url: str) -> AsyncIterator[tuple[Proxy, str]]:
    proxy = Proxy(int(url.rsplit(":", 1)[1]))
    tasks: set[asyncio.Task[None]] = set()

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        await proxy.handle(reader, writer)

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield proxy, f"http://127.0.0.1:{port}"
    finally:
        server.close()
        proxy.open.set()
        proxy.cut()
        await server.wait_closed()
        async with asyncio.timeout(5):
            await asyncio.gather(*tasks, return_exceptions=True)


@pytest.fixture
async def bridge_url(http_server: Any, bridge_settings: BridgeSettings) -> AsyncIterator[str]:
    async with http_server(create_app(bridge_settings)) as url:
        yield url


async def next_event(stream: AsyncIterator[WatchEvent]) -> WatchEvent:
    async with asyncio.timeout(10):
        return await anext(stream)


async def test_open_client_over_a_socket(bridge_url: str) -> None:
    async with open_client(bridge_url) as ledger:
        created = await ledger.create("documents/a", b"[1]")
        updated = await ledger.update("documents/a", lambda doc: [*doc, 2])

    assert created.etag.startswith('"1-')
    assert updated.json() == [1, 2]
    assert ledger.http.is_closed


async def test_watch_replays_and_follows(bridge_url: str, ledger: LedgerHTTPClient) -> None:
    await ledger.create("documents/a", b"[1]")
    await ledger.create("notes/n", b"[2]")

    async with open_client(bridge_url) as watcher, aclosing(
        watcher.watch("documents", start_revision=1)
    ) as stream:
        first = await next_event(stream)
        await ledger.replace("documents/a", b"[3]")
        second = await next_event(stream)
    async with open_client(bridge_url) as watcher, aclosing(
        watcher.watch(last_event_id=1)
    ) as everything:
        after_first = await next_event(everything)

    assert (first.revision, first.type, first.resource["content"]) == (1, "created", [1])
    assert (second.revision, second.type, second.resource["content"]) == (3, "updated", [3])
    assert (after_first.revision, after_first.resource["name"]) == (2, "notes/n")


async def test_watch_resumes_after_a_dropped_connection(
    bridge_url: str, ledger: LedgerHTTPClient
) -> None:
    await ledger.create("documents/a", b"[1]")
    await ledger.create("documents/b", b"[2]")

    async with proxy_to(bridge_url) as (proxy, url), open_client(url) as watcher, aclosing(
        watcher.watch("documents", start_revision=1, retry_s=0.01)
    ) as stream:
        before = [await next_event(stream), await next_event(stream)]
        proxy.cut()
        await ledger.create("documents/c", b"[3]")
        await ledger.replace("documents/a", b"[4]")
        after = [await next_event(stream), await next_event(stream)]

    assert [e.revision for e in before + after] == [1, 2, 3, 4]
    assert [e.resource["name"] for e in after] == ["documents/c", "documents/a"]
    assert len(proxy.requests) == 2
    assert b"start_revision=1" in proxy.requests[0]
    assert b"last-event-id: 2\r\n" in proxy.requests[1].lower()
    assert b"start_revision" not in proxy.requests[1]


async def test_watch_from_now_resumes_without_a_gap(
    bridge_url: str, ledger: LedgerHTTPClient, server: RunningServer,
    watching: Callable[[RunningServer, int], Awaitable[None]],
) -> None:
    await ledger.create("documents/old", b"[0]")

    async with proxy_to(bridge_url) as (proxy, url), open_client(url) as watcher, aclosing(
        watcher.watch("documents", retry_s=0.01)
    ) as stream:
        pending = asyncio.create_task(next_event(stream))
        await watching(server, 2)  # the stream's watch, and the bridge's read cache's
        await proxy.wait_for_downstream(b"watching from revision 1\n")
        proxy.open.clear()  # the reconnection waits until the write below is committed
        proxy.cut()
        await ledger.create("documents/new", b"[1]")
        proxy.open.set()
        event = await pending

    assert (event.revision, event.resource["name"]) == (2, "documents/new")
    assert b"last-event-id: 1\r\n" in proxy.requests[1].lower()


async def test_watch_raises_a_refusal(bridge_url: str) -> None:
    async with open_client(bridge_url) as watcher, aclosing(watcher.watch("-bad")) as stream:
        with pytest.raises(LedgerHTTPError) as info:
            await next_event(stream)

    assert (info.value.status, info.value.reason) == (400, "INVALID_NAME")


async def test_watch_gives_up_after_its_reconnects(closed_target: str) -> None:
    async with open_client(f"http://{closed_target}") as watcher, aclosing(
        watcher.watch(retry_s=0.01, max_reconnects=2)
    ) as stream:
        with pytest.raises(httpx.ConnectError):
            await next_event(stream)
