"""The bridge's read path (``http_bridge/readindex.py``) against fakes: the read-index rounds (a
read that arrives during a call waits for the next one), the cache's bounds, version-monotonic
updates, answers of fetches racing the watch, gaps, and the fallbacks."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any, cast

import grpc
import pytest

from casledger.http_bridge.metrics import BridgeMetrics
from casledger.http_bridge.readindex import (
    Absent,
    HeadCache,
    ReadCache,
    ReadIndex,
    ReadIndexUnavailable,
    answer,
    size_of,
)
from casledger.service.api.casledger.v1 import ledger_pb2 as pb
from casledger.service.client import LedgerCallError, call_metadata


def res(name: str, version: int, revision: int, *, deleted: bool = False,
        content: bytes = b"{}", chain: str = "h") -> pb.Resource:
    """A version whose hashes chain by revision (``h1``, ``h2``, ...)."""
    return pb.Resource(
        name=name, version=version, revision=revision, deleted=deleted,
        content=b"" if deleted else content, content_type="application/json",
        etag=f'"{version}-{revision}"', hash=f"{chain}{revision}",
        ledger_previous_hash=f"{chain}{revision - 1}" if revision > 1 else "")


def not_found(name: str) -> LedgerCallError:
    return LedgerCallError.not_found(name)


# --- read-index rounds ----------------------------------------------------------------------


class Calls:
    """A GetRevision whose calls each wait until the test releases them."""

    def __init__(self) -> None:
        self.started: list[asyncio.Future[int]] = []
        self.metadata: list[tuple[tuple[str, str], ...]] = []
        self.began = asyncio.Event()

    async def __call__(self) -> int:
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.started.append(future)
        self.metadata.append(call_metadata.get())
        self.began.set()
        return await future

    async def next_call(self, count: int) -> asyncio.Future[int]:
        async with asyncio.timeout(5):
            while len(self.started) < count:
                self.began.clear()
                await self.began.wait()
        return self.started[count - 1]


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_reads_that_join_before_a_call_starts_share_it() -> None:
    calls = Calls()
    index = ReadIndex(calls)
    readers = [asyncio.create_task(index.revision()) for _ in range(5)]
    (await calls.next_call(1)).set_result(7)

    assert await asyncio.gather(*readers) == [7] * 5
    assert len(calls.started) == 1


async def test_a_read_arriving_during_a_call_waits_for_the_next_one() -> None:
    calls = Calls()
    index = ReadIndex(calls)
    first = asyncio.create_task(index.revision())
    in_flight = await calls.next_call(1)
    # Arrive while call 1 is in flight: its answer may predate a write they must see.
    late = [asyncio.create_task(index.revision()) for _ in range(3)]
    await settle()
    in_flight.set_result(10)
    assert await first == 10
    await settle()
    assert not any(task.done() for task in late)  # not served by call 1

    (await calls.next_call(2)).set_result(12)

    assert await asyncio.gather(*late) == [12] * 3
    assert len(calls.started) == 2  # one call for every read that waited


async def test_one_call_in_flight_at_a_time() -> None:
    calls = Calls()
    index = ReadIndex(calls)
    tasks = [asyncio.create_task(index.revision())]
    for round_ in range(1, 4):
        call = await calls.next_call(round_)
        tasks.append(asyncio.create_task(index.revision()))
        await settle()
        assert len(calls.started) == round_
        call.set_result(round_)
    (await calls.next_call(4)).set_result(4)

    assert await asyncio.gather(*tasks) == [1, 2, 3, 4]


async def test_a_failed_call_fails_its_round_only() -> None:
    calls = Calls()
    index = ReadIndex(calls)
    failing = asyncio.create_task(index.revision())
    (await calls.next_call(1)).set_exception(
        LedgerCallError(grpc.StatusCode.UNAVAILABLE, "down"))
    with pytest.raises(LedgerCallError):
        await failing

    after = asyncio.create_task(index.revision())
    (await calls.next_call(2)).set_result(3)
    assert await after == 3


async def test_a_cancelled_reader_leaves_its_round_to_the_others() -> None:
    calls = Calls()
    index = ReadIndex(calls)
    gone, staying = (asyncio.create_task(index.revision()) for _ in range(2))
    call = await calls.next_call(1)
    gone.cancel()
    await settle()
    call.set_result(5)

    assert await staying == 5
    assert gone.cancelled()


async def test_the_call_carries_no_metadata_of_the_read_that_started_it() -> None:
    calls = Calls()
    index = ReadIndex(calls)

    async def read_with_credentials() -> int:
        call_metadata.set((("authorization", "Bearer secret"),))
        return await index.revision()

    reader = asyncio.create_task(read_with_credentials())
    (await calls.next_call(1)).set_result(1)
    await reader

    assert calls.metadata == [()]


async def test_closing_fails_the_waiting_reads() -> None:
    calls = Calls()
    index = ReadIndex(calls)
    waiting = asyncio.create_task(index.revision())
    await calls.next_call(1)
    queued = asyncio.create_task(index.revision())
    await settle()
    await index.close()

    for task in (waiting, queued):
        with pytest.raises(ReadIndexUnavailable):
            await task


# --- the cache --------------------------------------------------------------------------------


def cache(entries: int = 100, size: int = 1 << 20, applied: int = 0) -> HeadCache:
    heads = HeadCache(max_entries=entries, max_bytes=size)
    heads.reset(applied)
    return heads


def fill(heads: HeadCache, names: list[str]) -> None:
    for name in names:
        heads.apply(res(name, 1, heads.applied + 1))


def test_least_recently_used_heads_go_first_past_the_entry_bound() -> None:
    heads = cache(entries=3)
    fill(heads, ["c/a", "c/b", "c/c"])
    assert heads.lookup("c/a") is not None  # used: now the most recent
    fill(heads, ["c/d"])

    assert len(heads) == 3
    assert "c/b" not in heads
    assert all(name in heads for name in ("c/a", "c/c", "c/d"))


def test_the_byte_bound_holds_however_many_versions_are_written() -> None:
    content = b'"' + b"x" * 1000 + b'"'
    one = size_of("c/000", res("c/000", 1, 1, content=content))
    heads = cache(entries=10_000, size=one * 5)
    for i in range(200):
        heads.apply(res(f"c/{i:03}", 1, i + 1, content=content))
        assert heads.bytes <= heads.max_bytes

    assert 4 <= len(heads) <= 5  # later revisions have longer hashes: a few bytes more
    assert "c/199" in heads
    assert "c/000" not in heads
    assert heads.applied == 200


def test_a_head_larger_than_the_bound_is_not_kept_and_drops_the_older_one() -> None:
    heads = cache(size=2000)
    heads.apply(res("c/a", 1, 1))
    heads.apply(res("c/a", 2, 2, content=b'"' + b"x" * 5000 + b'"'))

    assert "c/a" not in heads  # never the stale version 1
    assert heads.bytes == 0


def test_a_head_is_only_replaced_by_a_higher_version() -> None:
    heads = cache()
    heads.apply(res("c/a", 1, 1))
    heads.apply(res("c/a", 2, 2))
    fetch = heads.begin_fetch("c/a")
    heads.end_fetch("c/a", fetch, res("c/a", 1, 1))  # an older answer arrives late
    absent = heads.begin_fetch("c/b")
    heads.apply(res("c/b", 1, 3))  # created while the read that found nothing was answered
    heads.end_fetch("c/b", absent, Absent.of(not_found("c/b")))

    assert heads.lookup("c/a") == res("c/a", 2, 2)
    assert heads.lookup("c/b") == res("c/b", 1, 3)


def test_a_deletion_and_a_recreation_replace_the_head_in_turn() -> None:
    heads = cache()
    heads.apply(res("c/a", 1, 1))
    heads.apply(res("c/a", 2, 2, deleted=True))
    tombstone = heads.lookup("c/a")
    assert tombstone is not None
    with pytest.raises(LedgerCallError) as gone:
        answer("c/a", tombstone)
    heads.apply(res("c/a", 3, 3))

    assert (gone.value.reason, gone.value.metadata) == (
        "NOT_FOUND", {"name": "c/a", "deleted_at_version": "2"})
    assert gone.value.message == "c/a was deleted at version 2"
    assert heads.lookup("c/a") == res("c/a", 3, 3)


def test_an_absent_name_answers_the_services_own_error_each_time() -> None:
    heads = cache()
    error = LedgerCallError(grpc.StatusCode.NOT_FOUND, "c/x does not exist", "NOT_FOUND",
                            {"name": "c/x"})
    fetch = heads.begin_fetch("c/x")
    heads.end_fetch("c/x", fetch, Absent.of(error))
    head = heads.lookup("c/x")
    assert head is not None

    raised = []
    for _ in range(2):
        with pytest.raises(LedgerCallError) as info:
            answer("c/x", head)
        raised.append(info.value)
    assert raised[0] is not raised[1]  # a fresh exception: tracebacks never pile up
    assert all((e.code, e.message, e.reason, e.metadata) ==
               (error.code, error.message, error.reason, error.metadata) for e in raised)


def test_a_fetch_answer_older_than_an_evicted_watch_version_is_not_cached() -> None:
    heads = cache(entries=2)
    fetch = heads.begin_fetch("c/a")  # GetResource for c/a, answered with version 1 ...
    heads.apply(res("c/a", 2, 1))  # ... while the watch brings version 2 ...
    fill(heads, ["c/b", "c/c"])  # ... whose head is evicted before the answer arrives
    assert "c/a" not in heads
    heads.end_fetch("c/a", fetch, res("c/a", 1, 0))

    assert heads.lookup("c/a") == res("c/a", 2, 1)


def test_concurrent_fetches_of_one_name_share_what_the_watch_brought() -> None:
    heads = cache(entries=1)
    first, second = heads.begin_fetch("c/a"), heads.begin_fetch("c/a")
    heads.apply(res("c/a", 1, 1))
    fill(heads, ["c/b"])
    heads.end_fetch("c/a", first, None)  # failed: still, the watch's version 1 is known
    heads.end_fetch("c/a", second, Absent.of(not_found("c/a")))

    assert heads.lookup("c/a") == res("c/a", 1, 1)


def test_a_gap_clears_the_cache_and_drops_fetches_in_flight() -> None:
    heads = cache()
    fill(heads, ["c/a", "c/b"])
    fetch = heads.begin_fetch("c/z")
    assert not heads.apply(res("c/c", 1, 5))  # revisions 3 and 4 never arrived

    heads.end_fetch("c/z", fetch, res("c/z", 1, 2))
    assert heads.applied == 5
    assert "c/a" not in heads
    assert "c/z" not in heads  # it may predate a version of c/z in the gap
    assert heads.lookup("c/c") == res("c/c", 1, 5)
    assert heads.apply(res("c/d", 1, 6))


def test_another_ledgers_history_is_a_gap_too() -> None:
    heads = cache()
    fill(heads, ["c/a"])

    assert not heads.apply(res("c/b", 1, 2, chain="other"))
    assert "c/a" not in heads


# --- the read path, over a fake ledger --------------------------------------------------------


class FakeStream:
    def __init__(self, queue: asyncio.Queue[pb.Resource | LedgerCallError]) -> None:
        self.queue = queue
        self.closed = False

    async def __aiter__(self) -> AsyncIterator[pb.WatchEvent]:
        while True:
            item = await self.queue.get()
            if isinstance(item, LedgerCallError):
                raise item
            yield pb.WatchEvent(resource=item)

    def close(self) -> None:
        self.closed = True


class FakeLedger:
    """GetRevision answers `revision`; each Watch streams what the test puts in its queue."""

    def __init__(self, revision: int = 0) -> None:
        self.revision_value = revision
        self.revision_calls = 0
        self.watches: list[tuple[int, asyncio.Queue[pb.Resource | LedgerCallError]]] = []
        self.refuse: LedgerCallError | None = None
        self.opened = asyncio.Event()
        self.gate = asyncio.Event()  # cleared: a Watch waits before it is accepted
        self.gate.set()

    async def revision(self) -> int:
        self.revision_calls += 1
        if self.refuse is not None:
            raise self.refuse
        return self.revision_value

    async def open_watch(self, prefix: str = "", start_revision: int = 0) -> FakeStream:
        assert prefix == ""
        if self.refuse is not None:
            raise self.refuse
        await self.gate.wait()
        queue: asyncio.Queue[pb.Resource | LedgerCallError] = asyncio.Queue()
        self.watches.append((start_revision, queue))
        self.opened.set()
        return FakeStream(queue)

    def commit(self, resource: pb.Resource) -> None:
        self.revision_value = resource.revision
        self.watches[-1][1].put_nowait(resource)


async def until(condition: Any) -> None:
    async with asyncio.timeout(5):
        while not condition():  # noqa: ASYNC110 (the state changes have no event)
            await asyncio.sleep(0.001)


class Fetches:
    """The ordinary GetResource, counted."""

    def __init__(self, answer: pb.Resource | LedgerCallError) -> None:
        self.answer = answer
        self.calls = 0

    async def __call__(self) -> pb.Resource:
        self.calls += 1
        if isinstance(self.answer, LedgerCallError):
            raise self.answer
        return self.answer


async def open_cache(ledger: FakeLedger, wait_s: float = 1.0,
                     idle_s: float | None = None) -> ReadCache:
    reads = ReadCache(cast(Any, ledger), max_entries=100, max_bytes=1 << 20, wait_s=wait_s,
                      idle_s=idle_s)
    reads.start()
    await until(lambda: reads.following)
    return reads


async def test_a_read_is_answered_once_the_cache_has_applied_the_read_index() -> None:
    ledger = FakeLedger(revision=0)
    reads = await open_cache(ledger)
    try:
        assert ledger.watches[0][0] == 1  # GetRevision said 0: watch from 1
        fetch = Fetches(LedgerCallError(grpc.StatusCode.UNAVAILABLE, "not called"))
        ledger.revision_value = 1  # committed, not yet seen by the watch
        read = asyncio.create_task(reads.get("c/a", fetch))
        await settle()
        assert not read.done()
        ledger.commit(res("c/a", 1, 1))

        assert await read == res("c/a", 1, 1)
        assert fetch.calls == 0
    finally:
        await reads.stop()


async def test_a_miss_asks_the_service_and_keeps_its_answer() -> None:
    ledger = FakeLedger(revision=0)
    reads = await open_cache(ledger)
    try:
        absent = Fetches(not_found("c/a"))
        for _ in range(2):
            with pytest.raises(LedgerCallError) as info:
                await reads.get("c/a", absent)
            assert info.value.reason == "NOT_FOUND"
        ledger.commit(res("c/a", 1, 1))
        assert await reads.get("c/a", absent) == res("c/a", 1, 1)

        assert absent.calls == 1  # the second read and the third came from the cache
    finally:
        await reads.stop()


async def test_a_lagging_cache_falls_back_after_the_wait_then_without_waiting() -> None:
    ledger = FakeLedger(revision=0)
    reads = await open_cache(ledger, wait_s=0.05)
    try:
        ledger.revision_value = 3  # written, but the watch brings nothing yet
        fetch = Fetches(res("c/a", 1, 3))

        assert await reads.get("c/a", fetch) == res("c/a", 1, 3)
        assert fetch.calls == 1
        assert "c/a" not in reads.heads  # a fallback's answer is not cached
        rounds = ledger.revision_calls
        started = asyncio.get_running_loop().time()
        assert await reads.get("c/a", fetch) == res("c/a", 1, 3)
        assert asyncio.get_running_loop().time() - started < 0.05  # no second wait ...
        assert ledger.revision_calls == rounds  # ... nor a round

        for resource in (res("c/b", 1, 1), res("c/b", 2, 2), res("c/a", 1, 3)):
            ledger.commit(resource)
        await until(lambda: reads.heads.applied == 3)
        assert await reads.get("c/a", fetch) == res("c/a", 1, 3)
        assert fetch.calls == 2  # caught up: from the cache again
    finally:
        await reads.stop()


async def test_credentials_always_go_to_the_service() -> None:
    ledger = FakeLedger(revision=0)
    reads = await open_cache(ledger)
    try:
        ledger.commit(res("c/a", 1, 1))
        await until(lambda: reads.heads.applied == 1)
        fetch = Fetches(LedgerCallError(grpc.StatusCode.PERMISSION_DENIED, "no",
                                        "PERMISSION_DENIED"))
        calls = ledger.revision_calls

        with pytest.raises(LedgerCallError) as info:
            await reads.get("c/a", fetch, credentials=True)
        assert info.value.reason == "PERMISSION_DENIED"
        assert ledger.revision_calls == calls  # not even a read-index round
    finally:
        await reads.stop()


async def test_a_broken_watch_resumes_after_what_it_applied_and_keeps_the_cache() -> None:
    ledger = FakeLedger(revision=0)
    reads = await open_cache(ledger)
    try:
        ledger.commit(res("c/a", 1, 1))
        ledger.commit(res("c/b", 1, 2))
        await until(lambda: reads.heads.applied == 2)
        ledger.gate.clear()
        ledger.watches[-1][1].put_nowait(LedgerCallError(
            grpc.StatusCode.RESOURCE_EXHAUSTED, "too slow", "WATCHER_TOO_SLOW",
            {"resume_revision": "3"}))
        await until(lambda: not reads.following)
        # While it is down, reads go to the service.
        fetch = Fetches(res("c/a", 2, 3))
        assert await reads.get("c/a", fetch) == res("c/a", 2, 3)
        assert fetch.calls == 1
        ledger.gate.set()
        await until(lambda: reads.following)

        assert ledger.watches[-1][0] == 3
        assert "c/b" in reads.heads
    finally:
        await reads.stop()


async def test_a_ledger_that_went_back_clears_the_cache() -> None:
    ledger = FakeLedger(revision=0)
    reads = await open_cache(ledger)
    try:
        ledger.commit(res("c/a", 1, 1))
        ledger.commit(res("c/a", 2, 2))
        await until(lambda: reads.heads.applied == 2)
        # The service restarts on a restored backup, one revision behind.
        ledger.revision_value = 1
        ledger.watches[-1][1].put_nowait(LedgerCallError(grpc.StatusCode.UNAVAILABLE, "gone"))
        await until(lambda: len(ledger.watches) == 2 and reads.following)

        assert reads.heads.applied == 1
        assert "c/a" not in reads.heads  # never the version 2 the ledger no longer has
        assert ledger.watches[-1][0] == 2
        fetch = Fetches(res("c/a", 1, 1))
        assert await reads.get("c/a", fetch) == res("c/a", 1, 1)
        assert fetch.calls == 1
    finally:
        await reads.stop()


async def test_a_refused_cache_never_serves() -> None:
    ledger = FakeLedger(revision=0)
    ledger.refuse = LedgerCallError(grpc.StatusCode.UNAUTHENTICATED, "token", "UNAUTHENTICATED")
    reads = ReadCache(cast(Any, ledger), max_entries=10, max_bytes=1 << 20, wait_s=1.0)
    reads.start()
    try:
        await until(lambda: ledger.revision_calls >= 1)
        fetch = Fetches(res("c/a", 1, 1))

        assert await reads.get("c/a", fetch) == res("c/a", 1, 1)
        assert fetch.calls == 1
        assert not reads.following
        assert ledger.watches == []
    finally:
        await reads.stop()


async def test_the_watch_pauses_when_nobody_reads_and_the_next_read_restarts_it() -> None:
    ledger = FakeLedger(revision=0)
    reads = await open_cache(ledger, idle_s=0.05)
    try:
        ledger.commit(res("c/a", 1, 1))
        await until(lambda: reads.heads.applied == 1)
        await until(lambda: reads.paused and not reads.following)
        assert len(reads.heads) == 0  # forgotten ...
        assert not reads.heads.synced  # ... the revision too
        # Written while paused: nothing streams it to the bridge.
        ledger.revision_value = 5

        # The first read goes to the service and restarts the watch from where the ledger is.
        fetch = Fetches(res("c/a", 2, 5))
        metrics = BridgeMetrics()
        reads._metrics = metrics
        assert await reads.get("c/a", fetch) == res("c/a", 2, 5)
        assert fetch.calls == 1
        assert metrics.read_cache_fallbacks.labels("paused")._value.get() == 1
        await until(lambda: reads.following)
        assert not reads.paused
        assert [start for start, _ in ledger.watches] == [1, 6]
        assert reads.heads.applied == 5
        ledger.commit(res("c/b", 1, 6))
        assert await reads.get("c/b", fetch) == res("c/b", 1, 6)
        assert fetch.calls == 1  # from the cache again
    finally:
        await reads.stop()


async def test_pausing_and_resuming_log_at_debug_only(caplog: pytest.LogCaptureFixture) -> None:
    ledger = FakeLedger(revision=0)
    with caplog.at_level(logging.DEBUG, "casledger.bridge"):
        reads = await open_cache(ledger, idle_s=0.2)
        try:
            for _ in range(2):  # reads now and then: pause, resume, pause, resume
                await until(lambda: reads.paused)
                await reads.get("c/a", Fetches(res("c/a", 1, 1)))
                await until(lambda: reads.following)
        finally:
            await reads.stop()

    infos = [r.message for r in caplog.records if r.levelno >= logging.INFO]
    assert infos == ["read cache: following the ledger from revision 0"]  # the start only
    debug = [r.message for r in caplog.records if r.levelno == logging.DEBUG]
    assert sum("paused" in m for m in debug) == 2
    assert sum("following" in m for m in debug) == 2


async def test_reads_keep_the_watch_up() -> None:
    ledger = FakeLedger(revision=0)
    reads = await open_cache(ledger, idle_s=0.1)
    try:
        ledger.commit(res("c/a", 1, 1))
        fetch = Fetches(LedgerCallError(grpc.StatusCode.UNAVAILABLE, "not called"))
        for _ in range(8):  # 0.24 s of reads, each within the idle time of the one before
            assert await reads.get("c/a", fetch) == res("c/a", 1, 1)
            await asyncio.sleep(0.03)

        assert reads.following
        assert not reads.paused
        assert len(ledger.watches) == 1
        assert fetch.calls == 0
    finally:
        await reads.stop()


@pytest.mark.parametrize("idle_s", [None, 0.02])
async def test_stop_ends_a_paused_or_following_cache(idle_s: float | None) -> None:
    ledger = FakeLedger(revision=0)
    reads = await open_cache(ledger, idle_s=idle_s)
    await asyncio.sleep(0.1)
    assert reads.paused is (idle_s is not None)

    await reads.stop()
    fetch = Fetches(res("c/a", 1, 1))
    assert await reads.get("c/a", fetch) == res("c/a", 1, 1)
    await settle()
    assert not reads.following  # a stopped cache stays stopped
    assert len(ledger.watches) == 1


# --- settings --------------------------------------------------------------------------------


@pytest.mark.parametrize("on", [True, False])
def test_the_read_cache_settings_reach_the_bridge_process(on: bool) -> None:
    from casledger.http_bridge.app import BridgeSettings
    from casledger.service import cli
    from casledger.service.config import load

    given = BridgeSettings(read_cache=on, read_cache_entries=7, read_cache_bytes=4096,
                           read_cache_idle_s=0.5)
    args = cli.build_parser().parse_args(["bridge", *cli.bridge_command(given, "info")[3:]])
    bridge = load(BridgeSettings, {}, **cli._given(args, BridgeSettings))

    assert (bridge.read_cache, bridge.read_cache_entries, bridge.read_cache_bytes,
            bridge.read_cache_idle_s) == (on, 7, 4096, 0.5)


def test_the_read_cache_is_on_unless_turned_off() -> None:
    from casledger.http_bridge.app import BridgeSettings
    from casledger.service import cli
    from casledger.service.config import load

    def settings(argv: list[str], environ: dict[str, str]) -> BridgeSettings:
        args = cli.build_parser().parse_args(["bridge", *argv])
        return load(BridgeSettings, environ, **cli._given(args, BridgeSettings))

    assert settings([], {}).read_cache
    assert not settings(["--no-read-cache"], {}).read_cache
    assert not settings([], {"CASLEDGER_READ_CACHE": "0"}).read_cache
    assert settings(["--read-cache"], {"CASLEDGER_READ_CACHE": "0"}).read_cache
    serve = cli.build_parser().parse_args(["serve", "--no-read-cache"])
    assert serve.read_cache is False
    with pytest.raises(ValueError, match="read_cache_entries"):
        BridgeSettings(read_cache_entries=0)
    assert settings([], {}).read_cache_idle_s == 2.0
    assert settings([], {"CASLEDGER_READ_CACHE_IDLE_S": "0"}).read_cache_idle_s == 0.0
    for bad in (-1.0, float("nan"), 1e9):
        with pytest.raises(ValueError, match="read_cache_idle_s"):
            BridgeSettings(read_cache_idle_s=bad)
