"""The embedded backend: one SQLite file in WAL mode, over aiosqlite.

Two connections: a writer that runs each write as ``BEGIN IMMEDIATE`` -> read head and tail ->
plan -> append -> ``COMMIT`` under an asyncio lock, so no other writer can get in between the check
and the append; and a reader for everything else (WAL lets it read while the writer writes).
A write runs in its own task, shielded from the caller's cancellation, so a client that goes away
never leaves a transaction half done. With ``Durability.FULL`` (the default) ``synchronous=FULL``
makes every commit fsync the WAL before the reply.

Only one server process may own a file at a time (an advisory lock on ``<file>.lock``): the
watch hub learns of commits in-process, so a second writer would leave watchers blind.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiosqlite

from .. import errors
from ..model import EMPTY_TAIL, Head, Tail, Version, Write, parent_of, plan_write
from ..watch import WatchHub
from . import Durability, ShieldedWrites, StoreOptions

SCHEMA_VERSION = 1
PURGE_EVERY = 1000

# Content is the last column: SQLite then never walks a big value's overflow pages to reach
# another column, so metadata reads stay cheap however large the content.
_SCHEMA_V1 = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE versions (
    revision INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    content_type TEXT NOT NULL,
    create_time_us INTEGER NOT NULL,
    update_time_us INTEGER NOT NULL,
    actor TEXT NOT NULL,
    reason TEXT NOT NULL,
    deleted INTEGER NOT NULL,
    previous_hash BLOB NOT NULL,
    ledger_previous_hash BLOB NOT NULL,
    hash BLOB NOT NULL,
    size INTEGER NOT NULL,
    content BLOB NOT NULL,
    UNIQUE (name, version)
);
CREATE TRIGGER versions_no_update BEFORE UPDATE ON versions
    BEGIN SELECT RAISE(ABORT, 'casledger versions are append-only'); END;
CREATE TRIGGER versions_no_delete BEFORE DELETE ON versions
    BEGIN SELECT RAISE(ABORT, 'casledger versions are append-only'); END;
-- Derived from versions, kept in the same transaction: the current version of each resource.
CREATE TABLE heads (
    name TEXT PRIMARY KEY,
    parent TEXT NOT NULL,
    version INTEGER NOT NULL,
    deleted INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX heads_live_by_parent ON heads (parent, name) WHERE deleted = 0;
CREATE TABLE requests (
    scope TEXT NOT NULL,
    request_id TEXT NOT NULL,
    fingerprint BLOB NOT NULL,
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    created_us INTEGER NOT NULL,
    PRIMARY KEY (scope, request_id)
) WITHOUT ROWID;
CREATE INDEX requests_by_age ON requests (created_us);
"""

_META_COLUMNS = (
    "name, version, revision, content_type, create_time_us, update_time_us, actor, reason, "
    "deleted, previous_hash, ledger_previous_hash, hash, size"
)
_ALL_COLUMNS = _META_COLUMNS + ", content"


def sqlite_path(url: str) -> str:
    """`sqlite:///relative.db` -> `relative.db`; `sqlite:////abs/x.db` -> `/abs/x.db`."""
    if not url.startswith("sqlite:///") or url == "sqlite:///":
        raise ValueError(f"SQLite URLs look like sqlite:///path/to/file.db, not {url!r}")
    path = url[len("sqlite:///"):]
    if path.startswith(":memory:"):
        raise ValueError("an in-memory SQLite ledger would vanish at exit; give a file path")
    return path


def _version(row: sqlite3.Row | tuple[Any, ...], content: bool = True) -> Version:
    return Version(
        name=row[0], version=row[1], revision=row[2], content_type=row[3],
        create_time_us=row[4], update_time_us=row[5], actor=row[6], reason=row[7],
        deleted=bool(row[8]), previous_hash=row[9], ledger_previous_hash=row[10], hash=row[11],
        size=row[12], content=row[13] if content else b"",
    )


def _storage_error(exc: sqlite3.Error) -> errors.StorageUnavailable:
    return errors.StorageUnavailable(f"the SQLite store failed: {exc}; nothing was written")


