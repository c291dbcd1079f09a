"""The bridge's read cache against a real service (``http_bridge/readindex.py``): reads answered
from the cache at a fraction of the calls, byte for byte as the service's own answers would be;
every write acknowledged before a read is seen by it (checked with the linearizability checker
too); deletions; reads that go to the service while the cache's watch is down, or when the
request carries credentials; GetRevision itself."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from casledger.http_bridge.app import BridgeSettings
from casledger.service import auth
from casledger.service.api.casledger.v1 import ledger_pb2 as pb
from casledger.service.client import (
    LedgerCallError,
    LedgerClient,
    call_metadata,
    connect,
    precondition,
)
from casledger.service.config import Settings
from casledger.service.server import RunningServer, serve
from tests.support import linearizability as lin
from tests.support.metrics import bridge_metric
from tests.support.polling import until

from .conftest import BridgeFactory, RawCall, closed_port

JSON = {"Content-Type": "application/json"}
GET_RESOURCE = "casledger.v1.Ledger/GetResource"
GET_REVISION = "casledger.v1.Ledger/GetRevision"


async def reads(http: httpx.AsyncClient, outcome: str) -> float:
    return await bridge_metric(http, "casledger_http_read_cache_reads_total", outcome=outcome)


async def fallbacks(http: httpx.AsyncClient, reason: str) -> float:
    return await bridge_metric(http, "casledger_http_read_cache_fallbacks_total", reason=reason)


def calls(server: RunningServer, rpc: str, code: str = "OK") -> float:
    assert server.metrics is not None
    value = server.metrics.registry.get_sample_value("casledger_grpc_requests_total",
                                                     {"rpc": rpc, "code": code})
    return 0.0 if value is None else value


async def following(http: httpx.AsyncClient, up: bool = True) -> None:
    """Until the bridge's read cache follows the ledger (or, `up` False, no longer does)."""
    async def check() -> bool:
        return await bridge_metric(http, "casledger_http_read_cache_following") == float(up)
    await until(check)


@pytest.fixture
async def cached(bridge: httpx.AsyncClient) -> httpx.AsyncClient:
    """The `bridge` fixture (the read cache is on by default), once its cache follows."""
    await following(bridge)
    return bridge


@pytest.fixture
async def plain(server: RunningServer, make_bridge: BridgeFactory
                ) -> AsyncIterator[httpx.AsyncClient]:
    """A bridge without the read cache (and one unary call per request), in front of the same
    service."""
    async with make_bridge(BridgeSettings(target=server.target, read_cache=False,
                                          batch_calls=False)) as http:
        yield http


def body_n(content: bytes) -> int:
    n = json.loads(content)["n"]
    assert isinstance(n, int)
    return n


# --- fewer calls, the same answers -------------------------------------------------------------


async def test_reads_come_from_the_cache_at_a_fraction_of_the_calls(
    cached: httpx.AsyncClient, client: LedgerClient, server: RunningServer,
) -> None:
    for i in range(3):
        await client.create("documents", b'{"i": %d}' % i, resource_id=f"d{i}")
    before = calls(server, GET_REVISION)

    responses = await asyncio.gather(*(cached.get(f"/v1/documents/d{i % 3}")
                                       for i in range(60)))

    assert [json.loads(r.content)["i"] for r in responses] == [i % 3 for i in range(60)]
    assert calls(server, GET_RESOURCE) == 0  # the watch brought all three heads
    rounds = calls(server, GET_REVISION) - before
    assert 1 <= rounds < 20  # one call for every read waiting when it starts
    assert await reads(cached, "hit") == 60
    assert await bridge_metric(cached, "casledger_http_read_index_rounds_total") == rounds
    assert await bridge_metric(cached, "casledger_http_read_cache_entries") == 3
    assert await bridge_metric(cached, "casledger_http_read_cache_revision") == 3
    assert await bridge_metric(cached, "casledger_http_read_cache_bytes") > 0


async def test_without_the_cache_every_read_calls_the_service(
    plain: httpx.AsyncClient, client: LedgerClient, server: RunningServer,
) -> None:
    await client.create("documents", b"{}", resource_id="a")
    for _ in range(5):
        assert (await plain.get("/v1/documents/a")).status_code == 200

    assert calls(server, GET_RESOURCE) == 5
    assert calls(server, GET_REVISION) == 0
    assert server.store.hub.watchers == 0
    assert await reads(plain, "hit") == 0


def comparable(response: httpx.Response) -> tuple[int, dict[str, str], bytes]:
    headers = {k: v for k, v in response.headers.items() if k != "x-request-id"}
    return response.status_code, headers, response.content


