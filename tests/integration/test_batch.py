"""Batch: each operation is exactly its unary call (outcome, errors, access rules, logs), and the
batching client carries concurrent calls in few Batch calls without changing any answer."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from casledger.service import auth
from casledger.service import batching as batching_module
from casledger.service.api.casledger.v1 import ledger_pb2 as pb
from casledger.service.api.casledger.v1 import ledger_pb2_grpc as pb_grpc
from casledger.service.batching import BatchingClient
from casledger.service.client import LedgerCallError, LedgerClient, call_metadata, connect
from casledger.service.config import Settings
from casledger.service.server import RunningServer, serve
from casledger.service.servicer import MAX_BATCH_OPERATIONS
from tests.support.batchstream import outcomes, stream_batches
from tests.support.polling import until


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


# --- BatchStream: the service ----------------------------------------------------------------


async def test_each_batch_of_a_stream_is_answered_by_its_id_as_its_batch_call_would_be(
        client: LedgerClient, server: RunningServer) -> None:
    first = await client.create("documents", b"{}", resource_id="a")
    before = calls(server, "UpdateResource"), calls(server, "Batch")
    replies = await stream_batches(client.channel, [
        (7, [get("documents/a"), get("documents/missing")]),
        (3, [replace("documents/a", b'{"v":2}', pb.Precondition(etag=first.etag))]),
        (9, [create("documents", "b"), replace("documents/b", b"{}", pb.Precondition(version=5))]),
    ])
    assert sorted(replies) == [3, 7, 9]
    read, missing = outcomes(replies[7])
    assert isinstance(read, pb.Resource)
    assert read.name == "documents/a"  # version 1 or 2: the batches ran at the same time
    same_error(missing, await unary_error(client.get("documents/missing")))
    [updated] = outcomes(replies[3])
    assert isinstance(updated, pb.Resource)
    assert updated.version == 2
    created, stale = outcomes(replies[9])
    assert isinstance(created, pb.Resource)
    assert created.name == "documents/b"
    assert isinstance(stale, LedgerCallError)
    assert stale.reason in ("NOT_FOUND", "VERSION_MISMATCH")  # the create may come first
    # Each operation is counted as its call; no Batch call was made.
    assert (calls(server, "UpdateResource"), calls(server, "Batch")) == (
        before[0] + 1, before[1])


async def test_a_stream_batch_too_large_is_refused_alone_and_the_stream_goes_on(
        client: LedgerClient) -> None:
    replies = await stream_batches(client.channel, [
        (1, [get("documents/a")] * (MAX_BATCH_OPERATIONS + 1)),
        (2, [create("documents", "c")]),
        (3, []),
    ])
    refused = LedgerCallError.from_status_message(replies[1].status)
    assert (refused.code, refused.reason) == (grpc.StatusCode.INVALID_ARGUMENT,
                                              "INVALID_ARGUMENT")
    assert not replies[1].results
    [created] = outcomes(replies[2])
    assert isinstance(created, pb.Resource)
    assert outcomes(replies[3]) == []


async def test_a_stream_message_that_does_not_parse_ends_the_stream(
        client: LedgerClient) -> None:
    raw: Any = client.channel.stream_stream("/casledger.v1.Ledger/BatchStream",
                                            request_serializer=bytes,
                                            response_deserializer=bytes)(timeout=10)
    await raw.write(b"\xff\xff\xff")
    await raw.done_writing()
    with pytest.raises(grpc.aio.AioRpcError) as ended:
        await raw.read()
    error = LedgerCallError.from_rpc_error(ended.value)
    assert (error.code, error.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")
    assert "could not be parsed" in error.message


async def test_shutdown_ends_a_batch_stream_once_it_answered_what_it_took(
        settings: Settings) -> None:
    running_server = serve(settings.replace(shutdown_grace_s=30.0))
    running = await running_server.__aenter__()
    stop: asyncio.Future[Any] | None = None
    try:
        async with grpc.aio.insecure_channel(running.target) as channel:
            stream: Any = pb_grpc.LedgerStub(channel).BatchStream(timeout=60)
            await stream.write(pb.BatchStreamRequest(id=1, operations=[create("documents", "a")]))
            reply = await stream.read()
            stopping = time.monotonic()
            stop = asyncio.ensure_future(running_server.__aexit__(None, None, None))
            assert await stream.read() is grpc.aio.EOF
            assert await stream.code() == grpc.StatusCode.OK
            await stop
    finally:
        if stop is None:
            await running_server.__aexit__(None, None, None)
    [created] = outcomes(reply)
    assert isinstance(created, pb.Resource)
    assert time.monotonic() - stopping < 10  # not the 30 s grace: the stream ended at once


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


async def test_each_batch_of_a_stream_is_authenticated_when_it_comes(
        guarded: LedgerClient, token_file: Path, tokens: dict[str, str]) -> None:
    """A long-lived stream keeps no grant: a token revoked while it is open stops working for
    its next batches."""
    stream: Any = pb_grpc.LedgerStub(guarded.channel).BatchStream(
        metadata=(("authorization", f"Bearer {tokens['docs']}"),), timeout=30)

    async def send(batch_id: int, *operations: pb.BatchOperation) -> pb.BatchStreamResponse:
        await stream.write(pb.BatchStreamRequest(id=batch_id, operations=operations))
        reply: pb.BatchStreamResponse = await stream.read()
        assert reply.id == batch_id
        return reply

    allowed, denied = outcomes(await send(1, create("documents", "a"), create("secrets", "s")))
    assert isinstance(allowed, pb.Resource)
    assert allowed.actor == "docs"
    assert isinstance(denied, LedgerCallError)
    assert denied.reason == "PERMISSION_DENIED"
    [docs] = [info for info in auth.list_tokens(token_file) if info.grant.principal == "docs"]
    auth.revoke_token(token_file, docs.id)
    async with asyncio.timeout(5):  # the service reads the file again within a second
        batch_id = 2
        while not (reply := await send(batch_id, get("documents/a"))).HasField("status"):
            batch_id += 1
            await asyncio.sleep(0.1)
    refused = LedgerCallError.from_status_message(reply.status)
    assert (refused.code, refused.reason) == (grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED")
    await stream.done_writing()
    assert await stream.read() is grpc.aio.EOF


# --- the batching client -----------------------------------------------------------------------

# The two ways the batching client carries batches: messages of a BatchStream (the default), or
# a Batch call each (an older service, or streams=False).
TRANSPORTS = ("stream", "batch")


@pytest.fixture(params=TRANSPORTS)
async def batching(server: RunningServer, request: pytest.FixtureRequest
                   ) -> AsyncIterator[BatchingClient]:
    async with grpc.aio.insecure_channel(server.target) as channel:
        ledger = BatchingClient(channel, call_timeout=5.0, max_ops=5, max_calls=4,
                                streams=request.param == "stream")
        yield ledger
        await ledger.aclose()


def sent_on(ledger: BatchingClient) -> str:
    """The stub method that carries `ledger`'s batches."""
    return "Batch" if ledger._no_streams else "BatchStream"


