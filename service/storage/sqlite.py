"""The embedded backend: one SQLite file in WAL mode.

Writes are group-committed by one writer task that owns the writer connection, a plain
``sqlite3`` connection used only on its own thread: it takes every write queued while the last
transaction committed and runs them as one ``BEGIN IMMEDIATE`` -> for each write, read its head,
plan it against the heads and tail the writes before it made, append -> ``COMMIT`` (one fsync for
the batch with ``Durability.FULL``, the default: ``synchronous=FULL``), then publishes the batch
to watchers and answers each write. A write that breaks a ledger rule fails alone; a storage error
fails the whole batch and writes nothing. The whole batch is one call to the writer thread, where
aiosqlite would cross threads at every statement. Writes are shielded from their callers'
cancellation, so a client that goes away never leaves a transaction half done.

Reads use a second connection over aiosqlite (WAL lets it read while the writer writes).

Only one server process may own a file at a time (an advisory lock on ``<file>.lock``): the
watch hub learns of commits in-process, and the writer keeps the ledger's tail in memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import sqlite3
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Iterable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiosqlite

from .. import errors
from ..model import EMPTY_TAIL, Head, Tail, Version, Write, parent_of, plan_write
from ..watch import WatchHub
from . import Durability, StoreOptions, requested_version

SCHEMA_VERSION = 1
PURGE_EVERY = 1000
# One transaction takes at most this many queued writes, or about this much content.
MAX_BATCH_WRITES = 256
MAX_BATCH_BYTES = 8 << 20
# Heads (metadata only) the writer keeps in memory, least recently written or read dropped first.
HEAD_CACHE_ENTRIES = 8192

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


class _Batch:
    """What one batch has written so far: the next write of the batch plans against it."""

    def __init__(self, tail: Tail) -> None:
        self.tail = tail
        self.heads: dict[str, Head] = {}
        self.requests: dict[tuple[str, str], tuple[bytes, Version]] = {}
        self.fresh: list[Version] = []

    def record(self, write: Write, head: Head | None, version: Version) -> None:
        self.heads[write.name] = Head(
            latest=version, previous_update_time_us=head.latest.update_time_us if head else None)
        self.tail = Tail(version.revision, version.hash, version.update_time_us)
        if write.request_id:
            self.requests[(write.request_scope, write.request_id)] = (write.fingerprint, version)
        self.fresh.append(version)


class SQLiteStore:
    """A ledger in one SQLite file. Open it with :func:`open_sqlite`.

    Writes are group-committed: :meth:`run_writer`, the one task that writes, takes every write
    queued while the previous transaction committed and commits them together on the writer
    thread, which alone uses the writer connection. Each write is still planned on its own,
    against the heads and tail the writes before it made; one that breaks a rule fails alone;
    every success is on disk (one fsync per batch with ``Durability.FULL``) before any of the
    batch is answered. Reads go to their own connection, off the writer's path.
    """

    def __init__(
        self, db: sqlite3.Connection, thread: ThreadPoolExecutor, reader: aiosqlite.Connection,
        hub: WatchHub, options: StoreOptions, tail: Tail,
    ) -> None:
        self._db = db
        self._thread = thread
        self._reader = reader
        self.hub = hub
        self._options = options
        self._tail = tail
        # Only this process writes the file (the lock file), so a cached head is the head.
        self._heads: OrderedDict[str, Head] = OrderedDict()
        self._queue: deque[tuple[Write, asyncio.Future[Version]]] = deque()
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()  # set: nothing queued, no batch committing
        self._idle.set()
        self._writes = 0

    # --- writes --------------------------------------------------------------------------------

    async def write(self, write: Write) -> Version:
        # Shielded by construction: once queued, a write is committed whether or not its
        # caller still waits (a cancelled caller cancels only `outcome`, which is then left
        # unanswered), so a cancellation never leaves a transaction half done.
        outcome: asyncio.Future[Version] = asyncio.get_running_loop().create_future()
        self._queue.append((write, outcome))
        self._idle.clear()
        self._wake.set()
        return await outcome

    async def drain(self) -> None:
        """Wait for every write already queued, those whose callers went away included."""
        await self._idle.wait()

    async def run_writer(self) -> None:
        """The one task that commits: it takes every write queued meanwhile (up to a batch) and
        commits them in one transaction on the writer thread, then publishes and answers."""
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                batch = self._take_batch()
                fresh: list[Version] = []
                try:
                    outcomes, fresh = await loop.run_in_executor(
                        self._thread, self._commit_batch, [write for write, _ in batch])
                except sqlite3.Error as exc:
                    outcomes = [_storage_error(exc)] * len(batch)
                except Exception as exc:  # a bug: every write of the batch fails with it
                    outcomes = [exc] * len(batch)
                # Published before anyone is answered: a reader told of an acknowledged write
                # (the read index, a watcher) finds it.
                self.hub.publish(fresh)
                for (_, future), outcome in zip(batch, outcomes, strict=True):
                    if future.done():
                        continue
                    if isinstance(outcome, Version):
                        future.set_result(outcome)
                    else:
                        future.set_exception(outcome)
            self._idle.set()

    def _take_batch(self) -> list[tuple[Write, asyncio.Future[Version]]]:
        batch: list[tuple[Write, asyncio.Future[Version]]] = []
        size = 0
        while self._queue and len(batch) < MAX_BATCH_WRITES and size < MAX_BATCH_BYTES:
            item = self._queue.popleft()
            batch.append(item)
            size += len(item[0].content) + (len(item[0].patch.document) if item[0].patch else 0)
        return batch

    # On the writer thread, one batch at a time: a version planned here is appended before the
    # next write of the batch is planned, against the heads and tail the batch has made so far.

    def _commit_batch(self, writes: list[Write]
                      ) -> tuple[list[Version | BaseException], list[Version]]:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            batch = _Batch(self._tail)
            outcomes = [self._plan_and_append(write, batch) for write in writes]
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        self._tail = batch.tail
        for name, head in batch.heads.items():
            self._remember(name, head)
        before, self._writes = self._writes, self._writes + len(batch.fresh)
        if self._writes // PURGE_EVERY != before // PURGE_EVERY:
            self._purge_requests()
        return outcomes, batch.fresh

    def _plan_and_append(self, write: Write, batch: _Batch) -> Version | BaseException:
        try:
            if write.request_id:
                replayed = self._replay(write, batch)
                if replayed is not None:
                    return replayed
            head = batch.heads.get(write.name) or self._current_head(write)
            version = plan_write(write, head, batch.tail, time.time_ns() // 1000,
                                 limit=self._options.max_content_bytes)
        except sqlite3.Error:
            raise
        except Exception as exc:  # the write's own outcome (a ledger rule); nothing appended
            return exc
        self._append(version, write)
        batch.record(write, head, version)
        return version

    def _replay(self, write: Write, batch: _Batch) -> Version | None:
        key = (write.request_scope, write.request_id)
        if key in batch.requests:
            fingerprint, version = batch.requests[key]
        else:
            row = self._db.execute(
                "SELECT fingerprint, name, version FROM requests WHERE scope = ? AND "
                "request_id = ?", key).fetchone()
            if row is None:
                return None
            fingerprint = row[0]
            found = self._db.execute(
                f"SELECT {_ALL_COLUMNS} FROM versions WHERE name = ? AND version = ?",
                (row[1], row[2])).fetchone()
            assert found is not None, "a request record points at a version that must exist"
            version = _version(found)
        if fingerprint != write.fingerprint:
            raise errors.IdempotencyKeyReused(write.request_scope, write.request_id)
        return version

    def _current_head(self, write: Write) -> Head | None:
        """The committed head of the write's resource: from memory unless the write needs the
        content (a patch), which the cache leaves out."""
        if write.needs_content:
            return self._head(write.name, with_content=True)
        head = self._heads.get(write.name)
        if head is not None:
            self._heads.move_to_end(write.name)
            return head
        head = self._head(write.name, with_content=False)
        if head is not None:
            self._remember(write.name, head)
        return head

    def _remember(self, name: str, head: Head) -> None:
        if head.latest.content:
            head = Head(latest=head.latest.without_content(),
                        previous_update_time_us=head.previous_update_time_us)
        self._heads[name] = head
        self._heads.move_to_end(name)
        if len(self._heads) > HEAD_CACHE_ENTRIES:
            self._heads.popitem(last=False)

    def _head(self, name: str, *, with_content: bool) -> Head | None:
        columns = _ALL_COLUMNS if with_content else _META_COLUMNS + ", x''"
        rows = self._db.execute(
            f"SELECT {columns} FROM versions WHERE name = ? ORDER BY version DESC LIMIT 2", (name,)
        ).fetchall()
        if not rows:
            return None
        return Head(latest=_version(rows[0]), previous_update_time_us=rows[1][5] if len(rows) > 1
                    else None)

    def _append(self, v: Version, write: Write) -> None:
        db = self._db
        db.execute(
            f"INSERT INTO versions ({_ALL_COLUMNS}) VALUES "
            "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (v.name, v.version, v.revision, v.content_type, v.create_time_us, v.update_time_us,
             v.actor, v.reason, int(v.deleted), v.previous_hash, v.ledger_previous_hash, v.hash,
             v.size, v.content),
        )
        db.execute(
            "INSERT INTO heads (name, parent, version, deleted) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (name) DO UPDATE SET version = excluded.version, "
            "deleted = excluded.deleted",
            (v.name, parent_of(v.name), v.version, int(v.deleted)),
        )
        if write.request_id:
            db.execute(
                "INSERT INTO requests (scope, request_id, fingerprint, name, version, created_us) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (write.request_scope, write.request_id, write.fingerprint, v.name, v.version,
                 v.update_time_us),
            )

    def _purge_requests(self) -> None:
        cutoff = time.time_ns() // 1000 - self._options.request_id_ttl_s * 1_000_000
        # A failure is retried after the next PURGE_EVERY writes; records only live longer.
        with contextlib.suppress(sqlite3.Error):
            self._db.execute("DELETE FROM requests WHERE created_us < ?", (cutoff,))

    # --- reads ---------------------------------------------------------------------------------

    async def _fetch(self, sql: str, params: Iterable[Any], content: bool = True) -> list[Version]:
        try:
            # One hop to the reader's thread: statement, rows and cursor in one go.
            rows = await self._reader.execute_fetchall(sql, tuple(params))
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
        else:
            found = await self._fetch(
                f"SELECT {_ALL_COLUMNS} FROM versions WHERE name = ? ORDER BY version DESC "
                "LIMIT 1", (name,),
            )
        return requested_version(found, name, version)

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


_PRAGMAS = ("PRAGMA busy_timeout = 5000", "PRAGMA journal_mode = WAL")


def _synchronous(durability: Durability) -> str:
    # In WAL mode only FULL syncs the WAL at every commit; NORMAL syncs at checkpoints.
    return f"PRAGMA synchronous = {durability.value.upper()}"


def _open_writer(path: str, durability: Durability) -> tuple[sqlite3.Connection, Tail]:
    """On the writer thread: the writer connection, the schema migrated, and the ledger's tail."""
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        for pragma in (*_PRAGMAS, _synchronous(durability)):
            db.execute(pragma)
        _migrate(db)
        row = db.execute(
            "SELECT revision, hash, update_time_us FROM versions ORDER BY revision DESC LIMIT 1"
        ).fetchone()
    except BaseException:
        db.close()
        raise
    return db, EMPTY_TAIL if row is None else Tail(row[0], row[1], row[2])


