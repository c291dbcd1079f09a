"""Access control against a real gRPC server with a tokens file: UNAUTHENTICATED without a valid
bearer token, PERMISSION_DENIED outside a token's scopes or prefixes (nothing written), the
principal recorded as the actor, health and reflection open, the CLI sending --token."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from casledger.service import auth
from casledger.service.api.casledger.v1 import ledger_pb2 as pb
from casledger.service.cli import main
from casledger.service.client import LedgerCallError, LedgerClient, call_metadata, connect
from casledger.service.config import Settings
from casledger.service.server import RunningServer, serve
from tests.support.batchstream import stream_one


@dataclass(frozen=True)
class Tokens:
    file: Path
    admin: str  # principal "root": admin
    reader: str  # principal "reader": read
    writer: str  # principal "writer": read, write
    docs: str  # principal "docs": read, write under documents and projects/p1


@pytest.fixture
def tokens(tmp_path: Path) -> Tokens:
    file = tmp_path / "tokens.toml"
    return Tokens(
        file=file,
        admin=auth.create_token(file, principal="root", scopes=["admin"]),
        reader=auth.create_token(file, principal="reader", scopes=["read"]),
        writer=auth.create_token(file, principal="writer", scopes=["read", "write"]),
        docs=auth.create_token(file, principal="docs", scopes=["read", "write"],
                               prefixes=["documents", "projects/p1"]),
    )


@pytest.fixture
def auth_settings(settings: Settings, tokens: Tokens) -> Settings:
    return settings.replace(auth_tokens_file=str(tokens.file))


@pytest.fixture
async def auth_server(auth_settings: Settings) -> AsyncIterator[RunningServer]:
    async with serve(auth_settings) as running:
        yield running


@pytest.fixture
async def ledger(auth_server: RunningServer) -> AsyncIterator[LedgerClient]:
    async with connect(auth_server.target, call_timeout=5) as client:
        yield client


@pytest.fixture
def revision(ledger_revision: Callable[[], int]) -> Callable[[], int]:
    """The ledger's latest revision, read from the store itself (auth_server shares its db)."""
    return ledger_revision


@contextlib.contextmanager
def as_token(token: str | None, scheme: str = "Bearer") -> Iterator[None]:
    """Calls made in this block carry `authorization: <scheme> <token>` (None: nothing)."""
    value = () if token is None else (("authorization", f"{scheme} {token}"),)
    reset = call_metadata.set(value)
    try:
        yield
    finally:
        call_metadata.reset(reset)


async def watch_first(client: LedgerClient, prefix: str) -> None:
    stream = await client.open_watch(prefix, 1)
    stream.close()


Call = Callable[[LedgerClient], Awaitable[object]]
PRE = pb.Precondition(version=1)
CALLS: dict[str, Call] = {
    "GetResource": lambda c: c.get("documents/d1"),
    "ListResources": lambda c: c.list("documents"),
    "ListVersions": lambda c: c.versions("documents/d1"),
    "Watch": lambda c: watch_first(c, "documents"),
    "GetRevision": lambda c: c.revision(),
    "Batch": lambda c: c.batch([pb.BatchOperation(get=pb.GetResourceRequest(name="documents/d1"))]),
    "BatchStream": lambda c: stream_one(
        c, [pb.BatchOperation(get=pb.GetResourceRequest(name="documents/d1"))]),
    "CreateResource": lambda c: c.create("documents", b"{}", resource_id="d2"),
    "UpdateResource": lambda c: c.replace("documents/d1", b"{}", precondition=PRE),
    "DeleteResource": lambda c: c.delete("documents/d1", precondition=PRE),
}
WRITES = ("CreateResource", "UpdateResource", "DeleteResource")


@pytest.fixture
async def seeded(ledger: LedgerClient, tokens: Tokens) -> pb.Resource:
    with as_token(tokens.admin):
        return await ledger.create("documents", b'{"n":1}', resource_id="d1")


def test_every_method_is_exercised() -> None:
    assert set(CALLS) == {m.name for m in pb.DESCRIPTOR.services_by_name["Ledger"].methods}


@pytest.mark.parametrize("method", sorted(CALLS))
@pytest.mark.parametrize(("token", "scheme", "message"), [
    (None, "Bearer", "requires a bearer token"),
    ("cl_not-a-token-this-service-knows", "Bearer", "not valid"),
    ("TOKEN", "Basic", "not a bearer token"),
])
async def test_without_a_valid_token_every_method_is_unauthenticated(
        ledger: LedgerClient, seeded: pb.Resource, tokens: Tokens,
        revision: Callable[[], int], method: str, token: str | None, scheme: str,
        message: str) -> None:
    before = revision()
    with as_token(tokens.admin if token == "TOKEN" else token, scheme), \
            pytest.raises(LedgerCallError) as refused:
        await CALLS[method](ledger)
    assert refused.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert refused.value.reason == "UNAUTHENTICATED"
    assert message in refused.value.message
    assert revision() == before


