"""The SQLite backend against real files: schema, pragmas, append-only, locking, plans, purging,
and writes whose callers go away."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import sqlite3
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

import pytest

from casledger.service import errors, model
from casledger.service.config import Settings, SettingsError
from casledger.service.model import Precondition, Version, Write, WriteKind
from casledger.service.storage import Durability, StoreOptions, open_store
from casledger.service.storage import sqlite as sqlite_backend
from casledger.service.storage.sqlite import SCHEMA_VERSION, SQLiteStore

DAY_S = 24 * 3600


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "ledger.db"


def url_of(path: Path) -> str:
    return f"sqlite:///{path}"


@contextmanager
def raw(path: Path) -> Iterator[sqlite3.Connection]:
    """A plain sqlite3 connection to the file, closed on exit."""
    with closing(sqlite3.connect(path, isolation_level=None)) as connection:
        yield connection


def create(name: str, content: bytes = b'{"a":1}', **kw: Any) -> Write:
    return Write(kind=WriteKind.CREATE, name=name, content=content,
                 content_type="application/json", **kw)


def update(name: str, content: bytes = b'{"a":2}', *, pre: Precondition | None,
           **kw: Any) -> Write:
    return Write(kind=WriteKind.UPDATE, name=name, content=content,
                 content_type="application/json", precondition=pre, **kw)


def delete(name: str, *, pre: Precondition | None) -> Write:
    return Write(kind=WriteKind.DELETE, name=name, precondition=pre)


def sqlite_of(store: object) -> SQLiteStore:
    assert isinstance(store, SQLiteStore)
    return store


def check_ledger(path: Path) -> list[Version]:
    """Everything a verifier would check, straight from the file: revisions gap-free, both hash
    chains intact, heads derived exactly from versions. Returns the versions in order."""
    with raw(path) as db:
        rows = db.execute(f"SELECT {sqlite_backend._ALL_COLUMNS} FROM versions "
                          "ORDER BY revision").fetchall()
        heads = db.execute("SELECT name, parent, version, deleted FROM heads").fetchall()
    versions = [sqlite_backend._version(row) for row in rows]
    assert [v.revision for v in versions] == list(range(1, len(versions) + 1))
    latest: dict[str, Version] = {}
    for index, v in enumerate(versions):
        assert model.verify_chain_link(v), v
        assert v.ledger_previous_hash == (versions[index - 1].hash if index else b"")
        before = latest.get(v.name)
        assert v.version == (before.version + 1 if before else 1)
        assert v.previous_hash == (before.hash if before else b"")
        latest[v.name] = v
    assert sorted(heads) == sorted(
        (v.name, model.parent_of(v.name), v.version, int(v.deleted)) for v in latest.values())
    return versions


# --- schema and reopening ----------------------------------------------------------------------


async def test_first_open_creates_the_schema(db_path: Path) -> None:
    async with open_store(url_of(db_path)):
        pass
    with raw(db_path) as db:
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master "
                                               "WHERE type = 'table'")}
        version = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    assert {"meta", "versions", "heads", "requests"} <= tables
    assert version == (str(SCHEMA_VERSION),)


async def test_reopening_keeps_the_data_and_continues_the_revisions(db_path: Path) -> None:
    async with open_store(url_of(db_path)) as store:
        v1 = await store.write(create("documents/1"))
        v2 = await store.write(update("documents/1", pre=Precondition.of_etag(v1.etag)))
    async with open_store(url_of(db_path)) as store:
        assert store.hub.revision == 2
        current = await store.get("documents/1")
        assert (current.version, current.content, current.etag) == (2, b'{"a":2}', v2.etag)
        assert (await store.get("documents/1", 1)).content == b'{"a":1}'
        v3 = await store.write(create("documents/2"))
        assert v3.revision == 3
        assert v3.ledger_previous_hash == v2.hash
        with pytest.raises(errors.VersionMismatch):
            await store.write(update("documents/1", pre=Precondition.of_etag(v1.etag)))
    with raw(db_path) as db:
        assert db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == (
            str(SCHEMA_VERSION),)
    assert len(check_ledger(db_path)) == 3


async def test_a_newer_schema_refuses_to_open(db_path: Path) -> None:
    async with open_store(url_of(db_path)) as store:
        await store.write(create("documents/1"))
    with raw(db_path) as db:
        db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'",
                   (str(SCHEMA_VERSION + 1),))
    with pytest.raises(RuntimeError, match=rf"schema version is {SCHEMA_VERSION + 1}.*upgrade"):
        async with open_store(url_of(db_path)):
            pytest.fail("opened a ledger newer than this build")
    # Refusing changed nothing and released the file.
    with raw(db_path) as db:
        assert db.execute("SELECT count(*) FROM versions").fetchone() == (1,)
        db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'",
                   (str(SCHEMA_VERSION),))
    async with open_store(url_of(db_path)) as store:
        assert (await store.get("documents/1")).version == 1


# --- pragmas -----------------------------------------------------------------------------------


async def pragma(connection: Any, name: str) -> Any:
    if isinstance(connection, sqlite3.Connection):  # the writer's (its thread is idle now)
        return connection.execute(f"PRAGMA {name}").fetchone()[0]
    async with connection.execute(f"PRAGMA {name}") as cursor:
        row = await cursor.fetchone()
    return row[0]


async def test_wal_and_full_synchronous_by_default(db_path: Path) -> None:
    async with open_store(url_of(db_path)) as opened:
        store = sqlite_of(opened)
        assert await pragma(store._db, "journal_mode") == "wal"
        assert await pragma(store._reader, "journal_mode") == "wal"
        # synchronous is per connection: the writer's is the one that makes a commit durable.
        assert await pragma(store._db, "synchronous") == 2  # FULL
        assert await pragma(store._reader, "synchronous") == 2
    with raw(db_path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)  # persisted in the file


async def test_normal_durability_sets_synchronous_normal(db_path: Path) -> None:
    options = StoreOptions(durability=Durability.NORMAL)
    async with open_store(url_of(db_path), options) as opened:
        store = sqlite_of(opened)
        assert await pragma(store._db, "synchronous") == 1  # NORMAL
        assert await pragma(store._db, "journal_mode") == "wal"


# --- append-only, one owner --------------------------------------------------------------------


@pytest.mark.parametrize("statement", [
    "UPDATE versions SET reason = 'rewritten' WHERE revision = 1",
    "UPDATE versions SET content = x'00'",
    "DELETE FROM versions WHERE revision = 2",
    "DELETE FROM versions",
])
async def test_versions_are_append_only(db_path: Path, statement: str) -> None:
    async with open_store(url_of(db_path)) as store:
        v1 = await store.write(create("documents/1"))
        await store.write(update("documents/1", pre=Precondition.of_version(v1.version)))
    with raw(db_path) as db, pytest.raises(sqlite3.DatabaseError,
                                           match="casledger versions are append-only"):
        db.execute(statement)
    versions = check_ledger(db_path)
    assert [(v.version, v.reason) for v in versions] == [(1, ""), (2, "")]


async def test_a_second_open_of_the_same_file_is_refused(db_path: Path) -> None:
    async with open_store(url_of(db_path)) as store:
        await store.write(create("documents/1"))
        with pytest.raises(RuntimeError, match="another casledger process is serving"):
            async with open_store(url_of(db_path)):
                pytest.fail("two stores own one file")
        # The refused opener did not disturb the owner.
        assert (await store.write(create("documents/2"))).revision == 2
    async with open_store(url_of(db_path)) as store:  # free again once closed
        assert store.hub.revision == 2


def test_urls() -> None:
    assert sqlite_backend.sqlite_path("sqlite:///relative.db") == "relative.db"
    assert sqlite_backend.sqlite_path("sqlite:////abs/x.db") == "/abs/x.db"
    for bad in ("sqlite:///", "sqlite://x.db", "sqlite:///:memory:"):
        with pytest.raises(ValueError, match=r"(?i)sqlite"):
            sqlite_backend.sqlite_path(bad)


# --- query plans -------------------------------------------------------------------------------


class Recorder:
    """Records every statement a store connection runs, with its parameters."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, *connections: Any) -> None:
        self.statements: list[tuple[str, tuple[Any, ...]]] = []
        for connection in connections:
            if isinstance(connection, sqlite3.Connection):
                # The writer's: statements as run, parameters bound into the text.
                connection.set_trace_callback(lambda sql: self.statements.append((sql, ())))
                continue
            for method in ("execute", "execute_fetchall"):
                original = getattr(connection, method)

                def execute(sql: str, parameters: Any = None, _original: Any = original) -> Any:
                    self.statements.append((sql, tuple(parameters or ())))
                    return _original(sql, parameters)

                monkeypatch.setattr(connection, method, execute)

    def selects(self) -> list[tuple[str, tuple[Any, ...]]]:
        taken = [(sql, params) for sql, params in self.statements
                 if sql.lstrip().upper().startswith("SELECT")]
        self.statements.clear()
        return taken


