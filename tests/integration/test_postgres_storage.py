"""The PostgreSQL backend itself, below the gRPC service: its schema and migration, the
append-only versions, durability, and what only many replicas on one database can show —
several stores (each a replica) opened on the same ledger in this process: one CAS winner
across replicas, revisions gap-free in commit order, watchers on one replica seeing every
replica's writes, idempotency records shared, and lost connections retried or reported.

The conformance suite (gRPC, HTTP, CLI) runs on this backend too, through the `settings`
fixture; these tests are the backend's own."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, aclosing
from typing import Any

import asyncpg
import pytest

from casledger.service import errors, model
from casledger.service.model import Precondition, Version, Write, WriteKind
from casledger.service.storage import Durability, StoreOptions, open_reader, open_store, redact
from casledger.service.storage import postgres as pg_backend
from casledger.service.storage.postgres import SCHEMA_VERSION, PostgresStore
from casledger.service.verify import Verifier
from casledger.service.watch import watch
from tests.support import postgres

DAY_S = 24 * 3600


@pytest.fixture
def url() -> Iterator[str]:
    """A new, empty ledger (a schema of its own), dropped after the test."""
    if (reason := postgres.unavailable()) is not None:
        pytest.skip(reason)
    with postgres.ledger() as ledger:
        yield ledger


def create(name: str, content: bytes = b'{"a":1}', **kw: Any) -> Write:
    return Write(kind=WriteKind.CREATE, name=name, content=content,
                 content_type="application/json", **kw)


def update(name: str, content: bytes = b'{"a":2}', *, pre: Precondition | None,
           **kw: Any) -> Write:
    return Write(kind=WriteKind.UPDATE, name=name, content=content,
                 content_type="application/json", precondition=pre, **kw)


def with_request_id(write: Write, request_id: str, fingerprint: bytes) -> Write:
    return dataclasses.replace(write, request_id=request_id, request_scope=write.name,
                               fingerprint=fingerprint)


def pg(store: object) -> PostgresStore:
    assert isinstance(store, PostgresStore)
    return store


async def replicas(stack: AsyncExitStack, url: str, count: int, **options: Any
                   ) -> list[PostgresStore]:
    return [pg(await stack.enter_async_context(open_store(url, StoreOptions(**options))))
            for _ in range(count)]


async def check_ledger(url: str) -> Verifier:
    """Everything `casledger verify` checks, the heads table included, read from the database
    through the offline reader (in a thread: it runs an event loop of its own); asserts it all
    holds."""
    return await asyncio.to_thread(_check_ledger, url)


def _check_ledger(url: str) -> Verifier:
    verifier = Verifier()
    with open_reader(url) as reader:
        for batch in reader.versions():
            verifier.feed(batch)
        verifier.check_heads(reader.heads())
    assert verifier.ok, verifier.problems
    return verifier


# --- schema ------------------------------------------------------------------------------------


async def test_first_open_creates_the_schema_and_records_its_version(url: str) -> None:
    async with open_store(url) as store:
        assert store.hub.revision == 0
    tables = postgres.fetchval(url, "SELECT array_agg(tablename::text ORDER BY tablename) "
                                    "FROM pg_tables WHERE schemaname = current_schema()")
    assert tables == ["heads", "ledger_tail", "meta", "requests", "versions"]
    assert postgres.fetchval(url, "SELECT value FROM meta WHERE key = 'schema_version'") == \
        str(SCHEMA_VERSION)
    assert postgres.fetchval(url, "SELECT revision FROM ledger_tail") == 0


async def test_replicas_starting_together_migrate_once(url: str) -> None:
    async with AsyncExitStack() as stack:
        stores = await asyncio.gather(*(
            stack.enter_async_context(open_store(url)) for _ in range(6)))
        v1 = await stores[0].write(create("documents/1"))
        assert (await stores[5].get("documents/1")).etag == v1.etag
    assert postgres.fetchval(url, "SELECT count(*) FROM meta WHERE key = 'schema_version'") == 1
    assert postgres.fetchval(url, "SELECT count(*) FROM ledger_tail") == 1


async def test_reopening_keeps_the_data_and_continues_the_chain(url: str) -> None:
    async with open_store(url) as store:
        v1 = await store.write(create("documents/1"))
        v2 = await store.write(update("documents/1", pre=Precondition.of_etag(v1.etag)))
    async with open_store(url) as store:
        assert store.hub.revision == 2
        v3 = await store.write(create("documents/2"))
        assert (v3.revision, v3.ledger_previous_hash) == (3, v2.hash)
        with pytest.raises(errors.VersionMismatch):
            await store.write(update("documents/1", pre=Precondition.of_etag(v1.etag)))
    assert (await check_ledger(url)).revision == 3


async def test_a_newer_schema_refuses_to_open(url: str) -> None:
    async with open_store(url):
        pass
    postgres.execute(url, f"UPDATE meta SET value = '{SCHEMA_VERSION + 1}' "
                          "WHERE key = 'schema_version'")
    with pytest.raises(RuntimeError, match=rf"schema version is {SCHEMA_VERSION + 1}.*upgrade"):
        async with open_store(url):
            pytest.fail("opened a ledger newer than this build")


async def test_an_unreachable_database_fails_the_start_without_showing_the_password() -> None:
    bad = "postgresql://casledger:s3cret@127.0.0.1:1/nowhere"
    with pytest.raises(RuntimeError, match=r"cannot open the PostgreSQL ledger") as raised:
        async with open_store(bad):
            pytest.fail("opened an unreachable database")
    assert "s3cret" not in str(raised.value)
    assert "casledger:***@127.0.0.1:1" in str(raised.value)


@pytest.mark.parametrize("statement", [
    "UPDATE versions SET content = '\\x7b7d'::bytea",
    "DELETE FROM versions",
    "TRUNCATE versions CASCADE",
])
async def test_versions_are_append_only(url: str, statement: str) -> None:
    async with open_store(url) as store:
        await store.write(create("documents/1"))
    with pytest.raises(asyncpg.RaiseError, match="append-only"):
        postgres.execute(url, statement)
    assert postgres.fetchval(url, "SELECT count(*) FROM versions") == 1


@pytest.mark.parametrize(("durability", "expected"), [
    (Durability.FULL, "on"), (Durability.NORMAL, "off")])
async def test_durability_sets_synchronous_commit(url: str, durability: Durability,
                                                  expected: str) -> None:
    async with open_store(url, StoreOptions(durability=durability)) as store:
        await store.write(create("documents/1"))
        async with pg(store)._pool.acquire() as conn:
            assert await conn.fetchval("SHOW synchronous_commit") == expected


# --- many replicas -----------------------------------------------------------------------------


async def test_many_writers_across_replicas_with_the_same_etag_one_wins(url: str) -> None:
    async with AsyncExitStack() as stack:
        stores = await replicas(stack, url, 3)
        v1 = await stores[0].write(create("documents/d"))
        outcomes = await asyncio.gather(*(
            stores[i % 3].write(update("documents/d", json.dumps({"w": i}).encode(),
                                       pre=Precondition.of_etag(v1.etag)))
            for i in range(30)), return_exceptions=True)
    winners = [o for o in outcomes if isinstance(o, Version)]
    losers = [o for o in outcomes if not isinstance(o, Version)]
    assert len(winners) == 1
    assert all(isinstance(o, errors.VersionMismatch) for o in losers), losers
    assert all(o.current == winners[0].current for o in losers if
               isinstance(o, errors.VersionMismatch))
    assert (await check_ledger(url)).revision == 2


async def test_revisions_are_gap_free_in_commit_order_across_replicas(url: str) -> None:
    async with AsyncExitStack() as stack:
        stores = await replicas(stack, url, 3, durability=Durability.NORMAL)
        written = await asyncio.gather(*(
            stores[i % 3].write(create(f"documents/{i}")) for i in range(90)))
    assert sorted(v.revision for v in written) == list(range(1, 91))
    verifier = await check_ledger(url)  # each chains to the revision before; times increase
    assert (verifier.revision, verifier.resources) == (90, 90)


async def collect(store: PostgresStore, start: int, count: int, prefix: str = ""
                  ) -> list[Version]:
    """The first `count` versions a watcher on `store` is sent."""
    seen: list[Version] = []
    async with asyncio.timeout(20), aclosing(
            watch(store.hub, store.read_revisions, prefix, start)) as stream:
        async for version in stream:
            seen.append(version)
            if len(seen) == count:
                break
    return seen


async def watching(store: PostgresStore, count: int) -> None:
    async with asyncio.timeout(10):
        while store.hub.watchers < count:  # noqa: ASYNC110 (the hub has no event)
            await asyncio.sleep(0.005)


async def test_a_watcher_on_one_replica_sees_every_replicas_writes_once_in_order(
        url: str) -> None:
    async with AsyncExitStack() as stack:
        a, b, c = await replicas(stack, url, 3)
        live = asyncio.create_task(collect(b, 0, 60))  # from now on
        replayed = asyncio.create_task(collect(c, 1, 30, prefix="documents"))
        await watching(b, 1)
        writes = [(a, b, c)[i % 3].write(create(f"{'documents' if i % 2 else 'notes'}/{i}"))
                  for i in range(60)]
        written = await asyncio.gather(*writes)
        seen = await live
        assert [v.revision for v in seen] == list(range(1, 61))
        by_revision = {v.revision: v for v in written}
        assert all(v == by_revision[v.revision] for v in seen)  # content and hashes alike
        under = await replayed
        assert [v.revision for v in under] == sorted(
            v.revision for v in written if v.name.startswith("documents/"))


async def test_a_replica_without_watchers_keeps_its_revision_current(url: str) -> None:
    async with AsyncExitStack() as stack:
        a, b = await replicas(stack, url, 2)
        for i in range(5):
            await a.write(create(f"documents/{i}"))
        async with asyncio.timeout(10):
            while b.hub.revision < 5:  # noqa: ASYNC110 (woken by NOTIFY, polled otherwise)
                await asyncio.sleep(0.01)
        # A watcher from "now" on B starts after revision 5: the next write is the first.
        task = asyncio.create_task(collect(b, 0, 1))
        await watching(b, 1)
        await a.write(create("documents/5"))
        assert [v.revision for v in await task] == [6]


async def test_request_ids_are_shared_by_every_replica(url: str) -> None:
    async with AsyncExitStack() as stack:
        a, b = await replicas(stack, url, 2)
        first = with_request_id(create("documents/1"), "r1", b"fingerprint-1")
        v1 = await a.write(first)
        again = await b.write(first)  # a retry through another replica: the first outcome
        assert (again.revision, again.etag) == (v1.revision, v1.etag)
        with pytest.raises(errors.IdempotencyKeyReused):
            await b.write(with_request_id(create("documents/1"), "r1", b"another"))
        # Checked before the precondition: a retried update is not a spurious mismatch.
        change = with_request_id(update("documents/1", pre=Precondition.of_etag(v1.etag)),
                                 "r2", b"fingerprint-2")
        v2 = await b.write(change)
        assert (await a.write(change)).etag == v2.etag
    assert (await check_ledger(url)).revision == 2
    assert postgres.fetchval(url, "SELECT count(*) FROM requests") == 2


async def test_request_ids_are_purged_after_the_ttl(url: str,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pg_backend, "PURGE_EVERY", 1)
    async with open_store(url, StoreOptions(request_id_ttl_s=0)) as store:
        await store.write(with_request_id(create("documents/1"), "r1", b"1"))
        await store.write(create("documents/2"))  # purges whatever is older than now
    assert postgres.fetchval(url, "SELECT count(*) FROM requests") == 0


# --- failures ----------------------------------------------------------------------------------


async def test_lost_connections_are_retried_and_the_follower_reconnects(url: str) -> None:
    async with AsyncExitStack() as stack:
        a, b = await replicas(stack, url, 2)
        v1 = await a.write(create("documents/1"))
        watcher = asyncio.create_task(collect(b, 0, 2))
        await watching(b, 1)
        # Every session of this ledger is cut: both pools, both listeners. (The test URLs name
        # their sessions after their schema: casledger keeps an application_name given there.)
        cut = postgres.fetchval(url, "SELECT count(pg_terminate_backend(pid)) FROM "
                                     "pg_stat_activity WHERE application_name = $1",
                                postgres.schema_of(url))
        assert cut >= 4
        v2 = await a.write(update("documents/1", pre=Precondition.of_etag(v1.etag)))
        v3 = await b.write(create("documents/2"))
        assert (v2.revision, v3.revision) == (2, 3)
        assert [v.revision for v in await watcher] == [2, 3]
        assert (await b.get("documents/1")).etag == v2.etag


async def test_an_unavailable_database_is_storage_unavailable(url: str) -> None:
    async with open_store(url) as store:
        await store.write(create("documents/1"))
        pg(store)._pool.terminate()  # every call now fails, as if the server were gone
        with pytest.raises(errors.StorageUnavailable, match="nothing was written"):
            await store.write(create("documents/2"))
        with pytest.raises(errors.StorageUnavailable):
            await store.get("documents/1")
    assert postgres.latest_revision(url) == 1


async def test_a_commit_whose_reply_is_lost_is_found_committed(
        url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """COMMIT succeeded but its reply was lost: the store learns the outcome from the versions
    table instead of reporting a failure (or writing twice)."""
    original = asyncpg.transaction.Transaction.commit
    lost: list[bool] = []

    async def commit_then_lose_the_reply(self: Any) -> None:
        await original(self)
        if not lost:
            lost.append(True)
            raise asyncpg.ConnectionDoesNotExistError("connection was closed in the middle of "
                                                      "operation")

    async with open_store(url) as store:
        monkeypatch.setattr(asyncpg.transaction.Transaction, "commit",
                            commit_then_lose_the_reply)
        written = await store.write(create("documents/1"))
        monkeypatch.undo()
        assert lost
        assert (written.revision, store.hub.revision) == (1, 1)
    assert (await check_ledger(url)).revision == 1


async def test_a_commit_that_failed_is_retried(url: str, monkeypatch: pytest.MonkeyPatch
                                               ) -> None:
    original = asyncpg.transaction.Transaction.commit
    failed: list[bool] = []

    async def fail_once(self: Any) -> None:
        if not failed:
            failed.append(True)
            await self.rollback()
            raise asyncpg.ConnectionDoesNotExistError("connection was closed")
        await original(self)

    async with open_store(url) as store:
        monkeypatch.setattr(asyncpg.transaction.Transaction, "commit", fail_once)
        written = await store.write(create("documents/1"))
        monkeypatch.undo()
        assert failed
        assert written.revision == 1
    assert (await check_ledger(url)).revision == 1


async def test_a_write_outlives_its_cancelled_caller(url: str) -> None:
    async with open_store(url) as store:
        task = asyncio.create_task(store.write(create("documents/1")))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await pg(store).drain()
    assert postgres.latest_revision(url) == 1
    assert model.verify_chain_link(await _get(url, "documents/1"))


async def test_a_cancelled_connect_finishes_and_closes_quietly(url: str) -> None:
    """A pooled connection opened under a cancelled read completes its handshake on its own
    and is closed: no asyncio error about a future nobody read, no session left behind."""
    loop = asyncio.get_running_loop()
    failures: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: failures.append(context))
    try:
        # Cancelled at different points of the handshake (plain asyncpg.connect fails this).
        cancelled = 0
        for delay in (0.0005, 0.001, 0.002, 0.003) * 3:
            task = asyncio.create_task(pg_backend._shielded_connect(url))
            await asyncio.sleep(delay)
            if not task.cancel():  # a fast server: connected before the cancel
                await (await task).close()
                continue
            cancelled += 1
            with pytest.raises(asyncio.CancelledError):
                await task
        await asyncio.sleep(0.5)
        assert cancelled
    finally:
        loop.set_exception_handler(None)
    assert failures == []
    left = postgres.fetchval(url, "SELECT count(*) FROM pg_stat_activity "
                                  "WHERE application_name = $1", postgres.schema_of(url))
    assert left == 0


async def _get(url: str, name: str) -> Version:
    async with open_store(url) as store:
        return await store.get(name)


@pytest.fixture
async def store(url: str) -> AsyncIterator[PostgresStore]:
    async with open_store(url) as opened:
        yield pg(opened)


async def test_reads_match_sqlite_semantics(store: PostgresStore) -> None:
    v1 = await store.write(create("documents/a"))
    await store.write(create("documents/b"))
    await store.write(create("documentsX/c"))
    await store.write(Write(kind=WriteKind.DELETE, name="documents/b",
                            precondition=Precondition.of_exists(True)))
    assert [v.name for v in await store.list_resources("documents", 10, None)] == ["documents/a"]
    with pytest.raises(errors.ResourceNotFound) as gone:
        await store.get("documents/b")
    assert gone.value.metadata().get("deleted_at_version") == "2"
    history = await store.list_versions("documents/b", 10, None, False)
    assert [(v.version, v.deleted, v.content) for v in history] == [(1, False, b""),
                                                                    (2, True, b"")]
    assert [v.revision for v in await store.read_revisions(0, 4, "documents", 10)] == [1, 2, 4]
    assert (await store.get("documents/a", 1)).etag == v1.etag
    assert await store.sizes() == {"resources": 3, "live_resources": 2, "versions": 4,
                                   "tombstones": 1, "bytes": 21}


def test_urls_channels_and_session_settings() -> None:
    assert redact("postgresql://app:s3cret@db/x?sslmode=require") == \
        "postgresql://app:***@db/x?sslmode=require"
    assert redact("postgresql://app@db/x") == "postgresql://app@db/x"
    assert pg_backend.channel_for("public") == "casledger_commits"
    assert pg_backend.channel_for("tenant_a") == "casledger_commits_tenant_a"
    long = "s" * 60
    assert len(pg_backend.channel_for(long).encode()) <= 63
    assert pg_backend.channel_for(long) != pg_backend.channel_for(long + "t")
    assert pg_backend.server_settings(Durability.FULL)["application_name"] == "casledger"
    named = pg_backend.server_settings(Durability.NORMAL, "postgresql://db/x?application_name=r1")
    assert "application_name" not in named  # the URL's own name is kept
    assert named["synchronous_commit"] == "off"