@pytest.mark.parametrize("method", sorted(CALLS))
async def test_a_valid_token_is_admitted(ledger: LedgerClient, seeded: pb.Resource,
                                         tokens: Tokens, method: str) -> None:
    for token in (tokens.admin, tokens.writer, tokens.docs):
        if method == "DeleteResource" and token != tokens.admin:
            continue  # d1 can be deleted once
        if method == "GetRevision" and token == tokens.docs:
            continue  # the whole ledger's revision: beyond a prefix-limited token
        with as_token(token):
            if method == "CreateResource":
                await ledger.create("documents", b"{}", resource_id=f"by-{token[-6:]}")
            elif method == "UpdateResource":
                current = await ledger.get("documents/d1")
                await ledger.replace("documents/d1", b"{}",
                                     precondition=pb.Precondition(version=current.version))
            else:
                await CALLS[method](ledger)


@pytest.mark.parametrize("method", WRITES)
async def test_a_read_only_token_cannot_write(ledger: LedgerClient, seeded: pb.Resource,
                                              tokens: Tokens, revision: Callable[[], int],
                                              method: str) -> None:
    before = revision()
    with as_token(tokens.reader), pytest.raises(LedgerCallError) as refused:
        await CALLS[method](ledger)
    assert refused.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert refused.value.reason == "PERMISSION_DENIED"
    assert refused.value.metadata == {"principal": "reader", "scope": "write"}
    assert revision() == before
    with as_token(tokens.reader):  # reads are fine
        assert (await ledger.get("documents/d1")).version == 1


@pytest.mark.parametrize(("call", "path"), [
    (lambda c: c.get("secrets/s1"), "secrets/s1"),
    (lambda c: c.list("secrets"), "secrets"),
    (lambda c: c.list("projects"), "projects"),
    (lambda c: c.versions("documentsX/1"), "documentsX/1"),
    (lambda c: watch_first(c, "secrets"), "secrets"),
    (lambda c: watch_first(c, ""), ""),
    (lambda c: c.create("secrets", b"{}", resource_id="s2"), "secrets/s2"),
    (lambda c: c.create("secrets", b"{}"), "secrets"),
    (lambda c: c.create("projects", b"{}", resource_id="p2"), "projects/p2"),
    (lambda c: c.replace("secrets/s1", b"{}", precondition=PRE), "secrets/s1"),
    (lambda c: c.delete("secrets/s1", precondition=PRE), "secrets/s1"),
    (lambda c: c.revision(), ""),
], ids=["get", "list", "list-parent-of-prefix", "versions", "watch", "watch-all", "create",
        "create-generated-id", "create-sibling", "update", "delete", "revision"])
async def test_a_prefix_limited_token_is_denied_outside(
        ledger: LedgerClient, tokens: Tokens, revision: Callable[[], int], call: Call,
        path: str) -> None:
    with as_token(tokens.admin):
        await ledger.create("secrets", b'{"s":1}', resource_id="s1")
    before = revision()
    with as_token(tokens.docs), pytest.raises(LedgerCallError) as refused:
        await call(ledger)
    assert refused.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert refused.value.reason == "PERMISSION_DENIED"
    assert refused.value.metadata == ({"principal": "docs", "name": path} if path
                                      else {"principal": "docs"})
    assert revision() == before


async def test_a_prefix_limited_token_works_inside(ledger: LedgerClient, tokens: Tokens,
                                                   auth_server: RunningServer) -> None:
    with as_token(tokens.docs):
        created = await ledger.create("projects/p1/notes", b'{"n":1}')
        await ledger.create("documents", b'{"d":1}', resource_id="d9")
        assert [r.name for r in (await ledger.list("projects/p1/notes")).resources] == [
            created.name]
        stream = await ledger.open_watch("projects/p1", 1)
        try:
            async with asyncio.timeout(10):
                event = await anext(aiter(stream))
        finally:
            stream.close()
        assert event.resource.name == created.name


