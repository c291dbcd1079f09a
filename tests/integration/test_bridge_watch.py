"""Server-Sent Events over a real socket (uvicorn on port 0, since httpx's ASGI transport buffers
whole responses): replay then live, `id:` = revision, resume after Last-Event-ID, whole-segment
prefixes, heartbeats; and the 400s a bad watch gets before any stream starts."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest

from casledger.http_bridge.app import BridgeSettings, create_app
from casledger.service.server import RunningServer

READ_METHODS = "GET, HEAD, OPTIONS"


class SSE:
    """Reads a text/event-stream response block by block."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self.lines = response.aiter_lines()
        self.comments: list[str] = []
        self.retry: str | None = None

    async def next_event(self) -> dict[str, Any]:
        """The next event (comments and retry blocks recorded on the way)."""
        block: dict[str, str] = {}
        async with asyncio.timeout(10):
            async for line in self.lines:
                if line.startswith(":"):
                    self.comments.append(line)
                elif line:
                    field, _, value = line.partition(":")
                    block[field] = value.removeprefix(" ")
                elif "retry" in block and "data" not in block:
                    self.retry, block = block["retry"], {}
                elif block:
                    return {"id": block.get("id"), "event": block.get("event"),
                            "data": json.loads(block["data"])}
        raise AssertionError("the stream ended")

    async def events(self, count: int) -> list[dict[str, Any]]:
        return [await self.next_event() for _ in range(count)]

    async def until_comment(self, text: str) -> None:
        async with asyncio.timeout(10):
            async for line in self.lines:
                if line.startswith(":"):
                    self.comments.append(line)
                    if line == text:
                        return
        raise AssertionError("the stream ended")


Watch = Callable[..., Any]


@pytest.fixture
def watch(live_bridge: httpx.AsyncClient) -> Watch:
    """`async with watch(path, **kwargs) as sse`: a streaming GET of `path` on the live bridge."""

    @asynccontextmanager
    async def open_watch(path: str, **kwargs: Any) -> AsyncIterator[SSE]:
        async with live_bridge.stream("GET", path, **kwargs) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            assert response.headers["cache-control"] == "no-store"
            yield SSE(response)

    return open_watch


async def create(http: httpx.AsyncClient, name: str, content: bytes = b'{"v": 1}') -> str:
    response = await http.put(f"/v1/{name}", content=content, headers={
        "If-None-Match": "*", "Content-Type": "application/json"})
    assert response.status_code == 201, response.text
    etag: str = response.headers["etag"]
    return etag


async def update(http: httpx.AsyncClient, name: str, etag: str, content: bytes) -> str:
    response = await http.put(f"/v1/{name}", content=content, headers={
        "If-Match": etag, "Content-Type": "application/json"})
    assert response.status_code == 200, response.text
    new: str = response.headers["etag"]
    return new


async def test_watch_replays_then_streams_live(live_bridge: httpx.AsyncClient,
                                               watch: Watch) -> None:
    e1 = await create(live_bridge, "documents/a")
    e2 = await update(live_bridge, "documents/a", e1, b'{"v": 2}')
    deleted = await live_bridge.delete("/v1/documents/a", headers={"If-Match": e2})
    assert deleted.status_code == 204

    async with watch("/v1/documents:watch", params={"start_revision": 1}) as sse:
        replayed = await sse.events(3)
        e4 = await create(live_bridge, "documents/b", b"[4]")
        live = await sse.next_event()

    assert sse.retry == "1000"
    assert [e["id"] for e in [*replayed, live]] == ["1", "2", "3", "4"]
    assert [e["event"] for e in [*replayed, live]] == ["created", "updated", "deleted",
                                                       "created"]
    data = [e["data"] for e in [*replayed, live]]
    assert [d["name"] for d in data] == ["documents/a"] * 3 + ["documents/b"]
    assert [d["version"] for d in data] == [1, 2, 3, 1]
    assert [d["revision"] for d in data] == [1, 2, 3, 4]
    assert [d["deleted"] for d in data] == [False, False, True, False]
    assert [data[0]["etag"], data[1]["etag"], data[3]["etag"]] == [e1, e2, e4]
    assert data[0]["content"] == {"v": 1}
    assert data[1]["content"] == {"v": 2}
    assert "content" not in data[2]
    assert data[3]["content"] == [4]


async def test_non_json_content_is_base64(live_bridge: httpx.AsyncClient, watch: Watch) -> None:
    response = await live_bridge.put("/v1/blobs/b", content=b"\x00\xff", headers={
        "If-None-Match": "*", "Content-Type": "application/octet-stream"})
    assert response.status_code == 201

    async with watch("/v1/blobs:watch", params={"start_revision": 1}) as sse:
        event = await sse.next_event()

    assert event["data"]["content_base64"] == "AP8="
    assert "content" not in event["data"]


async def test_last_event_id_resumes_after_it(live_bridge: httpx.AsyncClient,
                                              watch: Watch) -> None:
    for index in range(4):
        await create(live_bridge, f"documents/d{index}")

    async with watch("/v1/documents:watch", headers={"Last-Event-ID": "2"}) as sse:
        resumed = await sse.events(2)
    # Last-Event-ID (a reconnecting EventSource) wins over the URL's start_revision.
    async with watch("/v1/documents:watch", params={"start_revision": 1},
                     headers={"Last-Event-ID": "3"}) as sse:
        wins = await sse.next_event()
    async with watch("/v1/documents:watch", params={"start_revision": 3}) as sse:
        inclusive = await sse.next_event()

    assert [e["id"] for e in resumed] == ["3", "4"]
    assert [e["data"]["name"] for e in resumed] == ["documents/d2", "documents/d3"]
    assert wins["id"] == "4"
    assert inclusive["id"] == "3"


