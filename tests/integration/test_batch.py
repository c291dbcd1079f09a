"""Batch: each operation is exactly its unary call (outcome, errors, access rules, logs), and the
batching client carries concurrent calls in few Batch calls without changing any answer."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from casledger.service import auth
from casledger.service.api.casledger.v1 import ledger_pb2 as pb
from casledger.service.batching import BatchingClient
from casledger.service.client import LedgerCallError, LedgerClient, call_metadata, connect
from casledger.service.config import Settings
from casledger.service.server import RunningServer, serve
from casledger.service.servicer import MAX_BATCH_OPERATIONS


def op(**call: Any) -> pb.BatchOperation:
    return pb.BatchOperation(**call)


def get(name: str) -> pb.BatchOperation:
    return op(get=pb.GetResourceRequest(name=name))


def create(parent: str, resource_id: str, content: bytes = b"{}") -> pb.BatchOperation:
    return op(create=pb.CreateResourceRequest(parent=parent, resource_id=resource_id,
                                              content=content, content_type="application/json"))


def replace(name: str, content: bytes, pre: pb.Precondition | None) -> pb.BatchOperation:
    return op(update=pb.UpdateResourceRequest(
        name=name, content=pb.ResourceContent(data=content, content_type="application/json"),
        precondition=pre))


def same_error(batched: object, unary: LedgerCallError) -> None:
    assert isinstance(batched, LedgerCallError), batched
    assert (batched.code, batched.message, batched.reason, batched.metadata) == (
        unary.code, unary.message, unary.reason, unary.metadata)


async def unary_error(call: Any) -> LedgerCallError:
    with pytest.raises(LedgerCallError) as refused:
        await call
    return refused.value


def calls(server: RunningServer, rpc: str) -> float:
    assert server.metrics is not None
    value = server.metrics.registry.get_sample_value(
        "casledger_grpc_requests_total", {"rpc": f"casledger.v1.Ledger/{rpc}", "code": "OK"})
    return 0.0 if value is None else value


# --- the service -------------------------------------------------------------------------------


async def test_each_operation_has_its_unary_outcome_in_order(client: LedgerClient) -> None:
    first = await client.create("documents", b'{"n":1}', resource_id="a")
    await client.create("documents", b"{}", resource_id="x")
    # Operations are independent and unordered: no two of them touch one resource here except
    # the read and the write of documents/a (the read sees version 1 or 2).
    results = await client.batch([
        get("documents/a"),
        replace("documents/a", b'{"n":2}', pb.Precondition(etag=first.etag)),
        replace("documents/b", b"{}", pb.Precondition(version=1)),
        replace("documents/x", b"{}", None),
        create("documents", "c"),
        get("documents/zzz"),
        get("not a name"),
        pb.BatchOperation(),
    ])
    assert isinstance(results[0], pb.Resource)
    assert results[0].version in (1, 2)
    assert isinstance(results[1], pb.Resource)
    assert results[1].version == 2
    assert isinstance(results[4], pb.Resource)
    assert results[4].name == "documents/c"
    # Every refusal is the very error the unary call gives now.
    same_error(results[2], await unary_error(
        client.replace("documents/b", b"{}", precondition=pb.Precondition(version=1))))
    assert isinstance(results[3], LedgerCallError)
    assert results[3].reason == "PRECONDITION_REQUIRED"
    assert results[3].current_version == 1  # the metadata survives the trip
    same_error(results[5], await unary_error(client.get("documents/zzz")))
    same_error(results[6], await unary_error(client.get("not a name")))
    assert isinstance(results[7], LedgerCallError)
    assert results[7].code == grpc.StatusCode.INVALID_ARGUMENT
    assert (await client.get("documents/a")).version == 2


async def test_operations_on_one_version_race_like_unary_calls(client: LedgerClient) -> None:
    first = await client.create("documents", b"{}", resource_id="a")
    results = await client.batch([
        replace("documents/a", b'{"w":%d}' % i, pb.Precondition(etag=first.etag))
        for i in range(10)])
    wins = [r for r in results if isinstance(r, pb.Resource)]
    assert len(wins) == 1
    assert all(isinstance(r, LedgerCallError) and r.reason == "VERSION_MISMATCH"
               for r in results if r is not wins[0])
    assert (await client.get("documents/a")).etag == wins[0].etag


async def test_a_batch_too_large_or_malformed_is_refused_whole(client: LedgerClient) -> None:
    with pytest.raises(LedgerCallError) as refused:
        await client.batch([get("documents/a")] * (MAX_BATCH_OPERATIONS + 1))
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.value.reason == "INVALID_ARGUMENT"
    assert await client.batch([]) == []


async def test_each_operation_is_counted_as_its_call(client: LedgerClient,
                                                     server: RunningServer) -> None:
    before = calls(server, "CreateResource"), calls(server, "Batch")
    await client.batch([create("documents", f"r{i}") for i in range(3)])
    assert (calls(server, "CreateResource"), calls(server, "Batch")) == (
        before[0] + 3, before[1] + 1)


# --- access control ----------------------------------------------------------------------------


@contextlib.contextmanager
def bearer(token: str | None) -> Iterator[None]:
    reset = call_metadata.set(() if token is None else (("authorization", f"Bearer {token}"),))
    try:
        yield
    finally:
        call_metadata.reset(reset)


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    return tmp_path / "tokens.toml"


@pytest.fixture
def tokens(token_file: Path) -> dict[str, str]:
    return {"docs": auth.create_token(token_file, principal="docs", scopes=["read", "write"],
                                      prefixes=["documents"]),
            "reader": auth.create_token(token_file, principal="reader", scopes=["read"])}


@pytest.fixture
async def guarded(settings: Settings, token_file: Path, tokens: dict[str, str]
                  ) -> AsyncIterator[LedgerClient]:
    async with serve(settings.replace(auth_tokens_file=str(token_file))) as running, \
            connect(running.target) as ledger:
        yield ledger


async def test_every_operation_is_authorized_under_its_own_rule(
        guarded: LedgerClient, tokens: dict[str, str]) -> None:
    docs, reader = tokens["docs"], tokens["reader"]
    with bearer(docs):
        created, elsewhere = await guarded.batch([create("documents", "a"),
                                                  create("secrets", "s")])
    assert isinstance(created, pb.Resource)
    assert created.actor == "docs"
    assert isinstance(elsewhere, LedgerCallError)
    assert elsewhere.reason == "PERMISSION_DENIED"
    with bearer(reader):
        read, write = await guarded.batch([
            get("documents/a"), replace("documents/a", b"{}", pb.Precondition(version=1))])
    assert isinstance(read, pb.Resource)
    assert isinstance(write, LedgerCallError)
    assert (write.reason, write.metadata) == ("PERMISSION_DENIED",
                                             {"principal": "reader", "scope": "write"})
    with bearer(None), pytest.raises(LedgerCallError) as refused:
        await guarded.batch([get("documents/a")])
    assert refused.value.code == grpc.StatusCode.UNAUTHENTICATED
    with bearer(docs):
        assert (await guarded.get("documents/a")).version == 1


# --- the batching client -----------------------------------------------------------------------


@pytest.fixture
async def batching(server: RunningServer) -> AsyncIterator[BatchingClient]:
    async with connect(server.target, batching=True) as ledger:
        assert isinstance(ledger, BatchingClient)
        yield ledger


async def test_concurrent_calls_travel_together_with_their_own_answers(
        batching: BatchingClient, client: LedgerClient, server: RunningServer) -> None:
    before = calls(server, "Batch")
    created = await asyncio.gather(*(
        batching.create("documents", b'{"i":%d}' % i, resource_id=f"r{i}") for i in range(40)))
    assert [r.name for r in created] == [f"documents/r{i}" for i in range(40)]
    assert batching.batched_calls == 40
    assert batching.batches < 40 / 4
    assert calls(server, "Batch") - before == batching.batches
    # Errors are exactly the unary client's, raised at the caller.
    outcomes = await asyncio.gather(
        batching.get("documents/r1"),
        batching.replace("documents/r2", b"{}", precondition=pb.Precondition(version=9)),
        batching.delete("documents/nope", precondition=pb.Precondition(version=1)),
        return_exceptions=True)
    assert isinstance(outcomes[0], pb.Resource)
    assert outcomes[0].content == b'{"i":1}'
    same_error(outcomes[1], await unary_error(
        client.replace("documents/r2", b"{}", precondition=pb.Precondition(version=9))))
    same_error(outcomes[2], await unary_error(
        client.delete("documents/nope", precondition=pb.Precondition(version=1))))


async def test_callers_with_different_credentials_never_share_a_batch(
        batching: BatchingClient, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[tuple[str, str], ...]] = []
    original = batching.stub.Batch

    def spy(request: pb.BatchRequest, **kwargs: Any) -> Any:
        seen.append(tuple(kwargs["metadata"]))
        return original(request, **kwargs)

    monkeypatch.setattr(batching.stub, "Batch", spy)

    async def as_caller(n: int) -> pb.Resource:
        call_metadata.set((("authorization", f"Bearer t{n % 2}"), ("x-request-id", f"q{n}")))
        return await batching.create("documents", b"{}", resource_id=f"c{n}")

    await asyncio.gather(*(asyncio.create_task(as_caller(n)) for n in range(8)))
    assert seen
    assert set(seen) == {
        (("authorization", "Bearer t0"),), (("authorization", "Bearer t1"),)}


async def test_large_calls_go_unary_and_an_older_service_gets_unary_calls(
        batching: BatchingClient, monkeypatch: pytest.MonkeyPatch) -> None:
    big = b'{"x":"%s"}' % (b"y" * batching.max_bytes)
    assert (await batching.create("documents", big, resource_id="big")).size_bytes == len(big)
    assert batching.batches == 0

    async def unimplemented(request: pb.BatchRequest, **kwargs: Any) -> Any:
        raise grpc.aio.AioRpcError(grpc.StatusCode.UNIMPLEMENTED, grpc.aio.Metadata(),
                                   grpc.aio.Metadata(), "unknown method Batch")

    monkeypatch.setattr(batching.stub, "Batch", unimplemented)
    results = await asyncio.gather(*(batching.create("documents", b"{}", resource_id=f"o{i}")
                                     for i in range(3)))
    assert [r.version for r in results] == [1, 1, 1]
    assert (await batching.get("documents/o1")).name == "documents/o1"  # unary from now on
    assert batching.batches == 1


async def test_each_call_keeps_its_own_deadline_however_long_it_queued(
        batching: BatchingClient, monkeypatch: pytest.MonkeyPatch) -> None:
    ledger = BatchingClient(batching.channel, call_timeout=5.0, max_calls=1)
    timeouts: list[float] = []
    original = ledger.stub.Batch
    first = asyncio.Event()

    async def slow_first(request: pb.BatchRequest, **kwargs: Any) -> Any:
        timeouts.append(kwargs["timeout"])
        if len(timeouts) == 1:
            first.set()
            await asyncio.sleep(0.5)  # the second call waits in the queue meanwhile
        return await original(request, **kwargs)

    monkeypatch.setattr(ledger.stub, "Batch", slow_first)
    a = asyncio.create_task(ledger.create("documents", b"{}", resource_id="a"))
    await first.wait()
    b = asyncio.create_task(ledger.create("documents", b"{}", resource_id="b"))
    assert [r.version for r in await asyncio.gather(a, b)] == [1, 1]

    # The second Batch call is given what is left of its call's 5 s, not 5 s more.
    assert timeouts[0] > 4.5
    assert timeouts[1] < 4.6


async def test_a_call_fails_at_its_deadline_even_if_its_batch_has_not_answered(
        batching: BatchingClient, monkeypatch: pytest.MonkeyPatch) -> None:
    ledger = BatchingClient(batching.channel, call_timeout=0.2)

    async def unanswered(request: pb.BatchRequest, **kwargs: Any) -> Any:
        await asyncio.sleep(kwargs["timeout"] + 0.5)  # answers after the call's deadline
        raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(),
                                   grpc.aio.Metadata(), "too late")

    monkeypatch.setattr(ledger.stub, "Batch", unanswered)
    refused = await unary_error(ledger.get("documents/any"))
    assert refused.code == grpc.StatusCode.DEADLINE_EXCEEDED
    await ledger.aclose()  # the Batch call ends too; its late failure finds no one waiting