def _migrate(db: sqlite3.Connection) -> None:
    db.execute("BEGIN IMMEDIATE")
    try:
        exists = db.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name = 'meta'"
        ).fetchone() is not None
        current = 0
        if exists:
            row = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            current = int(row[0]) if row else 0
        if current > SCHEMA_VERSION:
            raise RuntimeError(
                f"the ledger's schema version is {current}; this casledger knows up to "
                f"{SCHEMA_VERSION}: upgrade casledger"
            )
        if current == 0:
            for statement in _split_script(_SCHEMA_V1):
                db.execute(statement)
            db.execute(
                "INSERT INTO meta (key, value) VALUES ('schema_version', ?), ('created_us', ?)",
                (str(SCHEMA_VERSION), str(time.time_ns() // 1000)),
            )
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
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
    loop = asyncio.get_running_loop()
    async with _lock_file(path):
        with ThreadPoolExecutor(1, thread_name_prefix="casledger-writer") as thread:
            db, tail = await loop.run_in_executor(thread, _open_writer, path, options.durability)
            try:
                async with aiosqlite.connect(path, isolation_level=None) as reader:
                    for pragma in (*_PRAGMAS, _synchronous(options.durability),
                                   "PRAGMA query_only = 1"):
                        await reader.execute(pragma)
                    hub = WatchHub(tail.revision, max_queued=options.watch_queue)
                    store = SQLiteStore(db, thread, reader, hub, options, tail)
                    writer = asyncio.create_task(store.run_writer(), name="casledger-writer")
                    try:
                        yield store
                    finally:
                        # Closing the connections under an abandoned write would fail it
                        # half-way: every write queued or started is finished first.
                        await store.drain()
                        writer.cancel()
                        with contextlib.suppress(asyncio.CancelledError):
                            await writer
            finally:
                await loop.run_in_executor(thread, db.close)
