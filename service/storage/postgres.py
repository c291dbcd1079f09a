"""The scale-out backend: one PostgreSQL database shared by many stateless replicas, over asyncpg.

Tables (created and migrated on start; ``meta.schema_version`` records the version):
``versions`` (append-only: triggers refuse UPDATE, DELETE and TRUNCATE; the same columns as on
SQLite, ``bytea`` for content and hashes, ``bigint`` microseconds for times), ``heads`` (the
current version of each resource, derived from ``versions`` in the same transaction),
``requests`` (the idempotency records, shared by every replica) and ``ledger_tail`` (one row: the
latest revision, its hash and time). Replicas starting together migrate once: the migration runs
under ``pg_advisory_xact_lock``, and whoever comes second finds the schema current.

Why every write locks the one ``ledger_tail`` row. A revision is ledger-wide, gap-free and in
*commit* order (a watcher resuming from revision R must see every later commit exactly once), and
each version's hash chains to the previous revision's hash, so a write cannot even be planned
without knowing the revision just before it. Each write therefore runs, in one READ COMMITTED
transaction: ``SELECT ... FROM ledger_tail FOR UPDATE`` and the resource's head (one round trip:
``casledger_begin_write``, whose second query takes its snapshot after the lock) -> request id
(replay) -> :func:`~casledger.service.model.plan_write` -> append the version, upsert the head,
record the request id, advance the tail, ``pg_notify`` (one round trip) -> ``COMMIT``. The row lock
serializes writers ledger-wide, and because the lock is only released once the holder has
committed, revision order *is* commit order: every statement after the lock sees every earlier
write. The alternatives fail that test: a sequence hands out numbers in *start* order and leaves
gaps on rollback (revision 8 may commit before 7, or 7 never); SERIALIZABLE with retries would
detect the conflict on the tail only after the work was done, so under contention most transactions
would abort and retry (and SSI still allows commit order to differ from the order transactions read
the tail). The price is that writes do not scale with replicas: the database orders them, one at a
time, ledger-wide. Reads and watches do scale: they take no lock.

Durability: ``synchronous_commit`` is on for :attr:`Durability.FULL` (a reply means the commit's
WAL is flushed) and off for :attr:`Durability.NORMAL`, set on each of the store's connections.
A dead client's open transaction is ended by ``idle_in_transaction_session_timeout``, so a
replica that vanishes while holding the tail lock blocks the others for seconds, not hours.

Failures: a lost connection, a serialization failure or a server that is shutting down is retried
a few times inside the store, then reported as
:class:`~casledger.service.errors.StorageUnavailable`.
A connection lost *during* COMMIT leaves the outcome unknown; the store then waits for the tail
lock (so the old transaction has ended, one way or the other) and looks for the version's hash:
found, the write succeeded; absent, it is retried.

Watch across replicas: each replica holds one dedicated LISTEN connection. A write's
``pg_notify('casledger_commits', revision)`` is delivered at commit (another schema of the
same database, another ledger, notifies ``casledger_commits_<schema>``); on a notification, or every
second as a safety net, or after the listener reconnects, the replica reads the versions after
the last revision its :class:`~casledger.service.watch.WatchHub` has published from the versions
table (the truth; the notification is only a wake-up) and publishes them in order. The local write
path publishes its own version at once when it is the next one, so a local watcher sees it before
the reply; publishing is idempotent by revision (only ``hub.revision + 1`` is ever published), so
the two paths never duplicate or skip one. A replica without watchers only advances its revision.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import fields
from typing import Any, TypeVar

import asyncpg

from .. import errors
from ..model import Head, Tail, Version, Write, parent_of, plan_write
from ..watch import WatchHub
from . import Durability, ShieldedWrites, StoreOptions, redact, requested_version

log = logging.getLogger("casledger.storage.postgres")

SCHEMA_VERSION = 1
CHANNEL = "casledger_commits"
# The first key of the migration's advisory lock (the second is the schema's name).
MIGRATION_LOCK = 0x0CA5_1ED6
POOL_MIN, POOL_MAX = 1, 10
# Writers of one replica waiting for the tail lock at once; the rest of the pool serves reads.
WRITERS = 4
ATTEMPTS = 3
BACKOFF_S = 0.05
POLL_S = 1.0
PURGE_EVERY = 1000
FOLLOW_BATCH = 256
IDLE_IN_TRANSACTION_MS = 10_000
CLOSE_TIMEOUT_S = 5.0

# One migration script per step: _MIGRATIONS[n] takes the schema from version n to n + 1.
# `COLLATE "C"` makes names compare byte-wise, as on SQLite: listings and the prefix ranges
# (`prefix/` .. `prefix0`) then do not depend on the database's locale.
_SCHEMA_V1 = """
CREATE TABLE meta (key text PRIMARY KEY, value text NOT NULL);
CREATE TABLE versions (
    revision bigint PRIMARY KEY,
    name text COLLATE "C" NOT NULL,
    version bigint NOT NULL,
    content_type text NOT NULL,
    create_time_us bigint NOT NULL,
    update_time_us bigint NOT NULL,
    actor text NOT NULL,
    reason text NOT NULL,
    deleted boolean NOT NULL,
    previous_hash bytea NOT NULL,
    ledger_previous_hash bytea NOT NULL,
    hash bytea NOT NULL,
    size bigint NOT NULL,
    content bytea NOT NULL,
    UNIQUE (name, version)
);
CREATE FUNCTION casledger_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'casledger versions are append-only';
END
$$;
CREATE TRIGGER versions_no_update BEFORE UPDATE OR DELETE ON versions
    FOR EACH ROW EXECUTE FUNCTION casledger_append_only();