async def test_reads_search_indexes_never_scan(db_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    async with open_store(url_of(db_path)) as opened:
        store = sqlite_of(opened)
        for i in range(5):
            await store.write(create(f"documents/{i}"))
        rec = Recorder(monkeypatch, store._reader, store._db)
        queries: dict[str, list[tuple[str, tuple[Any, ...]]]] = {}
        await store.get("documents/1")
        queries["current version"] = rec.selects()
        await store.get("documents/1", 1)
        queries["a past version"] = rec.selects()
        await store.list_resources("documents", 3, "documents/1")
        queries["list resources"] = rec.selects()
        await store.list_versions("documents/1", 10, None, False)
        queries["list versions"] = rec.selects()
        await store.read_revisions(1, 5, "", 10)
        queries["watch replay"] = rec.selects()
        await store.read_revisions(1, 5, "documents", 10)
        queries["watch replay under a prefix"] = rec.selects()
        await store.write(update("documents/1", pre=Precondition.of_version(1), request_id="r1",
                                 request_scope="documents/1", fingerprint=b"f"))
        # The head read and the request-id lookup inside a write (the tail is kept in memory).
        queries["write"] = [(sql, params) for sql, params in rec.selects()
                            if "WHERE" in sql]
    assert all(queries.values()), queries
    with raw(db_path) as db:
        for what, statements in queries.items():
            for sql, params in statements:
                plan = [row[3] for row in db.execute("EXPLAIN QUERY PLAN " + sql, params)]
                assert plan, sql
                for step in plan:
                    assert step.startswith("SEARCH"), f"{what}: {step!r} in {sql}"
                    assert "TEMP B-TREE" not in step, f"{what}: {step!r} in {sql}"
                    assert any(kind in step for kind in (
                        "USING INDEX", "USING COVERING INDEX", "USING PRIMARY KEY",
                        "USING INTEGER PRIMARY KEY")), f"{what}: {step!r} in {sql}"


# --- request ids -------------------------------------------------------------------------------


class Clock:
    """Stands in for the `time` module inside the SQLite backend."""

    def __init__(self, now_s: int) -> None:
        self.now_ns = now_s * 10**9

    def time_ns(self) -> int:
        return self.now_ns

    def advance(self, seconds: float) -> None:
        self.now_ns += int(seconds * 10**9)


def with_request_id(write: Write, request_id: str, fingerprint: bytes) -> Write:
    return dataclasses.replace(write, request_id=request_id, request_scope=write.name,
                               fingerprint=fingerprint)


def request_ids(path: Path) -> set[str]:
    with raw(path) as db:
        return {row[0] for row in db.execute("SELECT request_id FROM requests")}


async def test_request_ids_replay_then_purge_after_the_ttl_never_before_24h(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = Clock(1_700_000_000)
    monkeypatch.setattr(sqlite_backend, "time", clock)
    monkeypatch.setattr(sqlite_backend, "PURGE_EVERY", 1)  # purge after every fresh write
    first = with_request_id(create("documents/1"), "r1", b"fingerprint-1")
    async with open_store(url_of(db_path)) as store:
        v1 = await store.write(first)
        clock.advance(DAY_S - 1)
        await store.write(create("documents/2"))  # purges whatever is older than the TTL
        assert "r1" in request_ids(db_path)
        again = await store.write(first)  # a retry a day later: the first outcome, not a 409
        assert (again.revision, again.etag) == (v1.revision, v1.etag)
        with pytest.raises(errors.IdempotencyKeyReused):
            await store.write(with_request_id(create("documents/1"), "r1", b"another"))
        clock.advance(2)
        await store.write(create("documents/3"))
        assert "r1" not in request_ids(db_path)
        with pytest.raises(errors.ResourceAlreadyExists):
            await store.write(first)  # no record any more: checked as a new request
    assert len(check_ledger(db_path)) == 3


async def test_purge_keeps_records_younger_than_the_ttl(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = Clock(1_700_000_000)
    monkeypatch.setattr(sqlite_backend, "time", clock)
    async with open_store(url_of(db_path), StoreOptions(request_id_ttl_s=2 * DAY_S)) as opened:
        store = sqlite_of(opened)
        await store.write(with_request_id(create("documents/old"), "old", b"1"))
        clock.advance(DAY_S + 1)
        await store.write(with_request_id(create("documents/new"), "new", b"2"))
        clock.advance(DAY_S)  # "old" is 2 days + 1 s old, "new" exactly 1 day
        await asyncio.get_running_loop().run_in_executor(store._thread, store._purge_requests)
        assert request_ids(db_path) == {"new"}


def test_settings_refuse_a_request_id_ttl_under_24_hours() -> None:
    assert Settings(request_id_ttl_s=DAY_S).store_options.request_id_ttl_s == DAY_S
    with pytest.raises(SettingsError, match="86400"):
        Settings(request_id_ttl_s=DAY_S - 1)


# --- concurrency and cancellation --------------------------------------------------------------


async def test_concurrent_writers_on_one_version_exactly_one_wins(db_path: Path) -> None:
    async with open_store(url_of(db_path)) as store:
        v1 = await store.write(create("documents/1"))
        results = await asyncio.gather(*(
            store.write(update("documents/1", b'{"writer":%d}' % i,
                               pre=Precondition.of_etag(v1.etag)))
            for i in range(20)), return_exceptions=True)
    wins = [r for r in results if isinstance(r, Version)]
    losses = [r for r in results if not isinstance(r, Version)]
    assert len(wins) == 1
    assert all(isinstance(r, errors.VersionMismatch) for r in losses), losses
    assert all(r.current == wins[0].current
               for r in losses if isinstance(r, errors.VersionMismatch))
    assert [v.version for v in check_ledger(db_path)] == [1, 2]


@pytest.mark.parametrize("turns", [0, 1, 2, 3, 5, 8, 13, 21, 50])
async def test_a_write_whose_caller_is_cancelled_commits_fully_or_not_at_all(
    db_path: Path, turns: int
) -> None:
    async with open_store(url_of(db_path)) as opened:
        store = sqlite_of(opened)
        v1 = await store.write(create("documents/1"))
        task = asyncio.ensure_future(store.write(
            update("documents/1", b'{"cancelled":true}', pre=Precondition.of_version(1))))
        for _ in range(turns):
            await asyncio.sleep(0)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        # The next write waits for the abandoned one, then goes through.
        after = await store.write(update("documents/1", b'{"next":true}',
                                         pre=Precondition.of_exists(True)))
        assert not store._db.in_transaction
        assert store.hub.revision == after.revision
        current = await store.get("documents/1")
        assert current.etag == after.etag
    versions = check_ledger(db_path)
    contents = [v.content for v in versions]
    assert contents[0] == v1.content
    assert contents[-1] == b'{"next":true}'
    assert contents[1:-1] in ([], [b'{"cancelled":true}'])


@pytest.mark.parametrize("turns", [1, 2, 3, 5, 8])
async def test_closing_the_store_waits_for_an_abandoned_write(db_path: Path, turns: int) -> None:
    failures: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, context: failures.append(context))
    try:
        async with open_store(url_of(db_path)) as store:
            await store.write(create("documents/1"))
            task = asyncio.ensure_future(store.write(create("documents/2")))
            for _ in range(turns):
                await asyncio.sleep(0)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        # Leaving the block did not pull the connections out from under the write.
        versions = check_ledger(db_path)
        assert [v.name for v in versions] == ["documents/1", "documents/2"]
        for _ in range(3):
            await asyncio.sleep(0)
    finally:
        loop.set_exception_handler(None)
    assert failures == []


# --- group commit ------------------------------------------------------------------------------


def merge_patch(name: str, document: bytes, *, pre: Precondition | None) -> Write:
    return Write(kind=WriteKind.UPDATE, name=name, precondition=pre,
                 patch=model.PatchSpec("application/merge-patch+json", document))


def count_commits(store: SQLiteStore) -> list[int]:
    """A list whose length grows by one at every COMMIT on the writer connection."""
    commits: list[int] = []
    store._db.set_trace_callback(lambda sql: commits.append(1) if sql == "COMMIT" else None)
    return commits


async def test_concurrent_writes_share_transactions_and_each_is_checked_alone(
    db_path: Path
) -> None:
    async with open_store(url_of(db_path)) as opened:
        store = sqlite_of(opened)
        firsts = await asyncio.gather(*(store.write(create(f"documents/{i}")) for i in range(40)))
        commits = count_commits(store)
        writes = [update(f"documents/{v.name.rsplit('/', 1)[1]}", b'{"n":%d}' % i,
                         pre=Precondition.of_etag(v.etag)) for i, v in enumerate(firsts)]
        # Every third write names a stale ETag: it fails alone, its batch goes on.
        writes = [dataclasses.replace(w, precondition=Precondition.of_etag('"9-00"'))
                  if i % 3 == 0 else w for i, w in enumerate(writes)]
        results = await asyncio.gather(*(store.write(w) for w in writes), return_exceptions=True)
        store._db.set_trace_callback(None)
    assert len(commits) < 40 / 2  # batched: far fewer transactions than writes
    for i, result in enumerate(results):
        if i % 3 == 0:
            assert isinstance(result, errors.VersionMismatch), result
        else:
            assert isinstance(result, Version), result
            assert result.version == 2
    versions = check_ledger(db_path)
    assert len(versions) == 40 + len([r for r in results if isinstance(r, Version)])


async def test_writes_in_one_batch_see_the_writes_before_them(db_path: Path) -> None:
    async with open_store(url_of(db_path)) as opened:
        store = sqlite_of(opened)
        v1 = await store.write(create("documents/1", b'{"a":1}'))
        request = with_request_id(merge_patch("documents/1", b'{"b":2}',
                                              pre=Precondition.of_exists(True)), "r1", b"fp")
        commits = count_commits(store)
        # Queued together: one transaction plans each against the one before it.
        results = await asyncio.gather(
            store.write(update("documents/1", b'{"a":10}', pre=Precondition.of_etag(v1.etag))),
            store.write(request),
            store.write(request),  # the same request id again: the first outcome, replayed
            store.write(merge_patch("documents/1", b'{"c":3}', pre=Precondition.of_version(3))),
            store.write(update("documents/1", b'{"lost":1}', pre=Precondition.of_etag(v1.etag))),
        return_exceptions=True)
        store._db.set_trace_callback(None)
        assert len(commits) == 1
    replaced, patched, replayed, patched_again, stale = results
    assert isinstance(replaced, Version)
    assert replaced.version == 2
    assert isinstance(patched, Version)
    assert patched.content == b'{"a":10,"b":2}'
    assert replayed == patched
    assert isinstance(patched_again, Version)
    assert patched_again.version == 4
    assert patched_again.content == b'{"a":10,"b":2,"c":3}'
    assert isinstance(stale, errors.VersionMismatch)
    assert stale.current.version == 4
    assert [v.version for v in check_ledger(db_path)] == [1, 2, 3, 4]


async def test_a_failed_batch_writes_nothing_and_the_next_one_continues_the_chain(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with open_store(url_of(db_path)) as opened:
        store = sqlite_of(opened)
        await store.write(create("documents/0"))
        append = store._append

        def failing(v: Version, write: Write) -> None:
            if v.name == "documents/bad":
                raise sqlite3.OperationalError("disk I/O error")
            append(v, write)

        monkeypatch.setattr(store, "_append", failing)
        results = await asyncio.gather(
            *(store.write(create(f"documents/{n}")) for n in ("a", "bad", "b")),
            return_exceptions=True)
        assert all(isinstance(r, errors.StorageUnavailable) for r in results), results
        assert store.hub.revision == 1
        monkeypatch.setattr(store, "_append", append)
        after = await store.write(create("documents/a"))
        assert after.revision == 2
    assert [v.name for v in check_ledger(db_path)] == ["documents/0", "documents/a"]


async def test_the_writer_keeps_a_bounded_cache_of_heads_without_content(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_backend, "HEAD_CACHE_ENTRIES", 2)
    async with open_store(url_of(db_path)) as opened:
        store = sqlite_of(opened)
        firsts = [await store.write(create(f"documents/{i}", b'{"big":"%s"}' % (b"x" * 1000)))
                  for i in range(5)]
        assert list(store._heads) == ["documents/3", "documents/4"]
        assert all(head.latest.content == b"" for head in store._heads.values())
        # An evicted head is read again from the file; a patch reads the content it needs.
        again = await store.write(update("documents/0", pre=Precondition.of_etag(firsts[0].etag)))
        patched = await store.write(merge_patch("documents/4", b'{"more":1}',
                                                pre=Precondition.of_version(1)))
        assert again.version == 2
        assert patched.content == b'{"big":"%s","more":1}' % (b"x" * 1000)
        assert len(store._heads) == 2
    check_ledger(db_path)
