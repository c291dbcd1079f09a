"""The online commands against a real gRPC server: get, history, diff, log, tail (and its
resumption), verify/digest/export over the Watch stream, and their exit codes. The CLI runs
in-process, in a thread of its own (it runs its own event loop, as `casledger` does)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest

from casledger.service.cli import main
from casledger.service.client import LedgerClient, connect, precondition
from casledger.service.config import Settings
from casledger.service.follow import follow
from casledger.service.model import Version
from casledger.service.server import RunningServer, serve
from tests.conftest import NewLedger
from tests.support.blackhole import blackhole

Watching = Callable[[RunningServer, int], Awaitable[None]]


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Run:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)

    def lines(self) -> list[Any]:
        return [json.loads(line) for line in self.out.splitlines()]


Cli = Callable[..., Awaitable[Run]]


@pytest.fixture(autouse=True)
def _no_casledger_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("CASLEDGER_DB", "CASLEDGER_TARGET", "FORCE_COLOR", "COLUMNS", "NO_COLOR"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Cli:
    lock = asyncio.Lock()

    async def run(*args: object) -> Run:
        async with lock, asyncio.timeout(20):
            code = await asyncio.to_thread(main, [str(arg) for arg in args])
            captured = capsys.readouterr()
        return Run(code, captured.out, captured.err)

    return run


async def populate(client: LedgerClient) -> None:
    """Revisions 1..6: documents/a v1-v3, notes/n v1-v2 (text), documents/a tombstone v4."""
    await client.create("documents", b'{"title":"draft","tags":["a","b"]}', resource_id="a",
                        reason="first draft")
    await client.replace("documents/a", b'{"title":"final","tags":["a"]}',
                         precondition=precondition(version=1), reason="edit [bold]it[/]")
    await client.create("notes", b"one\ntwo\n", resource_id="n", content_type="text/plain")
    await client.replace("notes/n", b"one\nthree\n", content_type="text/plain",
                         precondition=precondition(version=1))
    await client.replace("documents/a", b'{"title":"final","tags":["a"],"n":1}',
                         precondition=precondition(version=2))
    await client.delete("documents/a", precondition=precondition(version=3), reason="done")


# --- get, history, diff --------------------------------------------------------------------


async def test_get_prints_the_current_version(cli: Cli, client: LedgerClient,
                                              server: RunningServer) -> None:
    await populate(client)
    run = await cli("get", "notes/n", "--target", server.target)
    assert run.code == 0, run.err
    assert "notes/n" in run.out
    assert '"2-' in run.out  # the etag
    assert run.out.endswith("one\nthree\n\n")
    view = (await cli("get", "notes/n", "--version", "1", "--json", "--target",
                      server.target)).json()
    assert (view["version"], view["content"], view["actor"]) == (1, "one\ntwo\n", "anonymous")
    assert view["etag"] == (await client.get("notes/n", 1)).etag


async def test_get_raw_writes_the_stored_bytes(client: LedgerClient, server: RunningServer,
                                               capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    data = b"\x00\xffbinary\n"
    await client.create("blobs", data, resource_id="b", content_type="application/octet-stream")
    assert await asyncio.to_thread(main, ["get", "blobs/b", "--raw", "--target", server.target]
                                   ) == 0
    assert capsysbinary.readouterr().out == data
    assert await asyncio.to_thread(main, ["get", "blobs/b", "--json", "--target", server.target]
                                   ) == 0
    view = json.loads(capsysbinary.readouterr().out)
    assert "content" not in view
    assert view["content_base64"] == "AP9iaW5hcnkK"


async def test_get_of_a_deleted_resource(cli: Cli, client: LedgerClient,
                                         server: RunningServer) -> None:
    await populate(client)
    gone = await cli("get", "documents/a", "--target", server.target)
    assert gone.code == 3
    assert "deleted at version 4" in gone.err
    tombstone = await cli("get", "documents/a", "--version", "4", "--target", server.target)
    assert tombstone.code == 0
    assert "(a tombstone: no content)" in tombstone.out
    missing = await cli("get", "documents/a", "--version", "9", "--target", server.target)
    assert (missing.code, "has no version 9" in missing.err) == (3, True)


async def test_history_shows_every_version_with_actor_and_reason(
        cli: Cli, client: LedgerClient, server: RunningServer) -> None:
    await populate(client)
    lines = (await cli("history", "documents/a", "--json", "--target", server.target)).lines()
    assert [(h["version"], h["revision"], h["deleted"], h["reason"]) for h in lines] == [
        (1, 1, False, "first draft"), (2, 2, False, "edit [bold]it[/]"), (3, 5, False, ""),
        (4, 6, True, "done")]
    assert {h["actor"] for h in lines} == {"anonymous"}
    assert [h["size"] for h in lines][-1] == 0
    table = await cli("history", "documents/a", "--target", server.target)
    assert "edit [bold]it[/]" in table.out  # shown as written, not as markup
    for column in ("version", "revision", "time", "actor", "reason", "size", "etag", "deleted"):
        assert column in table.out


async def test_diff_of_json_versions_is_structural(cli: Cli, client: LedgerClient,
                                                   server: RunningServer) -> None:
    await populate(client)
    result = (await cli("diff", "documents/a", "1", "3", "--json", "--target",
                        server.target)).json()
    assert (result["format"], result["from"], result["to"]) == ("json", 1, 3)
    assert result["changes"] == [
        {"op": "replace", "path": "/title", "value": "final", "old": "draft"},
        {"op": "remove", "path": "/tags/1", "old": "b"},
        {"op": "add", "path": "/n", "value": 1}]
    plain = await cli("diff", "documents/a", "1", "3", "--target", server.target)
    assert '~ /title: "draft" -> "final"' in plain.out
    assert "\x1b[" not in plain.out


async def test_diff_of_text_is_unified_and_coloured_on_a_terminal(
        cli: Cli, client: LedgerClient, server: RunningServer,
        monkeypatch: pytest.MonkeyPatch) -> None:
    await populate(client)
    plain = await cli("diff", "notes/n", "1", "2", "--target", server.target)
    assert "-two\n+three" in plain.out
    assert "\x1b[" not in plain.out
    monkeypatch.setenv("FORCE_COLOR", "1")
    coloured = await cli("diff", "notes/n", "1", "2", "--target", server.target)
    assert "\x1b[" in coloured.out
    assert "three" in coloured.out


# --- log and the Watch-backed commands -----------------------------------------------------


async def test_log_online_is_the_offline_log_and_stops(cli: Cli, client: LedgerClient,
                                                       server: RunningServer,
                                                       settings: Settings) -> None:
    await populate(client)
    online = await cli("log", "--json", "--target", server.target)
    assert [e["revision"] for e in online.lines()] == [1, 2, 3, 4, 5, 6]
    assert online.out == (await cli("log", "--json", "--db", settings.db)).out
    # The last revision is not under the prefix: the replay must still end.
    notes = await cli("log", "--prefix", "notes", "--since", "2", "--json", "--target",
                      server.target)
    assert [(e["name"], e["version"], e["event"]) for e in notes.lines()] == [
        ("notes/n", 1, "created"), ("notes/n", 2, "updated")]
    text = await cli("log", "--target", server.target)
    assert "documents/a@4" in text.out
    assert "deleted" in text.out


async def test_log_of_an_empty_ledger(cli: Cli, server: RunningServer) -> None:
    run = await cli("log", "--target", server.target)
    assert (run.code, run.out) == (0, "")
    assert "no versions" in run.err


async def test_verify_digest_and_export_online_match_offline(
        cli: Cli, client: LedgerClient, server: RunningServer, settings: Settings) -> None:
    await populate(client)
    online = (await cli("verify", "--json", "--target", server.target)).json()
    offline = (await cli("verify", "--json", "--db", settings.db)).json()
    assert (online["ok"], online["mode"], offline["mode"]) == (True, "online", "offline")
    assert online["digest"] == offline["digest"]
    digest = await cli("digest", "--revision", "3", "--target", server.target)
    assert digest.out == (await cli("digest", "--revision", "3", "--db", settings.db)).out
    assert (await cli("export", "--target", server.target)).out == (
        await cli("export", "--db", settings.db)).out
    beyond = await cli("digest", "--revision", "7", "--target", server.target)
    assert beyond.code == 3


# --- tail ----------------------------------------------------------------------------------


async def test_tail_replays_from_a_revision_then_follows(cli: Cli, client: LedgerClient,
                                                         server: RunningServer) -> None:
    await populate(client)
    tail = asyncio.ensure_future(cli("tail", "--from", "5", "--limit", "4", "--json",
                                     "--target", server.target))
    await client.create("documents", b"{}", resource_id="later")
    await client.create("notes", b"x", resource_id="later", content_type="text/plain")
    run = await tail
    assert run.code == 0, run.err
    assert [(e["revision"], e["name"]) for e in run.lines()] == [
        (5, "documents/a"), (6, "documents/a"), (7, "documents/later"), (8, "notes/later")]


async def test_tail_from_now_shows_only_new_versions(cli: Cli, client: LedgerClient,
                                                     server: RunningServer,
                                                     watching: Watching) -> None:
    await populate(client)
    tail = asyncio.ensure_future(cli("tail", "--prefix", "notes", "--limit", "1", "--json",
                                     "--target", server.target))
    await watching(server, 1)
    await client.create("documents", b"{}", resource_id="skipped")
    await client.create("notes", b"x", resource_id="new", content_type="text/plain")
    assert [e["name"] for e in (await tail).lines()] == ["notes/new"]


async def test_tail_with_a_bad_prefix_is_a_usage_error(cli: Cli, server: RunningServer) -> None:
    run = await cli("tail", "--prefix", "bad prefix", "--target", server.target)
    assert run.code == 2
    assert "prefix" in run.err


async def test_tail_waits_for_an_unavailable_service(cli: Cli, settings: Settings,
                                                     watching: Watching) -> None:
    port = closed_port()
    tail = asyncio.ensure_future(cli("tail", "--limit", "1", "--json", "--max-backoff", "0.2",
                                     "--target", f"127.0.0.1:{port}"))
    await asyncio.sleep(0.5)
    assert not tail.done()
    async with serve(settings.replace(grpc_listen=f"127.0.0.1:{port}")) as running, \
            connect(running.target) as client:
        await watching(running, 1)
        await client.create("documents", b"{}", resource_id="first")
        run = await tail
    assert [e["name"] for e in run.lines()] == ["documents/first"]
    assert "UNAVAILABLE; resuming from now" in run.err


async def test_follow_resumes_after_watcher_too_slow_without_a_gap(
        slow_server: RunningServer) -> None:
    total, body = 300, b'{"pad":"' + b"x" * 16000 + b'"}'
    delivered: list[int] = []
    retries: list[str] = []
    release = threading.Event()

    def on_version(v: Version) -> None:
        release.wait(20)  # a stalled consumer: the service's queue for it overflows
        delivered.append(v.revision)

    def run() -> int:
        return asyncio.run(follow(slow_server.target, on_version, start=1, limit=total,
                                  on_retry=lambda why, delay, rev: retries.append(why),
                                  max_backoff=0.1))

    follower = asyncio.ensure_future(asyncio.to_thread(run))
    async with connect(slow_server.target) as client:
        for i in range(total):
            await client.create("documents", body, resource_id=f"d{i}")
    release.set()
    async with asyncio.timeout(30):
        assert await follower == total
    assert delivered == list(range(1, total + 1))
    assert "WATCHER_TOO_SLOW" in retries


async def _follow_through_a_blackhole(settings: Settings, new_ledger: NewLedger,
                                      keepalive_s: float, wait_s: float
                                      ) -> tuple[list[int], list[str]]:
    """Follows a server through a Blackhole with `keepalive_s`, freezes the connection after
    the first version, writes a second, and waits up to `wait_s` for it (then closes the frozen
    connection, which the follower notices at once). Returns the revisions delivered by then
    and the reasons of the follower's reconnections."""
    delivered: list[int] = []
    retries: list[str] = []
    first = threading.Event()

    def on_version(v: Version) -> None:
        delivered.append(v.revision)
        first.set()

    quick = settings.replace(db=new_ledger("keepalive"), grpc_keepalive_min_s=0.5)
    async with serve(quick) as running, blackhole(running.port) as hole, \
            connect(running.target) as client:

        def run() -> int:
            return asyncio.run(follow(f"127.0.0.1:{hole.port}", on_version, start=1, limit=2,
                                      max_backoff=0.1, keepalive_s=keepalive_s,
                                      on_retry=lambda why, delay, rev: retries.append(why)))

        follower = asyncio.ensure_future(asyncio.to_thread(run))
        await client.create("documents", b"{}", resource_id="before")
        assert await asyncio.to_thread(first.wait, 10)
        hole.freeze()
        await client.create("documents", b"{}", resource_id="after")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(follower), wait_s)
        seen = list(delivered)
        hole.close_all()
        async with asyncio.timeout(10):
            assert await follower == 2
    assert delivered == [1, 2]
    return seen, retries