CREATE TRIGGER versions_no_truncate BEFORE TRUNCATE ON versions
    FOR EACH STATEMENT EXECUTE FUNCTION casledger_append_only();
CREATE TABLE heads (
    name text COLLATE "C" PRIMARY KEY,
    parent text COLLATE "C" NOT NULL,
    version bigint NOT NULL,
    deleted boolean NOT NULL
);
CREATE INDEX heads_live_by_parent ON heads (parent, name) WHERE NOT deleted;
CREATE TABLE requests (
    scope text NOT NULL,
    request_id text NOT NULL,
    fingerprint bytea NOT NULL,
    name text NOT NULL,
    version bigint NOT NULL,
    created_us bigint NOT NULL,
    PRIMARY KEY (scope, request_id)
);
CREATE INDEX requests_by_age ON requests (created_us);
CREATE TABLE ledger_tail (
    id integer PRIMARY KEY CHECK (id = 1),
    revision bigint NOT NULL,
    hash bytea NOT NULL,
    update_time_us bigint NOT NULL
);
INSERT INTO ledger_tail (id, revision, hash, update_time_us) VALUES (1, 0, '', 0);
-- A write's first step in one round trip: lock the tail row, then read the resource's two
-- latest versions with a snapshot taken *after* the lock (each statement of a VOLATILE
-- function takes its own under READ COMMITTED), so every earlier write is seen. The first row
-- is the tail (its revision, hash and update_time_us; name NULL), then the head, newest first.
CREATE FUNCTION casledger_begin_write(p_name text, p_content boolean)
RETURNS SETOF versions LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    RETURN QUERY SELECT t.revision, NULL::text, NULL::bigint, NULL::text, NULL::bigint,
        t.update_time_us, NULL::text, NULL::text, NULL::boolean, NULL::bytea, NULL::bytea,
        t.hash, NULL::bigint, NULL::bytea
        FROM ledger_tail t WHERE t.id = 1 FOR UPDATE;
    RETURN QUERY SELECT v.revision, v.name, v.version, v.content_type, v.create_time_us,
        v.update_time_us, v.actor, v.reason, v.deleted, v.previous_hash,
        v.ledger_previous_hash, v.hash, v.size,
        CASE WHEN p_content THEN v.content ELSE ''::bytea END
        FROM versions v WHERE v.name = p_name ORDER BY v.version DESC LIMIT 2;