async def test_answers_from_the_cache_are_byte_identical(
    cached: httpx.AsyncClient, plain: httpx.AsyncClient, client: LedgerClient,
) -> None:
    a = await client.create("documents", b'{"b": 1,   "a": [1]}\n', resource_id="a")
    a = await client.replace("documents/a", b'{"v":  2}', precondition=precondition(etag=a.etag))
    await client.create("documents", b"plain text", resource_id="t", content_type="text/plain")
    gone = await client.create("documents", b"{}", resource_id="gone")
    await client.delete("documents/gone", precondition=precondition(etag=gone.etag))
    later = "Fri, 01 Jan 2100 00:00:00 GMT"
    cases: list[tuple[str, str, dict[str, str]]] = [
        ("GET", "/v1/documents/a", {}),
        ("HEAD", "/v1/documents/a", {}),
        ("GET", "/v1/documents/t", {}),
        ("GET", "/v1/documents/a", {"If-None-Match": a.etag}),
        ("HEAD", "/v1/documents/a", {"If-None-Match": "*"}),
        ("GET", "/v1/documents/a", {"If-None-Match": '"1-0000000000000000"'}),
        ("GET", "/v1/documents/a", {"If-Modified-Since": later}),
        ("GET", "/v1/documents/a", {"If-Match": '"1-0000000000000000"'}),
        ("GET", "/v1/documents/a", {"If-Match": "not-quoted"}),
        ("GET", "/v1/documents/a", {"If-Unmodified-Since": "Sat, 01 Jan 2000 00:00:00 GMT"}),
        ("GET", "/v1/documents/gone", {}),
        ("HEAD", "/v1/documents/gone", {}),
        ("GET", "/v1/documents/never", {}),  # a miss, then a hit on its absence
        ("GET", "/v1/documents/never", {}),
        ("GET", "/v1/documents/gone?version=2", {}),
        ("GET", "/v1/documents/a?version=1", {}),
        ("GET", "/v1/documents/-bad", {}),  # refused by the service, never cached
    ]
    for method, path, headers in cases:
        ours = await cached.request(method, path, headers=headers)
        theirs = await plain.request(method, path, headers=headers)
        assert comparable(ours) == comparable(theirs), (method, path, headers)

    assert await reads(cached, "hit") >= 11
    assert await reads(cached, "fallback") == 0


# --- linearizable ------------------------------------------------------------------------------


async def test_a_write_acknowledged_over_grpc_is_seen_by_the_next_bridge_read(
    cached: httpx.AsyncClient, server: RunningServer,
) -> None:
    async with connect(server.target) as writer:
        await writer.create("counters", b'{"n": 0}', resource_id="c")

        async def write_then_read(worker: int) -> None:
            rng = random.Random(worker)
            for _ in range(15):
                try:
                    written = await writer.update("counters/c", lambda content: json.dumps(
                        {"n": body_n(content) + 1}).encode())
                except LedgerCallError as error:
                    if error.reason != "VERSION_MISMATCH":
                        raise
                    continue  # out of retries: contention, not a bug
                read = await cached.get("/v1/counters/c")
                assert read.status_code == 200
                # Read-your-writes: this version, or one written after it.
                assert body_n(read.content) >= written.version - 1, (worker, written.version)
                await asyncio.sleep(rng.uniform(0, 0.002))

        async def keep_reading() -> None:
            seen = 0
            for _ in range(60):
                read = await cached.get("/v1/counters/c")
                n = body_n(read.content)
                assert n >= seen  # one reader's reads never go back
                seen = n

        await asyncio.gather(*(write_then_read(w) for w in range(4)),
                             *(keep_reading() for _ in range(2)))

    assert await reads(cached, "hit") > 0
    assert await reads(cached, "fallback") == 0


