"""PostgreSQL for the tests: a ledger of its own per test, in a schema of its own of the database
``CASLEDGER_TEST_POSTGRES_DSN`` names (``.ci/run`` sets it), reached with ``?search_path=``.

A schema costs a few milliseconds to make and drop (a database, tens to hundreds). Every one is
named ``casledger_test_<pid>_<n>``: one a test run left behind (killed before its teardown) is
dropped by the next run on this machine, once its process is gone.

The helpers are synchronous, so they work from sync fixtures and from inside async tests (whose
loop may be serving the ledger meanwhile): they run on an event loop of their own, in a thread,
over one admin connection, closed by :func:`close` at the end of the session.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import threading
import urllib.parse
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import asyncpg

DSN_ENV = "CASLEDGER_TEST_POSTGRES_DSN"
PREFIX = "casledger_test_"
_NAME = re.compile(rf"{PREFIX}(\d+)_\d+")
_counter = itertools.count(1)
T = TypeVar("T")


class _Admin:
    """An event loop in a daemon thread, holding the admin connection."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="postgres-admin",
                                       daemon=True)
        self.thread.start()
        self.conn: asyncpg.Connection | None = None

    def run(self, call: Callable[[asyncpg.Connection], Coroutine[Any, Any, T]]) -> T:
        async def with_connection() -> T:
            if self.conn is None or self.conn.is_closed():
                self.conn = await asyncpg.connect(admin_dsn(), timeout=5)
            return await call(self.conn)

        return asyncio.run_coroutine_threadsafe(with_connection(), self.loop).result(30)

    def close(self) -> None:
        async def close() -> None:
            if self.conn is not None:
                await self.conn.close()

        asyncio.run_coroutine_threadsafe(close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()


_lock = threading.Lock()
_admin: _Admin | None = None
_checked: list[str | None] = []


def admin_dsn() -> str:
    return os.environ.get(DSN_ENV, "")


def _run(call: Callable[[asyncpg.Connection], Coroutine[Any, Any, T]]) -> T:
    global _admin
    with _lock:
        if _admin is None:
            _admin = _Admin()
        admin = _admin
    return admin.run(call)


def close() -> None:
    """Close the admin connection and its thread (they are made again if needed)."""
    global _admin
    with _lock:
        admin, _admin = _admin, None
    if admin is not None:
        admin.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


async def _sweep(conn: asyncpg.Connection) -> None:
    rows = await conn.fetch("SELECT nspname FROM pg_namespace WHERE nspname LIKE $1",
                            PREFIX + "%")
    for (name,) in rows:
        match = _NAME.fullmatch(name)
        if match and not _alive(int(match[1])):
            await conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


def unavailable() -> str | None:
    """Why the PostgreSQL tests cannot run here (None: they can). Checked once per run."""
    if not _checked:
        if not admin_dsn():
            reason: str | None = (f"{DSN_ENV} is not set: the PostgreSQL backend is not tested "
                                  "(.ci/run sets it)")
        else:
            try:
                _run(_sweep)
                reason = None
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                reason = f"PostgreSQL at {DSN_ENV} is unreachable: {exc}"
        _checked.append(reason)
    return _checked[0]


def url_of(schema: str) -> str:
    """The admin DSN, with `schema` as its search_path, and as the application_name of its
    sessions (so a test can find them in pg_stat_activity without touching any other run's)."""
    parts = urllib.parse.urlsplit(admin_dsn())
    query = urllib.parse.urlencode([*urllib.parse.parse_qsl(parts.query),
                                    ("search_path", schema), ("application_name", schema)])
    return urllib.parse.urlunsplit(parts._replace(query=query))


def schema_of(url: str) -> str:
    schema = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query))["search_path"]
    assert schema.startswith(PREFIX), schema
    return schema


def create_ledger() -> str:
    """The URL of a new, empty ledger: a schema of its own."""
    schema = f"{PREFIX}{os.getpid()}_{next(_counter)}"

    async def create(conn: asyncpg.Connection) -> None:
        await conn.execute(f'CREATE SCHEMA "{schema}"')

    _run(create)
    return url_of(schema)


def drop_ledger(url: str) -> None:
    schema = schema_of(url)

    async def drop(conn: asyncpg.Connection) -> None:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')

    _run(drop)


@contextmanager
def ledger() -> Iterator[str]:
    """The URL of a new, empty ledger for the block; dropped after it."""
    url = create_ledger()
    try:
        yield url
    finally:
        drop_ledger(url)


def fetchval(url: str, sql: str, *params: Any) -> Any:
    """One value from the ledger at `url` (its schema first on the search_path)."""
    schema = schema_of(url)

    async def fetch(conn: asyncpg.Connection) -> Any:
        async with conn.transaction():
            await conn.execute(f"SET LOCAL search_path TO \"{schema}\"")
            return await conn.fetchval(sql, *params)

    return _run(fetch)


def execute(url: str, sql: str) -> None:
    """Run `sql` (one or more statements) in the ledger at `url`, in one transaction."""
    schema = schema_of(url)

    async def run(conn: asyncpg.Connection) -> None:
        async with conn.transaction():
            await conn.execute(f"SET LOCAL search_path TO \"{schema}\"")
            await conn.execute(sql)

    _run(run)


def latest_revision(url: str) -> int:
    """The ledger's latest revision, read from its versions table."""
    return int(fetchval(url, "SELECT coalesce(max(revision), 0) FROM versions"))
