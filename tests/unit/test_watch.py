"""Unit tests for service/watch.py: replay from the store, then live, with no gap and no duplicate.

The store here is a list of versions in memory; its `read` honours the ReadRevisions contract
(after < revision <= upto, under prefix, at most limit, in order) and can run a hook while it
"reads", to publish new commits exactly when a real store would be busy.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, aclosing

import pytest

from casledger.service import errors, watch
from casledger.service.model import Version, compute_hash, matches_prefix
from casledger.service.watch import WatchHub

T0 = 1_700_000_000_000_000


class FakeStore:
    """Versions in memory; `append` commits one and publishes it to the hub, as a store does."""

    def __init__(self, *, max_queued: int = 1024) -> None:
        self.versions: list[Version] = []
        self.hub = WatchHub(0, max_queued=max_queued)
        self.reads: list[tuple[int, int, str, int]] = []
        # Run (once each, in order) at the start of a read: what commits "while reading".
        self.during_read: list[Callable[[], object]] = []

    def append(self, name: str) -> Version:
        revision = len(self.versions) + 1
        previous = [v for v in self.versions if v.name == name]
        v = Version(
            name=name, version=len(previous) + 1, revision=revision,
            content=b'{"r":%d}' % revision, content_type="application/json",
            create_time_us=T0, update_time_us=T0 + revision, actor="anonymous", reason="",
            deleted=False, previous_hash=previous[-1].hash if previous else b"",
            ledger_previous_hash=self.versions[-1].hash if self.versions else b"", hash=b"",
            size=8,
        )
        v = dataclasses.replace(v, hash=compute_hash(v))
        self.versions.append(v)
        self.hub.publish([v])
        return v

    def extend(self, *names: str) -> list[Version]:
        return [self.append(name) for name in names]

    async def read(self, after: int, upto: int, prefix: str, limit: int) -> list[Version]:
        self.reads.append((after, upto, prefix, limit))
        if self.during_read:
            self.during_read.pop(0)()
        await asyncio.sleep(0)  # a real read yields to the loop
        found = [v for v in self.versions
                 if after < v.revision <= upto and matches_prefix(v.name, prefix)]
        return found[:limit]

    def watch(self, prefix: str = "", start_revision: int = 0) -> AsyncIterator[Version]:
        return watch.watch(self.hub, self.read, prefix, start_revision)


def revisions(versions: list[Version]) -> list[int]:
    return [v.revision for v in versions]


async def take(stream: AsyncIterator[Version], n: int) -> list[Version]:
    return [await anext(stream) for _ in range(n)]


async def until(condition: Callable[[], bool]) -> None:
    """Let other tasks run until `condition` holds (bounded by turns of the loop, not time)."""
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("the condition never held")


async def next_live(store: FakeStore, stream: AsyncIterator[Version], *names: str,
                    count: int | None = None) -> list[Version]:
    """Wait until the watcher listens, commit `names`, and take `count` (default: as many)."""
    first = asyncio.ensure_future(anext(stream))
    await until(lambda: store.hub.watchers > 0)
    await asyncio.sleep(0)
    store.extend(*names)
    return [await first, *await take(stream, (len(names) if count is None else count) - 1)]


async def test_replay_then_live() -> None:
    store = FakeStore()
    store.extend(*(f"documents/{i}" for i in range(5)))
    async with aclosing(store.watch(start_revision=1)) as stream:
        assert revisions(await take(stream, 5)) == [1, 2, 3, 4, 5]
        assert revisions(await next_live(store, stream, "documents/9")) == [6]
        # Committed while nobody was waiting on the stream: queued, not lost.
        store.extend("documents/1", "documents/2")
        assert revisions(await take(stream, 2)) == [7, 8]


async def test_replay_starts_at_the_given_revision_inclusive() -> None:
    store = FakeStore()
    store.extend(*(f"documents/{i}" for i in range(5)))
    async with aclosing(store.watch(start_revision=4)) as stream:
        assert revisions(await take(stream, 2)) == [4, 5]
        assert revisions(await next_live(store, stream, "documents/0")) == [6]


async def test_start_revision_zero_is_from_now_on() -> None:
    store = FakeStore()
    store.extend("documents/1", "documents/2", "documents/3")
    async with aclosing(store.watch(start_revision=0)) as stream:
        assert revisions(await next_live(store, stream, "documents/4", "documents/5")) == [4, 5]
    assert store.reads == []  # nothing to replay


async def test_a_start_revision_in_the_future_skips_to_it() -> None:
    store = FakeStore()
    store.extend("documents/1", "documents/2")
    async with aclosing(store.watch(start_revision=5)) as stream:
        got = await next_live(store, stream, *(f"documents/{i}" for i in range(3, 9)), count=4)
    assert revisions(got) == [5, 6, 7, 8]  # 3 and 4 were skipped, not sent


async def test_commits_during_replay_arrive_once_and_in_order() -> None:
    store = FakeStore()
    store.extend("documents/1", "documents/2", "documents/3")
    store.during_read.append(lambda: store.extend("documents/4", "documents/5"))
    async with aclosing(store.watch(start_revision=1)) as stream:
        got = await take(stream, 5)
        got += await next_live(store, stream, "documents/6")
    assert revisions(got) == [1, 2, 3, 4, 5, 6]
    # The replay stopped at the subscription point; 4 and 5 came from the live queue.
    assert [(after, upto) for after, upto, _, _ in store.reads] == [(0, 3)]


async def test_replay_in_batches_with_commits_between_batches(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(watch, "REPLAY_BATCH", 2)
    store = FakeStore()
    store.extend(*(f"documents/{i}" for i in range(1, 8)))
    for i in range(4):
        store.during_read.append(lambda i=i: store.append(f"documents/new{i}"))
    async with aclosing(store.watch(start_revision=1)) as stream:
        got = await take(stream, 11)
        got += await next_live(store, stream, "documents/last")
    assert revisions(got) == list(range(1, 13))
    assert [(after, upto) for after, upto, _, _ in store.reads] == [
        (0, 7), (2, 7), (4, 7), (6, 7)]
    assert all(limit == 2 for *_, limit in store.reads)


async def test_prefix_filters_replay_and_live_on_whole_segments() -> None:
    store = FakeStore()
    store.extend("documents/1", "documentsX/1", "projects/p/documents/2", "documents/2")
    async with aclosing(store.watch("documents", start_revision=1)) as stream:
        replayed = await take(stream, 2)
        live = await next_live(store, stream, "documentsX/2", "notes/1", "documents/1", count=1)
    assert [(v.revision, v.name) for v in replayed] == [(1, "documents/1"), (4, "documents/2")]
    assert [(v.revision, v.name) for v in live] == [(7, "documents/1")]
    assert {prefix for _, _, prefix, _ in store.reads} == {"documents"}


async def test_overflow_during_replay_resubscribes_and_continues_from_the_store() -> None:
    store = FakeStore(max_queued=2)
    store.extend("documents/1", "documents/2", "documents/3")
    # Five commits while the first replay reads: more than the queue holds.
    store.during_read.append(lambda: store.extend(*(f"documents/{i}" for i in range(4, 9))))
    async with aclosing(store.watch(start_revision=1)) as stream:
        got = await take(stream, 8)
        got += await next_live(store, stream, "documents/9")
    assert revisions(got) == list(range(1, 10))
    # The second replay picked up exactly where the first stopped, up to the new subscription.
    assert [(after, upto) for after, upto, _, _ in store.reads] == [(0, 3), (3, 8)]
    assert store.hub.watchers == 0


async def test_overflow_while_live_ends_with_watcher_too_slow() -> None:
    store = FakeStore(max_queued=2)
    store.extend("documents/1", "documents/2", "documents/3")
    async with aclosing(store.watch(start_revision=2)) as stream:
        assert revisions(await take(stream, 2)) == [2, 3]
        assert revisions(await next_live(store, stream, "documents/4", "documents/5",
                                         "documents/6", count=2)) == [4, 5]
        with pytest.raises(errors.WatcherTooSlow) as caught:
            await anext(stream)
    # Everything before the resume point was sent; the first one dropped is where to resume.
    assert caught.value.resume_revision == 6
    assert caught.value.metadata() == {"resume_revision": "6"}
    assert store.hub.watchers == 0
    async with aclosing(store.watch(start_revision=caught.value.resume_revision)) as stream:
        assert revisions(await take(stream, 1)) == [6]
        assert revisions(await next_live(store, stream, "documents/7")) == [7]


async def test_overflow_while_suspended_resumes_at_the_first_unsent() -> None:
    store = FakeStore(max_queued=2)
    async with aclosing(store.watch()) as stream:
        assert revisions(await next_live(store, stream, "documents/1")) == [1]
        # The watcher sits on an unconsumed yield while three more commit; the queue overflows.
        store.extend("documents/2", "documents/3", "documents/4")
        with pytest.raises(errors.WatcherTooSlow) as caught:
            await anext(stream)
    assert caught.value.resume_revision == 2
    async with aclosing(store.watch(start_revision=2)) as stream:
        assert revisions(await take(stream, 3)) == [2, 3, 4]


async def test_resume_revision_counts_skipped_revisions_as_considered() -> None:
    store = FakeStore(max_queued=2)
    async with aclosing(store.watch(start_revision=10)) as stream:
        waiting = asyncio.ensure_future(anext(stream))
        await until(lambda: store.hub.watchers > 0)
        await asyncio.sleep(0)
        store.extend("documents/1", "documents/2", "documents/3")  # 1 and 2 queued, 3 dropped
        with pytest.raises(errors.WatcherTooSlow) as caught:
            await waiting
    # Nothing before 10 was wanted, so nothing before 10 needs replaying.
    assert caught.value.resume_revision == 10


async def test_only_matching_versions_count_against_the_queue() -> None:
    store = FakeStore(max_queued=2)
    async with aclosing(store.watch("notes")) as stream:
        got = await next_live(store, stream, *(f"documents/{i}" for i in range(10)), "notes/1",
                              count=1)
    assert [(v.revision, v.name) for v in got] == [(11, "notes/1")]


async def test_many_watchers_each_see_every_version_once() -> None:
    store = FakeStore()
    store.extend("documents/1", "notes/1")
    async with AsyncExitStack() as stack:
        streams = [await stack.enter_async_context(aclosing(s)) for s in (
            store.watch(start_revision=1), store.watch("documents", start_revision=1),
            store.watch("notes", start_revision=2))]
        firsts = [await anext(s) for s in streams]
        assert revisions(firsts) == [1, 1, 2]
        assert store.hub.watchers == 3
        store.extend("documents/2", "notes/2", "documents/1")
        assert revisions(await take(streams[0], 4)) == [2, 3, 4, 5]
        assert revisions(await take(streams[1], 2)) == [3, 5]
        assert revisions(await take(streams[2], 1)) == [4]
    assert store.hub.watchers == 0


async def test_hub_tracks_the_last_published_revision() -> None:
    hub = WatchHub(7)
    assert hub.revision == 7
    store = FakeStore()
    v1, v2 = store.extend("documents/1", "documents/2")
    hub.publish([v1])
    assert hub.revision == 7  # never goes back
    store.extend(*(f"documents/{i}" for i in range(3, 10)))
    hub.publish(store.versions[-2:])
    assert hub.revision == 9
    with hub.subscribe("") as subscription:
        assert subscription.start_revision == 9
        assert hub.watchers == 1
    assert hub.watchers == 0
    assert v2.revision == 2


async def test_closing_the_stream_releases_its_subscription() -> None:
    store = FakeStore()
    store.extend("documents/1")
    async with aclosing(store.watch(start_revision=1)) as stream:
        await take(stream, 1)
        assert store.hub.watchers == 1
    assert store.hub.watchers == 0
    store.extend("documents/2")  # publishing to nobody is fine