async def test_grpc_writers_and_bridge_readers_are_linearizable(
    cached: httpx.AsyncClient, server: RunningServer,
) -> None:
    history: list[lin.Op] = []
    async with connect(server.target) as ledger:
        await ledger.create("counters", b'{"n": 0}', resource_id="r")

        async def grpc_writer(name: str, seed: int) -> None:
            rng = random.Random(seed)
            for _ in range(12):
                invoke = time.monotonic()
                current = await ledger.get("counters/r")
                n = body_n(current.content)
                history.append(lin.read(name, invoke, time.monotonic(), n))
                invoke = time.monotonic()
                try:
                    await ledger.replace("counters/r", json.dumps({"n": n + 1}).encode(),
                                         precondition=precondition(etag=current.etag))
                    outcome: lin.Outcome = "ok"
                except LedgerCallError as error:
                    if error.reason != "VERSION_MISMATCH":
                        raise
                    outcome = "fail"
                history.append(lin.cas(name, invoke, time.monotonic(), n, n + 1,
                                       outcome=outcome))
                await asyncio.sleep(rng.uniform(0, 0.003))

        async def http_reader(name: str) -> None:
            for _ in range(40):
                invoke = time.monotonic()
                response = await cached.get("/v1/counters/r")
                assert response.status_code == 200
                history.append(lin.read(name, invoke, time.monotonic(), body_n(response.content)))

        await asyncio.gather(*(grpc_writer(f"grpc{i}", i) for i in range(4)),
                             *(http_reader(f"http{i}") for i in range(4)))

    result = lin.check(history, 0)
    assert result.linearizable, result.explain()
    assert await reads(cached, "hit") > 0


async def test_deletes_and_recreations_read_as_before(
    cached: httpx.AsyncClient, plain: httpx.AsyncClient, client: LedgerClient, problem: Any,
) -> None:
    created = await client.create("documents", b'{"v": 1}', resource_id="d")
    assert (await cached.get("/v1/documents/d")).status_code == 200
    await client.delete("documents/d", precondition=precondition(etag=created.etag))

    deleted = await cached.get("/v1/documents/d")
    body = problem(deleted, 404, "NOT_FOUND")
    assert body["deleted_at_version"] == 2
    assert comparable(deleted) == comparable(await plain.get("/v1/documents/d"))
    problem(await cached.get("/v1/documents/d?version=2"), 410, "DELETED")

    await client.create("documents", b'{"v": 3}', resource_id="d")
    again = await cached.get("/v1/documents/d")
    assert (again.status_code, again.content) == (200, b'{"v": 3}')
    assert again.headers["etag"].startswith('"3-')
    assert await reads(cached, "fallback") == 0


# --- fallbacks ---------------------------------------------------------------------------------


async def test_reads_go_to_the_service_while_the_watch_is_down(
    settings: Settings, make_bridge: BridgeFactory, problem: Any,
) -> None:
    port = closed_port()
    fixed = settings.replace(grpc_listen=f"127.0.0.1:{port}")
    # Never paused for want of reads: the waits below for the watch make no reads.
    async with make_bridge(BridgeSettings(target=f"127.0.0.1:{port}", call_timeout_s=2,
                                          read_cache_idle_s=0)) as http:
        async with serve(fixed) as running, connect(running.target) as client:
            await following(http)
            created = await client.create("documents", b'{"v": 1}', resource_id="a")
            assert (await http.get("/v1/documents/a")).status_code == 200
            assert await reads(http, "hit") == 1
        await following(http, up=False)

        # The service is gone: a cached 200 could be stale; the ordinary answer is a 503.
        problem(await http.get("/v1/documents/a"), 503, "UNAVAILABLE")
        assert await fallbacks(http, "not_following") == 1

        # A channel of its own: gRPC shares connections between channels to one address, and
        # the bridge's is waiting out its reconnection backoff.
        async with serve(fixed) as running, connect(running.target, options=[
            ("grpc.use_local_subchannel_pool", 1)]) as client:
            await client.replace("documents/a", b'{"v": 2}',
                                 precondition=precondition(etag=created.etag))
            # Written while the bridge was away: once the bridge reaches the service again,
            # its reads see it, whether its watch is back yet or not.
            first = await http.get("/v1/documents/a")
            while first.status_code == 503:
                await asyncio.sleep(0.05)
                first = await http.get("/v1/documents/a")
            await following(http)
            second = await http.get("/v1/documents/a")
            hits = await reads(http, "hit")

    assert first.content == second.content == b'{"v": 2}'
    assert hits >= 2  # the cache resumed where it stopped


async def test_the_watch_pauses_without_reads_and_the_next_read_sees_every_write(
    server: RunningServer, client: LedgerClient, make_bridge: BridgeFactory,
) -> None:
    async with make_bridge(BridgeSettings(target=server.target,
                                          read_cache_idle_s=0.3)) as http:
        await following(http)
        created = await client.create("documents", b'{"v": 1}', resource_id="a")
        assert (await http.get("/v1/documents/a")).status_code == 200
        await following(http, up=False)  # no read for 0.3 s: the watch is stopped
        async def watch_ended() -> bool:  # ... and the service saw the call end
            return calls(server, "casledger.v1.Ledger/Watch", "CANCELLED") == 1
        await until(watch_ended)
        # Written while nothing streams to the bridge.
        await client.replace("documents/a", b'{"v": 2}',
                             precondition=precondition(etag=created.etag))

        first = await http.get("/v1/documents/a")
        assert first.content == b'{"v": 2}'
        assert await fallbacks(http, "paused") == 1
        await following(http)  # that read started the watch again
        # The cache starts empty: a miss (GetResource), then a hit.
        later = [await http.get("/v1/documents/a") for _ in range(2)]
        counts = [await reads(http, outcome) for outcome in ("hit", "miss", "fallback")]

    assert [r.content for r in later] == [b'{"v": 2}'] * 2
    assert counts == [2, 1, 1]