async def test_the_principal_is_the_actor(ledger: LedgerClient, tokens: Tokens) -> None:
    with as_token(tokens.writer):
        v1 = await ledger.create("documents", b'{"n":1}', resource_id="a1")
    with as_token(tokens.docs):
        v2 = await ledger.update("documents/a1", lambda _: b'{"n":2}')
    with as_token(tokens.admin):
        v3 = await ledger.delete("documents/a1", precondition=pb.Precondition(etag=v2.etag))
        history = [(v.version, v.actor) async for v in ledger.history("documents/a1")]
    assert (v1.actor, v2.actor, v3.actor) == ("writer", "docs", "root")
    assert history == [(1, "writer"), (2, "docs"), (3, "root")]


async def test_without_access_control_the_actor_is_anonymous_and_tokens_are_ignored(
        client: LedgerClient) -> None:
    with as_token("cl_whatever"):
        created = await client.create("documents", b"{}", resource_id="x")
    assert created.actor == "anonymous"
    assert [v.actor async for v in client.history("documents/x")] == ["anonymous"]


async def test_health_and_reflection_stay_open(auth_server: RunningServer) -> None:
    async with grpc.aio.insecure_channel(auth_server.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        reply = await health.Check(health_pb2.HealthCheckRequest(
            service="casledger.v1.Ledger"), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        requests = [reflection_pb2.ServerReflectionRequest(list_services="")]
        replies = [r async for r in stub.ServerReflectionInfo(iter(requests), timeout=5)]
        names = {s.name for s in replies[0].list_services_response.service}
        assert "casledger.v1.Ledger" in names


async def outcome(ledger: LedgerClient, token: str) -> str:
    """"OK", or the reason a read with `token` is refused."""
    with as_token(token):
        try:
            await ledger.list("documents")
        except LedgerCallError as error:
            return error.reason
    return "OK"


async def until(ledger: LedgerClient, token: str, expected: str) -> None:
    """Until a read with `token` has this outcome (the service checks its file about once a
    second); fails on any other refusal, and after 10 s."""
    async with asyncio.timeout(10):
        while (seen := await outcome(ledger, token)) != expected:
            assert seen in ("OK", "UNAUTHENTICATED"), seen
            await asyncio.sleep(0.1)


async def test_a_new_token_works_and_a_revoked_one_stops_without_a_restart(
        ledger: LedgerClient, tokens: Tokens) -> None:
    late = auth.create_token(tokens.file, principal="late", scopes=["read"])
    await until(ledger, late, "OK")
    # Revoke "reader": remove its entry.
    entries = tokens.file.read_text().split("\n[[tokens]]\n")
    tokens.file.write_text("\n[[tokens]]\n".join(
        e for e in entries if 'principal = "reader"' not in e))
    await until(ledger, tokens.reader, "UNAUTHENTICATED")
    assert await outcome(ledger, late) == "OK"
    assert await outcome(ledger, tokens.writer) == "OK"


async def test_a_broken_tokens_file_does_not_start(settings: Settings, tmp_path: Path) -> None:
    broken = tmp_path / "broken.toml"
    broken.write_text("[[tokens]]\nprincipal = 'x'\n")
    with pytest.raises(auth.TokenFileError, match="token 1: scopes must be a list"):
        async with serve(settings.replace(auth_tokens_file=str(broken))):
            pass


# --- the CLI's online commands send --token / CASLEDGER_TOKEN ----------------------------------


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


async def test_cli_sends_the_token(auth_server: RunningServer, tokens: Tokens,
                                   seeded: pb.Resource, capsys: pytest.CaptureFixture[str],
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CASLEDGER_TOKEN", raising=False)
    target = auth_server.target

    def cli(*args: str) -> tuple[int, str, str]:
        return run_cli(capsys, *args)

    code, _, err = await asyncio.to_thread(cli, "get", "documents/d1", "--target", target)
    assert code == 3
    assert "requires a bearer token" in err
    assert "--token" in err
    code, out, _ = await asyncio.to_thread(cli, "get", "documents/d1", "--json", "--target",
                                           target, "--token", tokens.reader)
    assert code == 0
    assert json.loads(out)["actor"] == "root"
    monkeypatch.setenv("CASLEDGER_TOKEN", tokens.docs)
    code, out, _ = await asyncio.to_thread(cli, "history", "documents/d1", "--json",
                                           "--target", target)
    assert code == 0
    assert [json.loads(line)["version"] for line in out.splitlines()] == [1]
    # `log` replays the whole ledger's stream: a prefix-limited token may not.
    code, _, err = await asyncio.to_thread(cli, "log", "--target", target)
    assert code == 3
    assert "may not access the whole ledger" in err
    code, out, _ = await asyncio.to_thread(cli, "log", "--json", "--target", target,
                                           "--token", tokens.reader)
    assert code == 0
    assert [json.loads(line)["name"] for line in out.splitlines()] == ["documents/d1"]