class SQLiteStore:
    """A ledger in one SQLite file. Open it with :func:`open_sqlite`."""

    def __init__(
        self, writer: aiosqlite.Connection, reader: aiosqlite.Connection, hub: WatchHub,
        options: StoreOptions,
    ) -> None:
        self._writer = writer
        self._reader = reader
        self.hub = hub
        self._options = options
        self._lock = asyncio.Lock()
        self._writes = 0
        self._shielded = ShieldedWrites()

    # --- writes --------------------------------------------------------------------------------

    async def write(self, write: Write) -> Version:
        return await self._shielded.run(self._locked_write(write))

    async def drain(self) -> None:
        """Wait for every write already started, those whose callers went away included."""
        await self._shielded.drain()

    async def _locked_write(self, write: Write) -> Version:
        async with self._lock:
            try:
                version, fresh = await self._transaction(write)
            except sqlite3.Error as exc:
                raise _storage_error(exc) from exc
            if fresh:
                self.hub.publish([version])
                self._writes += 1
                if self._writes % PURGE_EVERY == 0:
                    await self._purge_requests()
            return version

    async def _transaction(self, write: Write) -> tuple[Version, bool]:
        db = self._writer
        await db.execute("BEGIN IMMEDIATE")
        try:
            if write.request_id:
                replayed = await self._replay(write)
                if replayed is not None:
                    await db.execute("ROLLBACK")
                    return replayed, False
            head = await self._head(write.name, with_content=write.needs_content)
            tail = await self._tail()
            version = plan_write(
                write, head, tail, time.time_ns() // 1000, limit=self._options.max_content_bytes
            )
            await self._append(version, write)
            await db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                await db.execute("ROLLBACK")
            raise
        return version, True

    async def _replay(self, write: Write) -> Version | None:
        async with self._writer.execute(
            "SELECT fingerprint, name, version FROM requests WHERE scope = ? AND request_id = ?",
            (write.request_scope, write.request_id),
        ) as cursor:
            row = await cursor.fetchone()
        if row is None:
            return None
        if row[0] != write.fingerprint:
            raise errors.IdempotencyKeyReused(write.request_scope, write.request_id)
        async with self._writer.execute(
            f"SELECT {_ALL_COLUMNS} FROM versions WHERE name = ? AND version = ?", (row[1], row[2])
        ) as cursor:
            found = await cursor.fetchone()
        assert found is not None, "a request record points at a version that must exist"
        return _version(found)

    async def _head(self, name: str, *, with_content: bool) -> Head | None:
        columns = _ALL_COLUMNS if with_content else _META_COLUMNS + ", x''"
        async with self._writer.execute(
            f"SELECT {columns} FROM versions WHERE name = ? ORDER BY version DESC LIMIT 2", (name,)
        ) as cursor:
            rows = list(await cursor.fetchall())
        if not rows:
            return None
        return Head(latest=_version(rows[0]), previous_update_time_us=rows[1][5] if len(rows) > 1
                    else None)

    async def _tail(self) -> Tail:
        async with self._writer.execute(
            "SELECT revision, hash, update_time_us FROM versions ORDER BY revision DESC LIMIT 1"
        ) as cursor:
            row = await cursor.fetchone()
        return EMPTY_TAIL if row is None else Tail(row[0], row[1], row[2])

    async def _append(self, v: Version, write: Write) -> None:
        db = self._writer
        await db.execute(
            f"INSERT INTO versions ({_ALL_COLUMNS}) VALUES "
            "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (v.name, v.version, v.revision, v.content_type, v.create_time_us, v.update_time_us,
             v.actor, v.reason, int(v.deleted), v.previous_hash, v.ledger_previous_hash, v.hash,
             v.size, v.content),
        )
        await db.execute(
            "INSERT INTO heads (name, parent, version, deleted) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (name) DO UPDATE SET version = excluded.version, "
            "deleted = excluded.deleted",
            (v.name, parent_of(v.name), v.version, int(v.deleted)),
        )
        if write.request_id:
            await db.execute(
                "INSERT INTO requests (scope, request_id, fingerprint, name, version, created_us) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (write.request_scope, write.request_id, write.fingerprint, v.name, v.version,
                 v.update_time_us),
            )

    async def _purge_requests(self) -> None:
        cutoff = time.time_ns() // 1000 - self._options.request_id_ttl_s * 1_000_000
        # A failure is retried after the next PURGE_EVERY writes; records only live longer.
        with contextlib.suppress(sqlite3.Error):
            await self._writer.execute("DELETE FROM requests WHERE created_us < ?", (cutoff,))

    # --- reads ---------------------------------------------------------------------------------

    async def _fetch(self, sql: str, params: Iterable[Any], content: bool = True) -> list[Version]:
        try:
            async with self._reader.execute(sql, tuple(params)) as cursor:
                rows = await cursor.fetchall()
        except sqlite3.Error as exc:
            raise _storage_error(exc) from exc
        return [_version(row, content) for row in rows]

    async def current_revision(self) -> int:
        # One process owns the file and publishes every commit before acknowledging it.
        return self.hub.revision

    async def get(self, name: str, version: int = 0) -> Version:
        if version:
            found = await self._fetch(
                f"SELECT {_ALL_COLUMNS} FROM versions WHERE name = ? AND version = ?",
                (name, version),
            )
            if not found:
                raise errors.ResourceNotFound(name=name, version=version)
            return found[0]
        found = await self._fetch(
            f"SELECT {_ALL_COLUMNS} FROM versions WHERE name = ? ORDER BY version DESC LIMIT 1",
            (name,),
        )
        if not found:
            raise errors.ResourceNotFound(name=name)
        if found[0].deleted:
            raise errors.ResourceNotFound(name=name, deleted_at_version=found[0].version)
        return found[0]

    async def list_resources(self, parent: str, limit: int, after: str | None) -> list[Version]:
        columns = ", ".join(f"v.{c.strip()}" for c in _ALL_COLUMNS.split(","))
        return await self._fetch(
            f"SELECT {columns} FROM heads h JOIN versions v "
            "ON v.name = h.name AND v.version = h.version "
            "WHERE h.parent = ? AND h.deleted = 0 AND h.name > ? ORDER BY h.name LIMIT ?",
            (parent, after or "", limit),
        )

    async def list_versions(
        self, name: str, limit: int, after: int | None, include_content: bool
    ) -> list[Version]:
        columns = _ALL_COLUMNS if include_content else _META_COLUMNS + ", x''"
        found = await self._fetch(
            f"SELECT {columns} FROM versions WHERE name = ? AND version > ? "
            "ORDER BY version LIMIT ?",
            (name, after or 0, limit),
        )
        if not found and after is None:
            raise errors.ResourceNotFound(name=name)
        return found

    async def read_revisions(self, after: int, upto: int, prefix: str, limit: int) -> list[Version]:
        if not prefix:
            return await self._fetch(
                f"SELECT {_ALL_COLUMNS} FROM versions WHERE revision > ? AND revision <= ? "
                "ORDER BY revision LIMIT ?",
                (after, upto, limit),
            )
        # `prefix/` .. `prefix0` is exactly the names below prefix ('0' follows '/').
        return await self._fetch(
            f"SELECT {_ALL_COLUMNS} FROM versions WHERE revision > ? AND revision <= ? "
            "AND (name = ? OR (name > ? AND name < ?)) ORDER BY revision LIMIT ?",
            (after, upto, prefix, prefix + "/", prefix + "0", limit),
        )

    async def sizes(self) -> dict[str, int]:
        """Counts for operators: resources, live resources, versions, tombstones, bytes."""
        async with self._reader.execute(
            "SELECT (SELECT count(*) FROM heads), (SELECT count(*) FROM heads WHERE deleted = 0), "
            "count(*), coalesce(sum(deleted), 0), coalesce(sum(size), 0) FROM versions"
        ) as cursor:
            row = await cursor.fetchone()
        assert row is not None
        keys = ("resources", "live_resources", "versions", "tombstones", "bytes")
        return dict(zip(keys, row, strict=True))


