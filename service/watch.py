"""Fan-out of committed versions to watchers: replay from the store, then live, in order.

The store is the truth; the hub only wakes watchers and hands them what was just committed. A
watcher subscribes first, then replays from the store up to the revision the hub had reached at
that moment, then takes live versions from its own bounded queue, skipping any revision it has
already sent. So the stream has no gap (everything after the subscription point is queued) and no
duplicate (revisions only go up). A watcher whose queue fills while it is live is ended with
:class:`~casledger.service.errors.WatcherTooSlow` naming the revision to resume from, instead of
holding an unbounded backlog in memory; one that overflows while still replaying simply
re-subscribes and keeps replaying from the store.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from contextlib import contextmanager

from . import errors
from .model import Version, matches_prefix

# (after, upto, prefix, limit) -> versions with after < revision <= upto under prefix, in order.
ReadRevisions = Callable[[int, int, str, int], Awaitable[list[Version]]]

REPLAY_BATCH = 256


class Subscription:
    """One watcher's bounded queue of live versions."""

    def __init__(self, prefix: str, start_revision: int, max_queued: int) -> None:
        self.prefix = prefix
        self.start_revision = start_revision
        self.overflowed = False
        self.closed = False
        self._max = max_queued
        self._queue: deque[Version] = deque()
        self._ready = asyncio.Event()

    def offer(self, version: Version) -> None:
        if not matches_prefix(version.name, self.prefix) or self.overflowed:
            return
        if len(self._queue) >= self._max:
            self.overflowed = True
        else:
            self._queue.append(version)
        self._ready.set()

    def close(self) -> None:
        self.closed = True
        self._ready.set()

    async def take(self) -> list[Version]:
        """Wait for live versions and take all that are queued."""
        await self._ready.wait()
        self._ready.clear()
        taken = list(self._queue)
        self._queue.clear()
        return taken


class WatchHub:
    """Knows the last published revision and the live subscriptions."""

    def __init__(self, revision: int, *, max_queued: int = 1024) -> None:
        self.revision = revision
        self.max_queued = max_queued
        self._subscriptions: set[Subscription] = set()
        self.closed = False

    @property
    def watchers(self) -> int:
        return len(self._subscriptions)

    @property
    def overflowed(self) -> int:
        """Watchers whose queue filled: no longer queued for, ended at their next read."""
        # list() copies the set in one step: a metrics scrape may read this from its thread.
        return sum(1 for subscription in list(self._subscriptions) if subscription.overflowed)

    def publish(self, versions: Iterable[Version]) -> None:
        """Hand committed versions, in revision order, to every subscription. Never blocks."""
        for version in versions:
            self.revision = max(self.revision, version.revision)
            for subscription in self._subscriptions:
                subscription.offer(version)

    def close(self) -> None:
        """End every watcher (the service is stopping): each gets its resume revision."""
        self.closed = True
        for subscription in self._subscriptions:
            subscription.close()

    @contextmanager
    def subscribe(self, prefix: str) -> Iterator[Subscription]:
        # Synchronous: no other coroutine can publish between reading `revision` and joining.
        subscription = Subscription(prefix, self.revision, self.max_queued)
        if self.closed:
            subscription.close()
        self._subscriptions.add(subscription)
        try:
            yield subscription
        finally:
            self._subscriptions.discard(subscription)


async def watch(
    hub: WatchHub, read: ReadRevisions, prefix: str, start_revision: int
) -> AsyncIterator[Version]:
    """Every version under `prefix` from `start_revision` (0 = from now on), in revision order."""
    last = hub.revision if start_revision == 0 else start_revision - 1
    while True:
        with hub.subscribe(prefix) as subscription:
            while last < subscription.start_revision and not subscription.overflowed:
                batch = await read(last, subscription.start_revision, prefix, REPLAY_BATCH)
                for version in batch:
                    yield version
                if len(batch) < REPLAY_BATCH:
                    last = subscription.start_revision
                else:
                    last = batch[-1].revision
            if subscription.overflowed:
                continue  # fell behind while replaying: replay more from the store
            while True:
                for version in await subscription.take():
                    if version.revision > last:
                        yield version
                        last = version.revision
                if subscription.overflowed:
                    raise errors.WatcherTooSlow(resume_revision=last + 1)
                if subscription.closed:
                    raise errors.ShuttingDown(resume_revision=last + 1)