@pytest.mark.sqlite_only
async def test_follow_notices_a_silently_dead_connection_by_its_keepalive(
        settings: Settings, new_ledger: NewLedger) -> None:
    # A ping after 1 s of silence, unanswered 1 s later: noticed after about 2 s.
    seen, retries = await _follow_through_a_blackhole(settings, new_ledger, keepalive_s=1,
                                                      wait_s=10)
    assert seen == [1, 2]
    assert retries[:1] == ["UNAVAILABLE"]


@pytest.mark.sqlite_only
async def test_without_keepalive_a_silently_dead_connection_goes_unnoticed(
        settings: Settings, new_ledger: NewLedger) -> None:
    """The control: the Blackhole really stalls the follower until its connection closes."""
    seen, _ = await _follow_through_a_blackhole(settings, new_ledger, keepalive_s=0, wait_s=4)
    assert seen == [1]


@pytest.mark.sqlite_only
@pytest.mark.parametrize(("min_s", "cut_off"), [(0.5, False), (5.0, True)])
async def test_the_service_accepts_keepalive_pings_down_to_its_minimum(
        settings: Settings, new_ledger: NewLedger, min_s: float, cut_off: bool) -> None:
    """A quiet Watch pinged every second stays up when --grpc-keepalive-min-s allows it; when
    it does not, gRPC's policy ends the connection (GOAWAY too_many_pings) after two strikes."""
    retries: list[str] = []
    stop = threading.Event()
    server_settings = settings.replace(db=new_ledger("pings"), grpc_keepalive_min_s=min_s)
    async with serve(server_settings) as running:

        def on_retry(why: str, delay: float, revision: int) -> None:
            retries.append(why)
            stop.set()

        def run() -> None:
            async def until_stopped() -> None:
                task = asyncio.ensure_future(follow(running.target, lambda v: None,
                                                    keepalive_s=1, on_retry=on_retry))
                await asyncio.to_thread(stop.wait, 6)
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

            asyncio.run(until_stopped())

        await asyncio.to_thread(run)
    assert retries == (["UNAVAILABLE"] if cut_off else [])


async def test_an_unreachable_service_is_exit_3(cli: Cli) -> None:
    run = await cli("history", "documents/a", "--target", f"127.0.0.1:{closed_port()}")
    assert run.code == 3
    assert "cannot reach the service" in run.err


async def test_casledger_target_names_the_service(cli: Cli, client: LedgerClient,
                                                  server: RunningServer,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    await populate(client)
    monkeypatch.setenv("CASLEDGER_TARGET", server.target)
    assert (await cli("get", "notes/n", "--raw")).out == "one\nthree\n"