async def test_concurrent_calls_travel_together_with_their_own_answers(
        batching: BatchingClient, client: LedgerClient, server: RunningServer) -> None:
    before = calls(server, "Batch")
    created = await asyncio.gather(*(
        batching.create("documents", b'{"i":%d}' % i, resource_id=f"r{i}") for i in range(40)))
    # Several batches in flight at once (max_calls 4), each caller with its own answer.
    assert [r.name for r in created] == [f"documents/r{i}" for i in range(40)]
    assert [r.content for r in created] == [b'{"i":%d}' % i for i in range(40)]
    assert batching.batched_calls == 40
    assert 1 < batching.batches < 40 / 4
    batch_calls = batching.batches if sent_on(batching) == "Batch" else 0
    assert calls(server, "Batch") - before == batch_calls
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
    method = sent_on(batching)
    original = getattr(batching.stub, method)

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append(tuple(kwargs["metadata"]))
        return original(*args, **kwargs)

    monkeypatch.setattr(batching.stub, method, spy)

    async def as_caller(n: int) -> pb.Resource:
        call_metadata.set((("authorization", f"Bearer t{n % 2}"), ("x-request-id", f"q{n}")))
        return await batching.create("documents", b"{}", resource_id=f"c{n}")

    await asyncio.gather(*(asyncio.create_task(as_caller(n)) for n in range(8)))
    assert seen
    assert set(seen) == {
        (("authorization", "Bearer t0"),), (("authorization", "Bearer t1"),)}
    if method == "BatchStream":
        assert len(seen) == 2  # one stream per caller identity, kept open for its batches


