"""Watch: replay from a revision (inclusive), then live; ordered, no gap, no duplicate; event
types; whole-segment prefixes; resuming; a watcher too slow to keep up is ended with the revision
to resume from."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import grpc
import pytest

from casledger.service.api.casledger.v1 import ledger_pb2 as pb
from casledger.service.client import LedgerCallError, LedgerClient, connect, precondition
from casledger.service.server import RunningServer

Collect = Callable[..., Awaitable[list[pb.WatchEvent]]]

CREATED, UPDATED, DELETED = pb.WatchEvent.CREATED, pb.WatchEvent.UPDATED, pb.WatchEvent.DELETED


@asynccontextmanager
async def watching(client: LedgerClient, prefix: str = "", start_revision: int = 0
                   ) -> AsyncIterator[tuple[int, AsyncIterator[pb.WatchEvent]]]:
    """An accepted watch: the ledger's revision when the service accepted it, and its events."""
    stream = await client.open_watch(prefix, start_revision)
    events = aiter(stream)
    try:
        yield stream.revision, events
    finally:
        stream.close()
        await events.aclose()  # type: ignore[attr-defined]


async def take(events: AsyncIterator[pb.WatchEvent], count: int) -> list[pb.WatchEvent]:
    async with asyncio.timeout(10):
        return [await anext(events) for _ in range(count)]


async def read_all(events: AsyncIterator[pb.WatchEvent], into: list[pb.WatchEvent]) -> None:
    """Append every event to `into` until the stream ends (or fails)."""
    async with asyncio.timeout(20):
        async for event in events:
            into.append(event)


def revisions(events: list[pb.WatchEvent]) -> list[int]:
    return [event.resource.revision for event in events]


async def test_replay_then_live_in_order_with_event_types(client: LedgerClient) -> None:
    a1 = await client.create("documents", b'{"a": 1}', resource_id="a")
    a2 = await client.replace("documents/a", b'{"a": 2}', precondition=precondition(etag=a1.etag))
    b1 = await client.create("documents", b"plain", resource_id="b", content_type="text/plain")
    a3 = await client.delete("documents/a", precondition=precondition(etag=a2.etag))
    a4 = await client.create("documents", b'{"a": 4}', resource_id="a")
    b2 = await client.replace("documents/b", b"plainer", content_type="text/plain",
                              precondition=precondition(etag=b1.etag))
    written = [a1, a2, b1, a3, a4, b2]

    async with watching(client, start_revision=1) as (accepted, events):
        assert accepted == 6
        replayed = await take(events, 6)
        # Replayed events are the versions as written, content included.
        assert [e.resource for e in replayed] == written
        assert [e.type for e in replayed] == [CREATED, UPDATED, CREATED, DELETED, CREATED, UPDATED]
        assert replayed[3].resource.deleted

        a5 = await client.replace("documents/a", b"[]", precondition=precondition(etag=a4.etag))
        b3 = await client.delete("documents/b", precondition=precondition(etag=b2.etag))
        b4 = await client.create("documents", b"{}", resource_id="b")
        live = await take(events, 3)

    assert [e.resource for e in live] == [a5, b3, b4]
    assert [e.type for e in live] == [UPDATED, DELETED, CREATED]


async def test_start_revision_is_inclusive(client: LedgerClient, collect: Collect) -> None:
    for i in range(6):
        await client.create("documents", b"{}", resource_id=f"d{i}")

    events = await collect(client, start_revision=4, until=6)

    assert revisions(events) == [4, 5, 6]
    assert [e.resource.name for e in events] == ["documents/d3", "documents/d4", "documents/d5"]


async def test_watch_of_an_empty_ledger_waits_for_the_first_write(client: LedgerClient) -> None:
    async with watching(client, start_revision=1) as (accepted, events):
        assert accepted == 0
        created = await client.create("documents", b"{}", resource_id="d")
        (event,) = await take(events, 1)
    assert (event.type, event.resource) == (CREATED, created)


async def test_start_revision_zero_gives_only_new_commits(client: LedgerClient) -> None:
    for i in range(3):
        await client.create("documents", b"{}", resource_id=f"old{i}")

    async with watching(client, start_revision=0) as (accepted, events):
        assert accepted == 3
        new = await client.create("documents", b"{}", resource_id="new")
        updated = await client.replace("documents/old0", b"[]", precondition=precondition(
            version=1))
        got = await take(events, 2)

    assert [e.resource for e in got] == [new, updated]
    assert [e.type for e in got] == [CREATED, UPDATED]