async def _configure(db: aiosqlite.Connection, durability: Durability) -> None:
    await db.execute("PRAGMA busy_timeout = 5000")
    await db.execute("PRAGMA journal_mode = WAL")
    # In WAL mode only FULL syncs the WAL at every commit; NORMAL syncs at checkpoints.
    await db.execute(f"PRAGMA synchronous = {durability.value.upper()}")


async def _migrate(db: aiosqlite.Connection) -> None:
    await db.execute("BEGIN IMMEDIATE")
    try:
        async with db.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name = 'meta'"
        ) as cursor:
            exists = await cursor.fetchone() is not None
        current = 0
        if exists:
            async with db.execute("SELECT value FROM meta WHERE key = 'schema_version'") as cursor:
                row = await cursor.fetchone()
            current = int(row[0]) if row else 0
        if current > SCHEMA_VERSION:
            raise RuntimeError(
                f"the ledger's schema version is {current}; this casledger knows up to "
                f"{SCHEMA_VERSION}: upgrade casledger"
            )
        if current == 0:
            for statement in _split_script(_SCHEMA_V1):
                await db.execute(statement)
            await db.execute(
                "INSERT INTO meta (key, value) VALUES ('schema_version', ?), ('created_us', ?)",
                (str(SCHEMA_VERSION), str(time.time_ns() // 1000)),
            )
        await db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            await db.execute("ROLLBACK")
        raise


def _split_script(script: str) -> list[str]:
    """Split a schema script into statements (triggers keep their inner `;`)."""
    statements: list[str] = []
    buffer = ""
    for line in script.splitlines(keepends=True):
        if line.lstrip().startswith("--"):
            continue
        buffer += line
        if sqlite3.complete_statement(buffer):
            statements.append(buffer.strip())
            buffer = ""
    return statements


@asynccontextmanager
async def _lock_file(path: str) -> AsyncIterator[None]:
    lock_path = f"{path}.lock"
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(
                f"another casledger process is serving {path}; one SQLite file has one server "
                "(use PostgreSQL for many replicas)"
            ) from None
        yield
    finally:
        os.close(fd)


@asynccontextmanager
async def open_sqlite(path: str, options: StoreOptions) -> AsyncIterator[SQLiteStore]:
    """Open (creating and migrating if needed) the ledger in `path`."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    async with _lock_file(path):
        writer = await aiosqlite.connect(path, isolation_level=None)
        try:
            await _configure(writer, options.durability)
            await _migrate(writer)
            reader = await aiosqlite.connect(path, isolation_level=None)
            try:
                await _configure(reader, options.durability)
                await reader.execute("PRAGMA query_only = 1")
                async with reader.execute("SELECT coalesce(max(revision), 0) FROM versions") as c:
                    row = await c.fetchone()
                hub = WatchHub(row[0] if row else 0, max_queued=options.watch_queue)
                store = SQLiteStore(writer, reader, hub, options)
                try:
                    yield store
                finally:
                    # Closing the connections under an abandoned write would fail it half-way.
                    await store.drain()
            finally:
                await reader.close()
        finally:
            await writer.close()