async def test_requests_with_credentials_bypass_the_cache(
    cached: httpx.AsyncClient, client: LedgerClient, server: RunningServer,
) -> None:
    await client.create("documents", b"{}", resource_id="a")
    anonymous = await cached.get("/v1/documents/a")
    hits, direct = await reads(cached, "hit"), calls(server, GET_RESOURCE)

    with_token = await cached.get("/v1/documents/a", headers={"Authorization": "Bearer x"})

    assert comparable(with_token) == comparable(anonymous)  # the service is open: same answer
    assert await reads(cached, "hit") == hits
    assert await fallbacks(cached, "authorization") == 1
    assert calls(server, GET_RESOURCE) == direct + 1


async def test_with_access_control_the_cache_never_serves(
    settings: Settings, tmp_path: Path, make_bridge: BridgeFactory, problem: Any,
) -> None:
    tokens = tmp_path / "tokens.toml"
    reader = auth.create_token(tokens, principal="reader", scopes=["read", "write"])
    async with serve(settings.replace(auth_tokens_file=str(tokens))) as running, make_bridge(
        BridgeSettings(target=running.target)
    ) as http:
        async def refused() -> bool:
            return calls(running, GET_REVISION, "UNAUTHENTICATED") >= 1
        await until(refused)  # the bridge has no token: its GetRevision is refused
        bearer = {"Authorization": f"Bearer {reader}"}
        created = await http.put("/v1/documents/a", content=b"{}",
                                 headers={"If-None-Match": "*", **JSON, **bearer})
        assert created.status_code == 201
        allowed = await http.get("/v1/documents/a", headers=bearer)
        anonymous = await http.get("/v1/documents/a")

        assert allowed.status_code == 200
        problem(anonymous, 401, "UNAUTHENTICATED")
        assert await bridge_metric(http, "casledger_http_read_cache_following") == 0
        assert await reads(http, "hit") == 0
        assert running.store.hub.watchers == 0


# --- GetRevision -------------------------------------------------------------------------------


async def test_get_revision_is_the_latest_committed_revision(client: LedgerClient) -> None:
    assert await client.revision() == 0
    created = await client.create("documents", b"{}", resource_id="a")
    updated = await client.replace("documents/a", b"[]", precondition=precondition(
        etag=created.etag))

    assert await client.revision() == updated.revision == 2


async def test_get_revision_refuses_fields_it_does_not_know(raw_call: RawCall) -> None:
    with pytest.raises(LedgerCallError) as refused:
        await raw_call("GetRevision", b"\x08\x01")  # field 1: GetRevisionRequest has none

    assert refused.value.reason == "UNKNOWN_FIELD"
    assert pb.GetRevisionResponse.FromString(await raw_call("GetRevision", b"")).revision == 0


async def test_get_revision_needs_read_access_to_the_whole_ledger(
    settings: Settings, tmp_path: Path,
) -> None:
    tokens = tmp_path / "tokens.toml"
    whole = auth.create_token(tokens, principal="whole", scopes=["read"])
    limited = auth.create_token(tokens, principal="docs", scopes=["read"],
                                prefixes=["documents"])
    writer = auth.create_token(tokens, principal="writer", scopes=["write"])
    async with serve(settings.replace(auth_tokens_file=str(tokens))) as running:
        outcomes = {}
        for name, token in (("whole", whole), ("limited", limited), ("writer", writer),
                            ("none", "")):
            options = [("authorization", f"Bearer {token}")] if token else []
            async with connect(running.target) as client:
                reset = call_metadata.set(tuple(options))
                try:
                    outcomes[name] = str(await client.revision())
                except LedgerCallError as error:
                    outcomes[name] = error.reason
                finally:
                    call_metadata.reset(reset)

    assert outcomes == {"whole": "0", "limited": "PERMISSION_DENIED",
                        "writer": "PERMISSION_DENIED", "none": "UNAUTHENTICATED"}