def _unimplemented(method: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(grpc.StatusCode.UNIMPLEMENTED, grpc.aio.Metadata(),
                                grpc.aio.Metadata(), f"unknown method {method}")


class _FakeStream:
    """A BatchStream call that takes every write and answers `read` with `answer()`."""

    def __init__(self, answer: Any) -> None:
        self.answer = answer
        self.cancelled = False

    async def write(self, request: pb.BatchStreamRequest) -> None:
        pass

    async def read(self) -> Any:
        return await self.answer()

    async def done_writing(self) -> None:
        pass

    def cancel(self) -> bool:
        self.cancelled = True
        return True


async def test_large_calls_go_unary_and_an_older_service_gets_batch_then_unary_calls(
        batching: BatchingClient, monkeypatch: pytest.MonkeyPatch) -> None:
    big = b'{"x":"%s"}' % (b"y" * batching.max_bytes)
    assert (await batching.create("documents", big, resource_id="big")).size_bytes == len(big)
    assert batching.batches == 0

    async def no_stream() -> Any:
        raise _unimplemented("BatchStream")

    monkeypatch.setattr(batching.stub, "BatchStream", lambda **kwargs: _FakeStream(no_stream))
    batch_calls = 0
    original = batching.stub.Batch

    async def counted(request: pb.BatchRequest, **kwargs: Any) -> Any:
        nonlocal batch_calls
        batch_calls += 1
        return await original(request, **kwargs)

    monkeypatch.setattr(batching.stub, "Batch", counted)
    first = await asyncio.gather(*(batching.create("documents", b"{}", resource_id=f"s{i}")
                                   for i in range(3)))
    assert [r.version for r in first] == [1, 1, 1]
    assert batch_calls >= 1  # a service without BatchStream: Batch calls from then on

    async def no_batch(request: pb.BatchRequest, **kwargs: Any) -> Any:
        raise _unimplemented("Batch")

    monkeypatch.setattr(batching.stub, "Batch", no_batch)
    results = await asyncio.gather(*(batching.create("documents", b"{}", resource_id=f"o{i}")
                                     for i in range(3)))
    assert [r.version for r in results] == [1, 1, 1]
    batches = batching.batches
    assert (await batching.get("documents/o1")).name == "documents/o1"  # unary from now on
    assert batching.batches == batches


async def test_each_call_keeps_its_own_deadline_however_long_it_queued(
        batching: BatchingClient, monkeypatch: pytest.MonkeyPatch) -> None:
    ledger = BatchingClient(batching.channel, call_timeout=5.0, max_calls=1, streams=False)
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
    ledger = BatchingClient(batching.channel, call_timeout=0.2,
                            streams=sent_on(batching) == "BatchStream")
    streams: list[_FakeStream] = []

    async def unanswered(request: pb.BatchRequest, **kwargs: Any) -> Any:
        await asyncio.sleep(kwargs["timeout"] + 0.5)  # answers after the call's deadline
        raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(),
                                   grpc.aio.Metadata(), "too late")

    def silent_stream(**kwargs: Any) -> _FakeStream:
        streams.append(_FakeStream(asyncio.Event().wait))  # never answers
        return streams[-1]

    monkeypatch.setattr(ledger.stub, "Batch", unanswered)
    monkeypatch.setattr(ledger.stub, "BatchStream", silent_stream)
    refused = await unary_error(ledger.get("documents/any"))
    assert refused.code == grpc.StatusCode.DEADLINE_EXCEEDED
    if streams:  # the stream that did not answer is dropped: the next batch takes a new one
        await asyncio.sleep(0.05)
        assert streams[0].cancelled
        assert (await unary_error(ledger.get("documents/any"))).code == (
            grpc.StatusCode.DEADLINE_EXCEEDED)
        assert len(streams) == 2
    await ledger.aclose()  # the batch ends too; its late failure finds no one waiting


# --- the batching client's streams ---------------------------------------------------------------


@pytest.fixture
async def quick_idle(server: RunningServer, monkeypatch: pytest.MonkeyPatch
                     ) -> AsyncIterator[BatchingClient]:
    """A batching client whose streams count as idle after 0.2 s, with one stream open (it
    created documents/a)."""
    monkeypatch.setattr(batching_module, "STREAM_IDLE_S", 0.2)
    async with connect(server.target, batching=True) as ledger:
        assert isinstance(ledger, BatchingClient)
        await ledger.create("documents", b"{}", resource_id="a")
        assert len(ledger._streams) == 1
        yield ledger


async def test_a_quiet_stream_is_closed_and_the_next_batch_opens_another(
        quick_idle: BatchingClient, server: RunningServer) -> None:
    # Closed by the client, then ended OK by the service.
    await until(lambda: not quick_idle._streams and calls(server, "BatchStream") == 1)
    assert (await quick_idle.get("documents/a")).version == 1
    assert len(quick_idle._streams) == 1


async def test_an_ended_stream_is_forgotten_even_if_its_caller_never_comes_back(
        quick_idle: BatchingClient) -> None:
    [stream] = quick_idle._streams.values()
    stream.call.cancel()  # as a broken connection would end it
    await until(lambda: stream.ended is not None)
    await until(lambda: not quick_idle._streams)


async def test_a_restart_ends_the_stream_and_calls_go_on_over_a_new_one(
        settings: Settings) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    fixed = settings.replace(grpc_listen=f"127.0.0.1:{port}")
    async with connect(f"127.0.0.1:{port}", batching=True) as ledger:
        assert isinstance(ledger, BatchingClient)
        async with serve(fixed):
            await ledger.create("documents", b"{}", resource_id="a")
            [first] = ledger._streams.values()
        # The service ended the stream as it stopped; while it is down, calls fail as unary
        # calls would.
        assert first.ended is not None
        assert (await unary_error(ledger.get("documents/a"))).code == (
            grpc.StatusCode.UNAVAILABLE)
        async with serve(fixed):
            async with asyncio.timeout(10):  # the channel reconnects after its backoff
                while True:
                    with contextlib.suppress(LedgerCallError):
                        found = await ledger.get("documents/a")
                        break
                    await asyncio.sleep(0.1)
            assert found.version == 1
            assert first not in ledger._streams.values()
