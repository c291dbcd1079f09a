"""PostgreSQL ledgers without a server: a read-only reader and a bulk import.

The same tools that read a SQLite ledger file (verify, digest, export, stats, log, get, history,
migrate) read a PostgreSQL ledger through :class:`PostgresReader`: one connection, one
``REPEATABLE READ READ ONLY`` transaction from open to close, so every read sees the same
snapshot however many replicas keep writing. The offline tools are synchronous; the reader drives
asyncpg on an event loop of its own (never the caller's: a thread running one cannot use it).

:func:`import_postgres` loads versions into an *empty* ledger (creating the schema if need be) in
one transaction, under the tail row lock, so a running replica's writes wait for it and chain onto
its last revision; whatever goes wrong, nothing is kept (PostgreSQL's DDL is transactional too).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import asyncpg

from .. import errors
from ..model import Version
from . import Durability, redact
from .postgres import (
    COLUMNS,
    COLUMNS_NO_CONTENT,
    FAILURES,
    channel_for,
    migrate,
    server_settings,
)
from .sqlite_offline import DEFAULT_BATCH, LedgerFileError, LedgerSizes, StoreNotEmpty

T = TypeVar("T")
_COPY_COLUMNS = [c.strip() for c in COLUMNS.split(",")]


class _Loop:
    """A private event loop that runs one coroutine at a time for synchronous code."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return self._loop.run_until_complete(coroutine)

    def close(self) -> None:
        self._loop.run_until_complete(self._loop.shutdown_asyncgens())
        self._loop.close()


def _unreadable(url: str, exc: BaseException) -> LedgerFileError:
    return LedgerFileError(f"{redact(url)}: cannot read it as a ledger: {exc}")


async def _connect(url: str) -> asyncpg.Connection:
    try:
        return await asyncpg.connect(url, server_settings=server_settings(Durability.FULL, url))
    except FAILURES as exc:
        raise LedgerFileError(f"cannot connect to {redact(url)}: {exc}") from None


class PostgresReader:
    """A read-only view of one PostgreSQL ledger: one consistent snapshot until closed."""

    def __init__(self, loop: _Loop, conn: asyncpg.Connection) -> None:
        self._loop = loop
        self._conn = conn

    def _value(self, sql: str, *params: Any) -> Any:
        return self._loop.run(self._conn.fetchval(sql, *params))

    def _rows(self, sql: str, *params: Any) -> list[Any]:
        rows: list[Any] = self._loop.run(self._conn.fetch(sql, *params))
        return rows

    def _cursor(self, sql: str, params: list[Any], batch: int) -> Iterator[list[Any]]:
        cursor = self._loop.run(self._conn.cursor(sql, *params))
        while rows := self._loop.run(cursor.fetch(batch)):
            yield rows

    def revision(self) -> int:
        """The latest revision (0 for an empty ledger)."""
        return int(self._value("SELECT coalesce(max(revision), 0) FROM versions"))

    def versions(self, *, after: int = 0, upto: int | None = None, prefix: str = "",
                 batch: int = DEFAULT_BATCH) -> Iterator[list[Version]]:
        """Every version with `after` < revision <= `upto` under `prefix`, in revision order,
        content included, in lists of up to `batch` (a server-side cursor: memory stays flat)."""
        sql = f"SELECT {COLUMNS} FROM versions WHERE revision > $1"
        params: list[Any] = [after]
        if upto is not None:
            params.append(upto)
            sql += f" AND revision <= ${len(params)}"
        if prefix:
            # `prefix/` .. `prefix0` is exactly the names below prefix ('0' follows '/').
            params += [prefix, prefix + "/", prefix + "0"]
            n = len(params)
            sql += f" AND (name = ${n - 2} OR (name > ${n - 1} AND name < ${n}))"
        for rows in self._cursor(sql + " ORDER BY revision", params, min(batch, 256)):
            yield [Version(*row) for row in rows]

    def get(self, name: str, version: int = 0) -> Version:
        """A version of `name` (0 = the current one), like the service's GetResource."""
        if version:
            rows = self._rows(f"SELECT {COLUMNS} FROM versions WHERE name = $1 AND version = $2",
                              name, version)
            if not rows:
                raise errors.ResourceNotFound(name=name, version=version)
            return Version(*rows[0])
        rows = self._rows(
            f"SELECT {COLUMNS} FROM versions WHERE name = $1 ORDER BY version DESC LIMIT 1", name)
        if not rows:
            raise errors.ResourceNotFound(name=name)
        found = Version(*rows[0])
        if found.deleted:
            raise errors.ResourceNotFound(name=name, deleted_at_version=found.version)
        return found

    def history(self, name: str, *, batch: int = DEFAULT_BATCH) -> Iterator[Version]:
        """Every version of `name`, oldest first, tombstones included, without content."""
        found = False
        for rows in self._cursor(f"SELECT {COLUMNS_NO_CONTENT} FROM versions WHERE name = $1 "
                                 "ORDER BY version", [name], batch):
            found = True
            for row in rows:
                yield Version(*row)
        if not found:
            raise errors.ResourceNotFound(name=name)

    def heads(self) -> Iterator[tuple[str, int, bool]]:
        """The derived `heads` table, (name, version, deleted) by name (byte order)."""
        for rows in self._cursor("SELECT name, version, deleted FROM heads ORDER BY name", [],
                                 DEFAULT_BATCH):
            yield from ((name, version, deleted) for name, version, deleted in rows)

    def sizes(self, now_us: int | None = None) -> LedgerSizes:
        """Counts, bytes and the recent write rate."""
        now_us = time.time_ns() // 1000 if now_us is None else now_us
        heads = self._rows("SELECT count(*), count(*) FILTER (WHERE NOT deleted) FROM heads")[0]
        totals = self._rows(
            "SELECT count(*), count(*) FILTER (WHERE deleted), coalesce(sum(size), 0), "
            "coalesce(min(update_time_us), 0), coalesce(max(update_time_us), 0) FROM versions")[0]
        recent = [self._writes_since(now_us - seconds * 1_000_000)
                  for seconds in (60, 3600, 86400)]
        return LedgerSizes(self.revision(), *map(int, heads), *map(int, totals), *recent)

    def _writes_since(self, cutoff_us: int) -> int:
        # update_time strictly increases along the revisions, so the writes since `cutoff_us`
        # are a suffix of them: binary-search its start over the primary key.
        low, high = 1, self.revision() + 1
        while low < high:
            middle = (low + high) // 2
            found = self._value("SELECT update_time_us FROM versions WHERE revision >= $1 "
                                "ORDER BY revision LIMIT 1", middle)
            if found is None or found >= cutoff_us:
                high = middle
            else:
                low = middle + 1
        return int(self._value("SELECT count(*) FROM versions WHERE revision >= $1", low))