async def test_start_revision_zero_misses_nothing_committed_after_acceptance(
    server: RunningServer, client: LedgerClient
) -> None:
    """While others write, each watch from now on starts exactly after the revision it was
    accepted at: a commit that lands while the service accepts the watch is not skipped."""
    stop = asyncio.Event()

    async def write(writer: LedgerClient, prefix: str) -> int:
        count = 0
        while not stop.is_set():
            await writer.create("documents", b"{}", resource_id=f"{prefix}{count}")
            count += 1
        return count

    async with connect(server.target) as one, connect(server.target) as two:
        writers = [asyncio.create_task(write(one, "a")), asyncio.create_task(write(two, "b"))]
        try:
            for _ in range(100):
                async with watching(client, start_revision=0) as (accepted, events):
                    (first,) = await take(events, 1)
                assert first.resource.revision == accepted + 1
        finally:
            stop.set()
            written = await asyncio.gather(*writers)
    assert min(written) > 0


async def test_resume_after_cancel_has_no_gap_and_no_duplicate(
    server: RunningServer, client: LedgerClient, collect: Collect
) -> None:
    for i in range(10):
        await client.create("documents", b"{}", resource_id=f"d{i}")

    async with connect(server.target) as watcher:
        async with watching(watcher, start_revision=1) as (_, events):
            first = await take(events, 4)
        # Written while nobody watches.
        for i in range(10, 15):
            await client.create("documents", b"{}", resource_id=f"d{i}")
        resumed = await collect(watcher, start_revision=first[-1].resource.revision + 1,
                                until=15)

    assert revisions(first) + revisions(resumed) == list(range(1, 16))


async def test_watch_resumes_past_the_end_then_follows(
    client: LedgerClient,
) -> None:
    await client.create("documents", b"{}", resource_id="d0")

    # A start beyond the ledger: nothing before it is sent, it is followed from there.
    async with watching(client, start_revision=4) as (accepted, events):
        assert accepted == 1
        for i in range(1, 6):
            await client.create("documents", b"{}", resource_id=f"d{i}")
        got = await take(events, 3)

    assert revisions(got) == [4, 5, 6]


PREFIX_NAMES = [
    "documents/1",
    "documentsX/1",
    "documents/1/notes/n1",
    "docs/1",
    "projects/p1",
    "projects/p1/notes/n1",
    "projects/p10/notes/n1",
    "projects/p1X/notes/n1",
    "documents.old/1",
    "documents/10",
]


@pytest.mark.parametrize(
    ("prefix", "expected"),
    [
        ("documents", ["documents/1", "documents/1/notes/n1", "documents/10"]),
        ("documents/1", ["documents/1", "documents/1/notes/n1"]),
        ("projects/p1", ["projects/p1", "projects/p1/notes/n1"]),
        ("projects/p1/notes", ["projects/p1/notes/n1"]),
        ("projects", ["projects/p1", "projects/p1/notes/n1", "projects/p10/notes/n1",
                      "projects/p1X/notes/n1"]),
        ("", PREFIX_NAMES),
    ],
)
async def test_prefix_matches_whole_segments_in_replay_and_live(
    client: LedgerClient, prefix: str, expected: list[str]
) -> None:
    for name in PREFIX_NAMES:
        collection, resource_id = name.rsplit("/", 1)
        await client.create(collection, b"{}", resource_id=resource_id)

    async with watching(client, prefix, start_revision=1) as (_, events):
        replayed = await take(events, len(expected))
        assert [e.resource.name for e in replayed] == expected
        # Live: the same names written again (as deletes), in the same order.
        for revision, name in enumerate(PREFIX_NAMES, start=len(PREFIX_NAMES) + 1):
            deleted = await client.delete(name, precondition=precondition(version=1))
            assert deleted.revision == revision
        live = await take(events, len(expected))

    assert [e.resource.name for e in live] == expected
    assert {e.type for e in live} == {DELETED}
    offset = len(PREFIX_NAMES)
    assert revisions(live) == [r + offset for r in revisions(replayed)]


