"""Concurrency is tested, not assumed: many writers with the same expected version, exactly one
wins, every loser is told the winner's version; read-modify-write loses no update."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from typing import Any

import grpc
import pytest

from casledger.service.api.casledger.v1 import ledger_pb2 as pb
from casledger.service.client import LedgerCallError, LedgerClient, connect, precondition
from casledger.service.server import RunningServer

CHANNELS = 5


@pytest.fixture
async def clients(server: RunningServer) -> AsyncIterator[list[LedgerClient]]:
    """Several clients, each on its own channel (its own HTTP/2 connection)."""
    async with AsyncExitStack() as stack:
        yield [await stack.enter_async_context(connect(server.target)) for _ in range(CHANNELS)]


async def race(calls: list[Awaitable[pb.Resource]]) -> tuple[list[pb.Resource],
                                                             list[LedgerCallError]]:
    """Run `calls` at once; their successes and their LedgerCallErrors (anything else raises)."""
    outcomes: list[Any] = await asyncio.gather(*calls, return_exceptions=True)
    for outcome in outcomes:
        if not isinstance(outcome, pb.Resource | LedgerCallError):
            raise outcome
    return ([o for o in outcomes if isinstance(o, pb.Resource)],
            [o for o in outcomes if isinstance(o, LedgerCallError)])


async def test_fifty_updates_with_the_same_etag_exactly_one_wins(
    clients: list[LedgerClient], ledger_revision: Callable[[], int]
) -> None:
    created = await clients[0].create("documents", b'{"writer": null}', resource_id="d")

    winners, losers = await race([
        clients[i % CHANNELS].replace("documents/d", json.dumps({"writer": i}).encode(),
                                      precondition=precondition(etag=created.etag))
        for i in range(50)
    ])

    assert len(winners) == 1
    (winner,) = winners
    assert winner.version == 2
    assert len(losers) == 49
    for error in losers:
        assert (error.code, error.reason) == (grpc.StatusCode.ABORTED, "VERSION_MISMATCH")
        assert error.current_version == winner.version
        assert error.current_etag == winner.etag
    history = await clients[0].versions("documents/d", include_content=True)
    assert [v.version for v in history.versions] == [1, 2]
    assert history.versions[1] == winner
    assert await clients[1].get("documents/d") == winner
    assert ledger_revision() == 2


async def test_fifty_mixed_writes_with_the_same_version_exactly_one_wins(
    clients: list[LedgerClient], ledger_revision: Callable[[], int]
) -> None:
    created = await clients[0].create("documents", b'{"n": 0}', resource_id="d")
    pre = precondition(version=created.version)
    calls: list[Awaitable[pb.Resource]] = []
    for i in range(50):
        client = clients[i % CHANNELS]
        if i % 3 == 0:
            calls.append(client.replace("documents/d", b'{"n": 1}', precondition=pre))
        elif i % 3 == 1:
            calls.append(client.patch("documents/d", b'{"m": 1}',
                                      media_type="application/merge-patch+json",
                                      precondition=pre))
        else:
            calls.append(client.delete("documents/d", precondition=pre))

    winners, losers = await race(calls)

    assert len(winners) == 1
    (winner,) = winners
    assert winner.version == 2
    for error in losers:
        if winner.deleted:
            # Whoever comes after a delete finds nothing: a delete is NOT_FOUND, an update a
            # mismatch against an absent resource.
            assert error.reason in ("NOT_FOUND", "VERSION_MISMATCH")
            assert error.current_version is None
        else:
            assert error.reason == "VERSION_MISMATCH"
            assert (error.current_version, error.current_etag) == (2, winner.etag)
    assert ledger_revision() == 2


async def test_thirty_creates_of_one_name_exactly_one_wins(
    clients: list[LedgerClient], ledger_revision: Callable[[], int]
) -> None:
    winners, losers = await race([
        clients[i % CHANNELS].create("documents", json.dumps([i]).encode(), resource_id="d")
        for i in range(30)
    ])

    assert len(winners) == 1
    assert winners[0].version == 1
    assert len(losers) == 29
    for error in losers:
        assert (error.code, error.reason) == (grpc.StatusCode.ALREADY_EXISTS, "ALREADY_EXISTS")
        assert (error.current_version, error.current_etag) == (1, winners[0].etag)
    assert ledger_revision() == 1


async def test_concurrent_retries_of_one_request_write_once(
    clients: list[LedgerClient], ledger_revision: Callable[[], int]
) -> None:
    created, failed = await race([
        clients[i % CHANNELS].create("documents", b'{"once": true}', request_id="only-once")
        for i in range(30)
    ])
    assert failed == []
    assert len({r.SerializeToString(deterministic=True) for r in created}) == 1
    assert ledger_revision() == 1

    updated, failed = await race([
        clients[i % CHANNELS].replace(created[0].name, b"[]", request_id="update-once",
                                      precondition=precondition(etag=created[0].etag))
        for i in range(30)
    ])
    assert failed == []
    assert {(r.version, r.revision) for r in updated} == {(2, 2)}
    assert ledger_revision() == 2


async def test_concurrent_read_modify_write_loses_no_update(
    clients: list[LedgerClient], ledger_revision: Callable[[], int]
) -> None:
    await clients[0].create("counters", b'{"count": 0}', resource_id="c")

    def increment(content: bytes) -> bytes:
        value = json.loads(content)
        return json.dumps({"count": value["count"] + 1}).encode()

    results = await asyncio.gather(*(
        clients[i % CHANNELS].update("counters/c", increment) for i in range(20)
    ))

    final = await clients[0].get("counters/c")
    assert json.loads(final.content) == {"count": 20}
    assert final.version == 21
    assert sorted(r.version for r in results) == list(range(2, 22))
    history = await clients[0].versions("counters/c", include_content=True)
    assert [v.version for v in history.versions] == list(range(1, 22))
    assert [json.loads(v.content)["count"] for v in history.versions] == list(range(21))
    assert ledger_revision() == 21


async def test_concurrent_writes_to_many_resources_get_gap_free_revisions(
    clients: list[LedgerClient], ledger_revision: Callable[[], int]
) -> None:
    created = await race([
        clients[i % CHANNELS].create("documents", b"{}", resource_id=f"d{i}") for i in range(40)
    ])
    updated = await race([
        clients[i % CHANNELS].replace(r.name, b"[]", precondition=precondition(etag=r.etag))
        for i, r in enumerate(created[0])
    ])

    assert (len(created[1]), len(updated[1])) == (0, 0)
    revisions = sorted(r.revision for r in created[0] + updated[0])
    assert revisions == list(range(1, 81))
    assert ledger_revision() == 80