async def _open_snapshot(url: str) -> asyncpg.Connection:
    conn = await _connect(url)
    try:
        await conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        tables = await conn.fetchval(
            "SELECT count(*) FROM unnest(ARRAY['versions', 'heads', 'meta']) AS t(name) "
            "WHERE to_regclass(format('%I.%I', current_schema(), t.name)) IS NOT NULL")
    except FAILURES as exc:
        conn.terminate()
        raise _unreadable(url, exc) from None
    if tables != 3:
        await conn.close()
        raise LedgerFileError(f"{redact(url)}: not a casledger ledger (no versions table)")
    return conn


@contextmanager
def open_postgres_reader(url: str) -> Iterator[PostgresReader]:
    """Open the PostgreSQL ledger `url` names, read-only; its snapshot ends when the block does.
    Errors while reading are LedgerFileError (the tools' "unavailable")."""
    loop = _Loop()
    try:
        conn = loop.run(_open_snapshot(url))
        try:
            yield PostgresReader(loop, conn)
        except FAILURES as exc:
            raise _unreadable(url, exc) from None
        finally:
            try:
                loop.run(conn.close(timeout=5))
            except FAILURES:
                conn.terminate()
    finally:
        loop.close()


async def _begin_import(conn: asyncpg.Connection, url: str) -> None:
    await conn.execute("BEGIN")
    await migrate(conn)
    # Replicas serving this database wait here for the import to commit, then chain onto it.
    await conn.execute("SELECT 1 FROM ledger_tail WHERE id = 1 FOR UPDATE")
    if await conn.fetchval("SELECT EXISTS (SELECT 1 FROM versions)"):
        raise StoreNotEmpty(f"{redact(url)} already holds versions; import only into an empty "
                            "ledger")


async def _copy(conn: asyncpg.Connection, versions: list[Version]) -> None:
    await conn.copy_records_to_table(
        "versions", columns=_COPY_COLUMNS,
        # `deleted` as a bool: rows read from SQLite carry the stored integer.
        records=[tuple(bool(v.deleted) if c == "deleted" else getattr(v, c)
                       for c in _COPY_COLUMNS) for v in versions])


async def _finish_import(conn: asyncpg.Connection) -> None:
    # The parent is the name without its last segment (model.parent_of).
    await conn.execute(
        "INSERT INTO heads (name, parent, version, deleted) "
        "SELECT DISTINCT ON (name) name, regexp_replace(name, '/[^/]*$', ''), version, deleted "
        "FROM versions ORDER BY name, version DESC")
    await conn.execute(
        "UPDATE ledger_tail SET (revision, hash, update_time_us) = (SELECT revision, hash, "
        "update_time_us FROM versions ORDER BY revision DESC LIMIT 1) WHERE id = 1 AND EXISTS "
        "(SELECT 1 FROM versions)")
    tail = await conn.fetchval("SELECT revision FROM ledger_tail WHERE id = 1")
    channel = channel_for(await conn.fetchval("SELECT current_schema()"))
    await conn.execute("SELECT pg_notify($1, $2::bigint::text)", channel, tail)
    await conn.execute("COMMIT")


def import_postgres(url: str, versions: Iterable[Version], *,
                    batch: int = DEFAULT_BATCH) -> int:
    """Append `versions` (in revision order) to the empty PostgreSQL ledger `url` names,
    creating its schema if need be, in one transaction; returns how many. Raises
    :class:`StoreNotEmpty` if it holds versions.

    `versions` may raise at any point (the caller verifies as it loads): then nothing is kept.
    Request ids are not carried over."""
    loop = _Loop()
    try:
        conn = loop.run(_connect(url))
        try:
            loop.run(_begin_import(conn, url))
            count = 0
            pending: list[Version] = []
            # The source is pulled here, between the loop's runs: it may drive a loop of its own.
            for version in versions:
                pending.append(version)
                if len(pending) >= batch:
                    loop.run(_copy(conn, pending))
                    count += len(pending)
                    pending = []
            if pending:
                loop.run(_copy(conn, pending))
                count += len(pending)
            loop.run(_finish_import(conn))
        except FAILURES as exc:
            raise LedgerFileError(f"cannot import into {redact(url)}: {exc}") from None
        finally:
            # Closing a connection inside a transaction rolls it back.
            try:
                loop.run(conn.close(timeout=5))
            except FAILURES:
                conn.terminate()
    finally:
        loop.close()
    return count