async def test_a_watcher_replaying_a_long_history_while_others_write_misses_nothing(
    server: RunningServer, client: LedgerClient, collect: Collect
) -> None:
    history = 600  # more than one replay batch (256), twice over
    await client.create("documents", b"[0]", resource_id="d")
    for i in range(1, history):
        await client.replace("documents/d", json.dumps([i]).encode(),
                             precondition=precondition(version=i))

    async def write(writer: LedgerClient, collection: str) -> None:
        for i in range(100):
            await writer.create(collection, b"{}", resource_id=f"r{i}")

    async with connect(server.target) as one, connect(server.target) as two, connect(
        server.target
    ) as watcher:
        watched = asyncio.ensure_future(collect(watcher, start_revision=1, until=history + 200))
        await asyncio.gather(write(one, "one"), write(two, "two"))
        events = await watched

    assert revisions(events) == list(range(1, history + 201))
    assert [e.resource.version for e in events[:history]] == list(range(1, history + 1))
    assert [json.loads(e.resource.content) for e in events[:history]] == [
        [i] for i in range(history)
    ]
    assert sorted(e.resource.name for e in events[history:]) == sorted(
        f"{c}/r{i}" for c in ("one", "two") for i in range(100)
    )


async def test_a_slow_watcher_is_ended_with_the_revision_to_resume_from(
    slow_server: RunningServer, collect: Collect
) -> None:
    writes = 2000
    body = json.dumps("x" * 2048).encode()
    # No BDP probing on the watcher's channel: its receive window stays small, so the server
    # cannot push the whole backlog into the client's buffers and the watch queue must fill.
    async with connect(slow_server.target) as writer, connect(
        slow_server.target, options=[("grpc.http2.bdp_probe", 0)]
    ) as watcher:
        current = await writer.create("documents", body, resource_id="d")
        received: list[pb.WatchEvent] = []
        async with watching(watcher, start_revision=1) as (_, events):
            received += await take(events, 1)  # live from here on
            # The watcher reads nothing while the ledger moves on.
            for _ in range(writes):
                current = await writer.replace("documents/d", body,
                                               precondition=precondition(etag=current.etag))
            assert current.revision == writes + 1
            with pytest.raises(LedgerCallError) as info:
                await read_all(events, received)
        error = info.value
        assert (error.code, error.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED,
                                              "WATCHER_TOO_SLOW")
        assert revisions(received) == list(range(1, len(received) + 1))
        assert len(received) < writes
        resume = int(error.metadata["resume_revision"])
        assert resume == received[-1].resource.revision + 1

        # Resuming there, the watcher catches up with no gap and no duplicate.
        rest = await collect(watcher, start_revision=resume, until=writes + 1)

    assert revisions(received) + revisions(rest) == list(range(1, writes + 2))
    assert all(e.resource.content == body for e in rest)


async def test_many_watchers_each_see_every_write_once(
    server: RunningServer, client: LedgerClient
) -> None:
    async with connect(server.target) as other, watching(client, start_revision=1) as (
        _, mine
    ), watching(other, "documents", start_revision=1) as (_, theirs):
        for i in range(20):
            await client.create("documents" if i % 2 else "notes", b"{}", resource_id=f"r{i}")
        everything = await take(mine, 20)
        documents = await take(theirs, 10)

    assert revisions(everything) == list(range(1, 21))
    assert revisions(documents) == list(range(2, 21, 2))


# --- arguments --------------------------------------------------------------------------------


async def refused(call: Awaitable[Any], reason: str, field: str) -> LedgerCallError:
    with pytest.raises(LedgerCallError) as info:
        await call
    assert (info.value.code, info.value.reason) == (grpc.StatusCode.INVALID_ARGUMENT, reason)
    assert info.value.metadata["field"] == field
    return info.value


@pytest.mark.parametrize("prefix", ["documents/", "/documents", "a//b", "..", "documents/..",
                                    "a%2Fb", "café", "-x", "a b", "/".join(["a"] * 17),
                                    "x" * 129, "/".join(["y" * 100] * 6)])
async def test_bad_prefix_is_invalid_name(client: LedgerClient, prefix: str) -> None:
    await refused(client.open_watch(prefix, 1), "INVALID_NAME", "prefix")
    # Through the event iterator as well.
    with pytest.raises(LedgerCallError) as info:
        await anext(aiter(client.watch(prefix, 1)))
    assert info.value.reason == "INVALID_NAME"


async def test_negative_start_revision_is_invalid_argument(client: LedgerClient) -> None:
    await refused(client.open_watch("", -1), "INVALID_ARGUMENT", "start_revision")
    await refused(client.open_watch("documents", -5), "INVALID_ARGUMENT", "start_revision")