END
$$;
"""
_MIGRATIONS = (_SCHEMA_V1,)

# The Version dataclass's fields, in order: `Version(*row)` builds one from a row.
COLUMNS = ", ".join(f.name for f in fields(Version))
COLUMNS_NO_CONTENT = COLUMNS.replace("content,", "''::bytea AS content,", 1)

_LOCK_TAIL = "SELECT revision, hash, update_time_us FROM ledger_tail WHERE id = 1 FOR UPDATE"
_BEGIN_WRITE = f"SELECT {COLUMNS} FROM casledger_begin_write($1, $2)"
_REPLAY = (
    "SELECT r.fingerprint, " + ", ".join(f"v.{c.strip()}" for c in COLUMNS.split(",")) +
    " FROM requests r LEFT JOIN versions v ON v.name = r.name AND v.version = r.version"
    " WHERE r.scope = $1 AND r.request_id = $2"
)
# One round trip: the version, its head, its request id and the tail, then the wake-up of every
# replica's follower (delivered at commit). Data-modifying CTEs all run, read or not.
_APPEND = f"""
WITH appended AS (
    INSERT INTO versions ({COLUMNS})
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)
), head AS (
    INSERT INTO heads (name, parent, version, deleted) VALUES ($1, $15::text, $2, $10)
    ON CONFLICT (name) DO UPDATE SET version = excluded.version, deleted = excluded.deleted
), request AS (
    INSERT INTO requests (scope, request_id, fingerprint, name, version, created_us)
    SELECT $16::text, $17::text, $18::bytea, $1, $2, $7 WHERE $17::text <> ''
), tail AS (
    UPDATE ledger_tail SET revision = $3, hash = $13, update_time_us = $7 WHERE id = 1
)
SELECT pg_notify($19::text, $3::bigint::text)
"""

T = TypeVar("T")

# Worth another attempt: the transaction did not commit and a new one may well succeed.
TRANSIENT: tuple[type[BaseException], ...] = (
    asyncpg.PostgresConnectionError,  # lost or refused connections (08xxx)
    asyncpg.TransactionRollbackError,  # serialization failure, deadlock (40xxx)
    asyncpg.CannotConnectNowError,  # starting up or shutting down (57P03)
    asyncpg.AdminShutdownError,
    asyncpg.TooManyConnectionsError,
    asyncpg.InterfaceError,  # a connection closed under us
    asyncpg.InternalClientError,  # ... in the middle of an operation
    OSError,  # refused, reset; TimeoutError too
)
# Everything a PostgreSQL call may raise that is the store's failure, not the caller's.
FAILURES: tuple[type[BaseException], ...] = (*TRANSIENT, asyncpg.PostgresError)
CLOSE_FAILURES: tuple[type[BaseException], ...] = (*FAILURES, TimeoutError)


def channel_for(schema: str) -> str:
    """The NOTIFY channel of the ledger in `schema`: ledgers in other schemas of the same
    database must not wake each other's followers with revisions of their own."""
    if schema == "public":
        return CHANNEL
    channel = f"{CHANNEL}_{schema}"
    if len(channel.encode()) > 63:  # NAMEDATALEN: longer identifiers are truncated
        channel = f"{CHANNEL}_{hashlib.sha256(schema.encode()).hexdigest()[:32]}"
    return channel


def server_settings(durability: Durability, url: str = "") -> dict[str, str]:
    """Session settings of every connection the store opens (they override the URL's, but for
    an ``application_name`` given there: operators may name their replicas)."""
    settings = {
        "application_name": "casledger",
        "synchronous_commit": "on" if durability is Durability.FULL else "off",
        "idle_in_transaction_session_timeout": str(IDLE_IN_TRANSACTION_MS),
    }
    with contextlib.suppress(ValueError):
        if "application_name" in urllib.parse.parse_qs(urllib.parse.urlsplit(url).query):
            del settings["application_name"]
    return settings


def storage_error(exc: BaseException, *, outcome_unknown: bool = False
                  ) -> errors.StorageUnavailable:
    what = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    if outcome_unknown:
        return errors.StorageUnavailable(
            f"the PostgreSQL store failed while committing ({what}); the write may have been "
            "applied: read the resource before retrying")
    return errors.StorageUnavailable(f"the PostgreSQL store failed ({what}); nothing was written")