async def test_whole_ledger_watch_sees_everything(live_bridge: httpx.AsyncClient,
                                                  watch: Watch) -> None:
    names = ["documents/a", "notes/n", "projects/p1/notes/x", "documentsX/y"]
    for name in names:
        await create(live_bridge, name)

    async with watch("/v1:watch", params={"start_revision": 1}) as sse:
        events = await sse.events(4)

    assert [e["data"]["name"] for e in events] == names
    assert [e["id"] for e in events] == ["1", "2", "3", "4"]


@pytest.mark.parametrize(("prefix", "expected", "sentinel"), [
    ("documents", ["documents/a", "documents/d"], "documents/z"),
    ("projects/p1", ["projects/p1/notes/x", "projects/p1/notesX/w"], "projects/p1/notes/z"),
    ("projects/p1/notes", ["projects/p1/notes/x"], "projects/p1/notes/z"),
    ("projects/p1/notes/x", ["projects/p1/notes/x"], "projects/p1/notes/x/tags/z"),
])
async def test_prefix_matches_whole_segments(
    live_bridge: httpx.AsyncClient, watch: Watch, prefix: str, expected: list[str],
    sentinel: str,
) -> None:
    for name in ("documents/a", "documentsX/b", "notes/c", "projects/p1/notes/x",
                 "projects/p10/notes/y", "projects/p1/notesX/w", "documents/d"):
        await create(live_bridge, name)

    async with watch(f"/v1/{prefix}:watch", params={"start_revision": 1}) as sse:
        events = await sse.events(len(expected))
        # A sentinel under the prefix, written last: nothing else may arrive before it.
        await create(live_bridge, sentinel)
        after = await sse.next_event()

    assert [e["data"]["name"] for e in events] == expected
    assert after["data"]["name"] == sentinel


async def test_watch_from_now_sees_only_new_writes(
    live_bridge: httpx.AsyncClient, watch: Watch, server: RunningServer,
    watching: Callable[[RunningServer, int], Awaitable[None]],
) -> None:
    await create(live_bridge, "documents/old")

    async with watch("/v1/documents:watch") as sse:
        await watching(server, 2)  # the stream's watch, and the bridge's read cache's
        await create(live_bridge, "documents/new")
        event = await sse.next_event()

    assert event["id"] == "2"
    assert event["data"]["name"] == "documents/new"


async def test_heartbeat_comments(http_server: Any, server: RunningServer) -> None:
    app = create_app(BridgeSettings(target=server.target, heartbeat_s=0.2))
    async with http_server(app) as url, httpx.AsyncClient(base_url=url, timeout=5) as http, \
            http.stream("GET", "/v1:watch") as response:
        assert response.status_code == 200
        sse = SSE(response)
        await sse.until_comment(": heartbeat")
        await sse.until_comment(": heartbeat")

    assert sse.comments[0].startswith(": watching from revision")
    assert sse.comments.count(": heartbeat") == 2


# --- refused before any stream -----------------------------------------------------------------


@pytest.mark.parametrize(("params", "headers", "field"), [
    ({"start_revision": "abc"}, {}, "start_revision"),
    ({"start_revision": "-1"}, {}, "start_revision"),
    ({"start_revision": "1.0"}, {}, "start_revision"),
    ({"start_revision": "\u00b2"}, {}, "start_revision"),
    ({"start_revision": "\uff11"}, {}, "start_revision"),
    ({"start_revision": str(2**63)}, {}, "start_revision"),
    ({}, {"Last-Event-ID": str(2**63 - 1)}, "Last-Event-ID"),
    ({}, {"Last-Event-ID": "x"}, "Last-Event-ID"),
    ({}, {"Last-Event-ID": "-3"}, "Last-Event-ID"),
    ({}, {"Last-Event-ID": "\u00b2"}, "Last-Event-ID"),
])
@pytest.mark.parametrize("path", ["/v1/documents:watch", "/v1:watch"])
async def test_invalid_start_is_400_before_any_stream(
    bridge: httpx.AsyncClient, problem: Any, path: str, params: dict[str, str],
    headers: dict[str, str], field: str,
) -> None:
    encoded = {k: v.encode("latin-1") for k, v in headers.items()}
    response = await bridge.get(path, params=params, headers=encoded)

    assert problem(response, 400, "INVALID_ARGUMENT")["field"] == field


async def test_invalid_prefix_is_400(bridge: httpx.AsyncClient, problem: Any) -> None:
    for path in ("/v1/-bad:watch", "/v1/documents/:watch", "/v1/a%2Fb:watch"):
        problem(await bridge.get(path), 400, "INVALID_NAME")


async def test_head_and_options_of_a_watch(bridge: httpx.AsyncClient) -> None:
    for path in ("/v1/documents:watch", "/v1:watch"):
        head = await bridge.head(path)
        assert head.status_code == 200
        assert head.headers["content-type"].startswith("text/event-stream")
        assert head.content == b""
        options = await bridge.options(path)
        assert options.status_code == 204, path
        assert options.headers["allow"] == READ_METHODS