async def migrate(conn: asyncpg.Connection) -> int:
    """Create or upgrade the schema in the connection's current schema; call inside a
    transaction. Returns the schema version found before."""
    schema = await conn.fetchval("SELECT current_schema()")
    if schema is None:
        raise RuntimeError("the database's search_path names no existing schema: create the "
                           "schema first (CREATE SCHEMA ...)")
    # Replicas starting together queue here; the transaction's end releases the lock.
    await conn.execute("SELECT pg_advisory_xact_lock($1, hashtext($2))", MIGRATION_LOCK, schema)
    found = 0
    if await conn.fetchval("SELECT to_regclass(format('%I.meta', current_schema())) IS NOT NULL"):
        value = await conn.fetchval("SELECT value FROM meta WHERE key = 'schema_version'")
        found = int(value) if value is not None else 0
    if found > SCHEMA_VERSION:
        raise RuntimeError(
            f"the ledger's schema version is {found}; this casledger knows up to "
            f"{SCHEMA_VERSION}: upgrade casledger")
    for step in range(found, SCHEMA_VERSION):
        await conn.execute(_MIGRATIONS[step])
    if found < SCHEMA_VERSION:
        await conn.execute(
            "INSERT INTO meta (key, value) VALUES ('schema_version', $1), ('created_us', $2) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value WHERE meta.key = "
            "'schema_version'", str(SCHEMA_VERSION), str(time.time_ns() // 1000))
    return found


class PostgresStore:
    """A ledger in one PostgreSQL database, shared with other replicas. Open it with
    :func:`open_postgres`."""

    def __init__(self, pool: asyncpg.Pool, hub: WatchHub, options: StoreOptions, url: str,
                 channel: str = CHANNEL) -> None:
        self._pool = pool
        self._channel = channel
        self.hub = hub
        self._options = options
        self._url = url
        self._writers = asyncio.Semaphore(WRITERS)
        self._writes = 0
        self._shielded = ShieldedWrites()
        self._follow_lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._notified = 0
        self._listener: asyncpg.Connection | None = None
        self._follower: asyncio.Task[None] | None = None
        self._closing = False
        self._failing = False

    # --- writes --------------------------------------------------------------------------------

    async def write(self, write: Write) -> Version:
        return await self._shielded.run(self._write(write))

    async def drain(self) -> None:
        """Wait for every write already started, those whose callers went away included."""
        await self._shielded.drain()

    async def _write(self, write: Write) -> Version:
        async with self._writers:
            for attempt in range(ATTEMPTS):
                try:
                    version, fresh = await self._transaction(write)
                    break
                except _CommitFailed as failed:
                    if await self._committed(failed.version, failed.cause):
                        version, fresh = failed.version, True
                        break
                    cause: BaseException = failed.cause
                except TRANSIENT as exc:
                    cause = exc
                except asyncpg.PostgresError as exc:
                    raise storage_error(exc) from exc
                if attempt + 1 == ATTEMPTS:
                    raise storage_error(cause) from cause
                log.info("retrying a write after %s", cause)
                await asyncio.sleep(BACKOFF_S * 4 ** attempt)
        if fresh:
            await self._published(version)
            self._writes += 1
            if self._writes % PURGE_EVERY == 0:
                await self._purge_requests()
        return version

    async def _transaction(self, write: Write) -> tuple[Version, bool]:
        async with self._pool.acquire() as conn:
            transaction = conn.transaction()
            await transaction.start()
            try:
                rows = await conn.fetch(_BEGIN_WRITE, write.name, write.needs_content)
                if write.request_id:
                    replayed = await self._replay(conn, write)
                    if replayed is not None:
                        await transaction.rollback()
                        return replayed, False
                tail = Tail(rows[0]["revision"], rows[0]["hash"], rows[0]["update_time_us"])
                head = Head(latest=Version(*rows[1]), previous_update_time_us=rows[2][
                    "update_time_us"] if len(rows) > 2 else None) if len(rows) > 1 else None
                version = plan_write(write, head, tail, time.time_ns() // 1000,
                                     limit=self._options.max_content_bytes)
                v = version
                await conn.execute(
                    _APPEND, v.name, v.version, v.revision, v.content, v.content_type,
                    v.create_time_us, v.update_time_us, v.actor, v.reason, v.deleted,
                    v.previous_hash, v.ledger_previous_hash, v.hash, v.size, parent_of(v.name),
                    write.request_scope, write.request_id, write.fingerprint, self._channel)
            except BaseException:
                with contextlib.suppress(*FAILURES):
                    await transaction.rollback()
                raise
            try:
                await transaction.commit()
            except FAILURES as exc:
                raise _CommitFailed(version, exc) from exc
        return version, True

    async def _replay(self, conn: asyncpg.Connection, write: Write) -> Version | None:
        row = await conn.fetchrow(_REPLAY, write.request_scope, write.request_id)
        if row is None:
            return None
        if row[0] != write.fingerprint:
            raise errors.IdempotencyKeyReused(write.request_scope, write.request_id)
        assert row[1] is not None, "a request record points at a version that must exist"
        return Version(*row[1:])

    async def _committed(self, version: Version, cause: BaseException) -> bool:
        """After a failed COMMIT: did it commit? Waits for the tail lock first, so the old
        transaction has ended whichever way it went."""
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                await conn.fetchrow(_LOCK_TAIL)
                stored = await conn.fetchval("SELECT hash FROM versions WHERE revision = $1",
                                             version.revision)
        except FAILURES as exc:
            raise storage_error(cause, outcome_unknown=True) from exc
        return bool(stored == version.hash)

    async def _purge_requests(self) -> None:
        cutoff = time.time_ns() // 1000 - self._options.request_id_ttl_s * 1_000_000
        # A failure is retried after the next PURGE_EVERY writes; records only live longer.
        with contextlib.suppress(*FAILURES):
            await self._pool.execute("DELETE FROM requests WHERE created_us < $1", cutoff)

    # --- publishing to the local watch hub -----------------------------------------------------

    async def _published(self, version: Version) -> None:
        """Publish a version this replica committed, and any committed before it not yet seen."""
        hub = self.hub
        if version.revision == hub.revision + 1:
            hub.publish((version,))
        elif version.revision > hub.revision:
            try:
                await self.catch_up(version.revision)
            except FAILURES as exc:
                # The follower will publish them; the write itself is committed.
                log.warning("cannot read the ledger to publish revision %d: %s",
                            version.revision, exc)

    def _offer(self, versions: Iterable[Version]) -> bool:
        """Publish the versions that follow the hub's revision, in order; False at a gap."""
        hub = self.hub
        for version in versions:
            if version.revision == hub.revision + 1:
                hub.publish((version,))
            elif version.revision > hub.revision:
                return False
        return True

    async def catch_up(self, upto: int | None = None) -> None:
        """Publish every committed version after the hub's revision (up to `upto`; default:
        the tail), read from the versions table."""
        async with self._follow_lock:
            if upto is None:
                upto = int(await self._pool.fetchval(
                    "SELECT revision FROM ledger_tail WHERE id = 1"))
            while self.hub.revision < upto:
                if not self.hub.watchers:
                    # Nobody to hand versions to: a watcher replays from the table anyway.
                    self.hub.revision = upto
                    return
                rows = await self._pool.fetch(
                    f"SELECT {COLUMNS} FROM versions WHERE revision > $1 AND revision <= $2 "
                    "ORDER BY revision LIMIT $3", self.hub.revision, upto, FOLLOW_BATCH)
                if not rows or not self._offer(Version(*row) for row in rows):
                    log.error("the versions table has a gap after revision %d",
                              self.hub.revision)
                    return

    def _on_notify(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        with contextlib.suppress(ValueError):
            revision = int(payload)
            if revision > self._notified:
                self._notified = revision
                if revision > self.hub.revision:
                    self._wake.set()

    def _on_listener_lost(self, _conn: object) -> None:
        self._wake.set()

    async def _listen(self) -> None:
        if self._listener is not None:
            self._listener.terminate()
        self._listener = None
        listener = await asyncpg.connect(
            self._url, server_settings=server_settings(self._options.durability, self._url))
        try:
            await listener.add_listener(self._channel, self._on_notify)
            listener.add_termination_listener(self._on_listener_lost)
        except BaseException:
            listener.terminate()
            raise
        self._listener = listener

    async def _follow(self) -> None:
        """The follower: wakes on notifications and every POLL_S, reconnects the listener,
        publishes what other replicas committed."""
        while True:
            # asyncio.timeout, not wait_for: on 3.11 wait_for may swallow a cancellation that
            # coincides with the wake-up (a lost listener), and close() would wait for ever.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(POLL_S):
                    await self._wake.wait()
            self._wake.clear()
            if self._closing:
                return
            try:
                if self._listener is None or self._listener.is_closed():
                    await self._listen()
                    await self.catch_up()  # notifications may have been missed meanwhile
                elif self._notified > self.hub.revision:
                    await self.catch_up(self._notified)
                else:
                    await self.catch_up()
                if self._failing:
                    log.info("following the PostgreSQL ledger again")
                    self._failing = False
            except FAILURES as exc:
                if not self._failing:
                    log.warning("cannot follow the PostgreSQL ledger (retrying every %.0f s): %s",
                                POLL_S, exc)
                    self._failing = True
            except Exception:
                # A bug, not an outage: say so loudly, and keep following.
                log.exception("the PostgreSQL follower failed")

    async def start(self) -> None:
        await self._listen()
        await self.catch_up()
        self._follower = asyncio.ensure_future(self._follow())

    async def close(self) -> None:
        await self.drain()
        self._closing = True
        self._wake.set()
        if self._follower is not None:
            self._follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._follower
        if self._listener is not None:
            try:
                async with asyncio.timeout(CLOSE_TIMEOUT_S):
                    await self._listener.close()
            except CLOSE_FAILURES:
                self._listener.terminate()
            self._listener = None

    # --- reads ---------------------------------------------------------------------------------

    async def _retrying(self, call: Callable[[], Awaitable[T]]) -> T:
        for attempt in range(ATTEMPTS):
            try:
                return await call()
            except TRANSIENT as exc:
                if attempt + 1 == ATTEMPTS:
                    raise storage_error(exc) from exc
            except asyncpg.PostgresError as exc:
                raise storage_error(exc) from exc
            await asyncio.sleep(BACKOFF_S * 4 ** attempt)
        raise AssertionError("unreachable")

    async def _fetch(self, sql: str, *params: Any) -> list[Version]:
        rows = await self._retrying(lambda: self._pool.fetch(sql, *params))
        return [Version(*row) for row in rows]

    async def current_revision(self) -> int:
        # From the database, not this replica's hub: other replicas commit too.
        revision = await self._retrying(
            lambda: self._pool.fetchval("SELECT revision FROM ledger_tail WHERE id = 1"))
        return int(revision)

    async def get(self, name: str, version: int = 0) -> Version:
        if version:
            found = await self._fetch(
                f"SELECT {COLUMNS} FROM versions WHERE name = $1 AND version = $2", name, version)
        else:
            found = await self._fetch(
                f"SELECT {COLUMNS} FROM versions WHERE name = $1 ORDER BY version DESC LIMIT 1",
                name)
        return requested_version(found, name, version)

    async def list_resources(self, parent: str, limit: int, after: str | None) -> list[Version]:
        columns = ", ".join(f"v.{c.strip()}" for c in COLUMNS.split(","))
        return await self._fetch(
            f"SELECT {columns} FROM heads h JOIN versions v "
            "ON v.name = h.name AND v.version = h.version "
            "WHERE h.parent = $1 AND NOT h.deleted AND h.name > $2 ORDER BY h.name LIMIT $3",
            parent, after or "", limit)

    async def list_versions(
        self, name: str, limit: int, after: int | None, include_content: bool
    ) -> list[Version]:
        found = await self._fetch(
            f"SELECT {COLUMNS if include_content else COLUMNS_NO_CONTENT} FROM versions "
            "WHERE name = $1 AND version > $2 ORDER BY version LIMIT $3",
            name, after or 0, limit)
        if not found and after is None:
            raise errors.ResourceNotFound(name=name)
        return found

    async def read_revisions(self, after: int, upto: int, prefix: str, limit: int) -> list[Version]:
        if not prefix:
            return await self._fetch(
                f"SELECT {COLUMNS} FROM versions WHERE revision > $1 AND revision <= $2 "
                "ORDER BY revision LIMIT $3", after, upto, limit)
        # `prefix/` .. `prefix0` is exactly the names below prefix ('0' follows '/').
        return await self._fetch(
            f"SELECT {COLUMNS} FROM versions WHERE revision > $1 AND revision <= $2 "
            "AND (name = $3 OR (name > $4 AND name < $5)) ORDER BY revision LIMIT $6",
            after, upto, prefix, prefix + "/", prefix + "0", limit)

    async def sizes(self) -> dict[str, int]:
        """Counts for operators: resources, live resources, versions, tombstones, bytes."""
        row = await self._retrying(lambda: self._pool.fetchrow(
            "SELECT (SELECT count(*) FROM heads), (SELECT count(*) FROM heads WHERE NOT deleted),"
            " count(*), count(*) FILTER (WHERE deleted), coalesce(sum(size), 0) FROM versions"))
        keys = ("resources", "live_resources", "versions", "tombstones", "bytes")
        return {key: int(value) for key, value in zip(keys, row, strict=True)}


class _CommitFailed(Exception):
    """COMMIT raised: whether `version` was committed is not known yet."""

    def __init__(self, version: Version, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.version = version
        self.cause = cause


async def _close_pool(pool: asyncpg.Pool) -> None:
    try:
        async with asyncio.timeout(CLOSE_TIMEOUT_S):
            await pool.close()
    except CLOSE_FAILURES:
        pool.terminate()


async def _shielded_connect(*args: Any, **kwargs: Any) -> asyncpg.Connection:
    """``asyncpg.connect`` that a cancelled caller cannot interrupt half-way.

    The pool opens connections inside ``acquire()``, so a read whose client went away (a deadline,
    a closed stream) cancels a handshake in flight; asyncpg then leaves a future it never reads
    (its TLS negotiation's: "Future exception was never retrieved: unexpected connection_lost()").
    Here the handshake finishes on its own and the connection, if any, is closed."""
    task = asyncio.ensure_future(asyncpg.connect(*args, **kwargs))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        task.add_done_callback(_close_orphan)
        raise


def _close_orphan(task: asyncio.Task[asyncpg.Connection]) -> None:
    if task.cancelled() or task.exception() is not None:
        return
    task.result().terminate()


@asynccontextmanager
async def connect_pool(url: str, durability: Durability, *, min_size: int = POOL_MIN,
                       max_size: int = POOL_MAX) -> AsyncIterator[asyncpg.Pool]:
    """A connection pool of the store's sessions; a failure to connect is a RuntimeError that
    names the server (without its password)."""
    try:
        pool = await asyncpg.create_pool(url, min_size=min_size, max_size=max_size,
                                         connect=_shielded_connect,
                                         server_settings=server_settings(durability, url))
    except FAILURES as exc:
        raise RuntimeError(f"cannot open the PostgreSQL ledger at {redact(url)}: {exc}") from None
    try:
        yield pool
    finally:
        await _close_pool(pool)


@asynccontextmanager
async def open_postgres(url: str, options: StoreOptions) -> AsyncIterator[PostgresStore]:
    """Open (creating and migrating if need be) the ledger in the database `url` names."""
    async with connect_pool(url, options.durability) as pool:
        for attempt in range(ATTEMPTS):
            try:
                async with pool.acquire() as conn:
                    async with conn.transaction():
                        await migrate(conn)
                    revision = int(await conn.fetchval(
                        "SELECT revision FROM ledger_tail WHERE id = 1"))
                    channel = channel_for(await conn.fetchval("SELECT current_schema()"))
                break
            except FAILURES as exc:
                if attempt + 1 == ATTEMPTS or not isinstance(exc, TRANSIENT):
                    raise RuntimeError(f"cannot open the PostgreSQL ledger at {redact(url)}: "
                                       f"{exc}") from None
                await asyncio.sleep(BACKOFF_S * 4 ** attempt)
        store = PostgresStore(pool, WatchHub(revision, max_queued=options.watch_queue), options,
                              url, channel)
        try:
            await store.start()
        except FAILURES as exc:
            await store.close()
            raise RuntimeError(f"cannot listen for commits on {redact(url)}: {exc}") from None
        try:
            yield store
        finally:
            await store.close()
