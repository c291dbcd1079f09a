"""Linearizable reads at far fewer gRPC calls: a cache of resource heads and a read index.

A read of a current version (``GET``/``HEAD /v1/{name}``) would cost one GetResource call. The
bridge answers most of them from memory instead, without giving up linearizability (a read sees
every write acknowledged before it arrived), the way etcd serves reads:

- **The cache** (:class:`HeadCache`) holds the heads of names recently read or written — the
  whole ``Resource`` of each one's latest version, a tombstone too — bounded by entries and by
  bytes, the least recently used evicted first, so memory stays flat however long the history
  grows. One Watch of the whole ledger keeps it current: the bridge asks GetRevision (R0), then
  watches from R0 + 1. Its *applied* revision is the last one it has seen; the head it holds for
  a name is that name's latest version up to there (or a newer one), and a name it does not hold
  is asked for. A head is only ever replaced by a higher version of its name.
- **The read index** (:class:`ReadIndex`). A read joins the next round: one GetRevision call at a
  time, one call for every read waiting when it starts. A read that arrives while a call is in
  flight waits for the next one: a call that started before the read arrived may have been
  answered before a write the read must see was acknowledged. With the round's revision R, the
  read waits until the cache has applied R (at most ``wait_s``), then answers from the cache —
  or, for a name not in it, with an ordinary GetResource whose answer (NOT_FOUND too) joins the
  cache unless the watch has brought something newer meanwhile.
- **Pause when nobody reads.** Keeping the cache current costs both processes one streamed
  message per write. After ``idle_s`` without a read the cache can serve, it stops its watch and
  forgets what it held; the next such read goes to the service and starts the watch again (from
  the revision GetRevision gives then, the cache empty). ``idle_s`` None: never pause.
- **Fallback.** Whenever the cache cannot answer for sure, the read is an ordinary GetResource,
  exactly as without a cache: the watch not established or broken (it reconnects with backoff,
  resuming from applied + 1; a gap in what it receives clears the cache), GetRevision failed or
  was refused, the wait ran out (and then, until the cache has caught up with that read's
  revision, without waiting at all). A request that carries an ``Authorization`` header always goes
  the ordinary way: the bridge has no credentials of its own and checks none, the service decides
  who may read what, and only a call made with the caller's token asks it. (With access control
  on, the service refuses the bridge's own GetRevision and Watch, so the cache never serves.)

Both paths end in the same response code (``app.read_response``): an answer from the cache is,
byte for byte, the one the service's answer gives.
"""

from __future__ import annotations

import asyncio
import contextvars
import heapq
import itertools
import logging
import random
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass

import grpc

from casledger.service.api.casledger.v1 import ledger_pb2 as pb
from casledger.service.client import LedgerCallError, LedgerClient, WatchStream

from .metrics import BridgeMetrics

log = logging.getLogger("casledger.bridge")

# What an entry costs beyond its serialized size: the Python objects around it.
ENTRY_OVERHEAD_BYTES = 256
MIN_RETRY_S = 0.05
MAX_RETRY_S = 5.0
# The service refused the bridge (access control is on): ask again now and then, not often.
REFUSED_RETRY_S = 30.0
REFUSED = frozenset({grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED})
# Past this many reads waiting for the watch, those that gave up are swept out.
MAX_WAITERS = 1024


@dataclass(frozen=True, slots=True)
class Absent:
    """A name GetResource answered NOT_FOUND for: the service's error, and the version it was
    deleted at (0: it never existed)."""

    error: LedgerCallError
    version: int

    @classmethod
    def of(cls, error: LedgerCallError) -> Absent:
        deleted = error.metadata.get("deleted_at_version", "")
        return cls(error, int(deleted) if deleted.isascii() and deleted.isdigit() else 0)


Head = pb.Resource | Absent


def version_of(head: Head) -> int:
    return head.version


def size_of(name: str, head: Head) -> int:
    body = head.ByteSize() if isinstance(head, pb.Resource) else len(head.error.message)
    return ENTRY_OVERHEAD_BYTES + len(name) + body


def answer(name: str, head: Head) -> pb.Resource:
    """What GetResource of the current version gives for this head: the resource, or the
    NOT_FOUND the service answers for an absent or deleted one (a fresh exception each time)."""
    if isinstance(head, Absent):
        e = head.error
        raise LedgerCallError(e.code, e.message, e.reason, dict(e.metadata))
    if head.deleted:
        raise LedgerCallError.not_found(name, deleted_at_version=head.version)
    return head


class Fetch:
    """A GetResource in flight for a name missing from the cache: the newest version the watch
    brought for that name meanwhile (its entry may be evicted before the answer arrives)."""

    __slots__ = ("count", "newest", "valid")

    def __init__(self) -> None:
        self.count = 0
        self.newest: pb.Resource | None = None
        self.valid = True


class HeadCache:
    """The heads of recently read or written names, LRU-bounded by entries and bytes; pure."""

    def __init__(self, *, max_entries: int, max_bytes: int) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.bytes = 0
        self.applied = 0
        self.synced = False
        self._last_hash = ""  # hash of the version at `applied` ("" = not known)
        self._heads: OrderedDict[str, tuple[Head, int]] = OrderedDict()
        self._fetches: dict[str, Fetch] = {}

    def __len__(self) -> int:
        return len(self._heads)

    def __contains__(self, name: object) -> bool:
        return name in self._heads

    def lookup(self, name: str) -> Head | None:
        found = self._heads.get(name)
        if found is None:
            return None
        self._heads.move_to_end(name)
        return found[0]

    def forget(self) -> None:
        """Forget everything, the revision too: the next watch starts from where the ledger is
        then (its GetRevision), as when the bridge started."""
        self.reset(0)
        self.synced = False

    def reset(self, revision: int) -> None:
        """Forget everything: the cache now stands at `revision`, empty. Answers of fetches in
        flight are dropped too: they may predate versions the cache will never see."""
        self._heads.clear()
        self.bytes = 0
        self.applied = revision
        self.synced = True
        self._last_hash = ""
        for fetch in self._fetches.values():
            fetch.valid = False
        self._fetches.clear()

    def apply(self, resource: pb.Resource) -> bool:
        """Apply the next version of the ledger, from the watch. False when it does not follow
        the applied revision (a gap, or another ledger's history): the cache was then cleared
        and stands at this version's revision."""
        follows = resource.revision == self.applied + 1 and (
            not self._last_hash or resource.ledger_previous_hash == self._last_hash)
        if not follows:
            self.reset(resource.revision)
        self.applied = resource.revision
        self._last_hash = resource.hash
        fetch = self._fetches.get(resource.name)
        if fetch is not None and (fetch.newest is None or
                                  fetch.newest.version < resource.version):
            fetch.newest = resource
        self._put(resource.name, resource)
        return follows

    def begin_fetch(self, name: str) -> Fetch:
        """Before a GetResource for `name`: from here on the watch's versions of it are kept
        aside for :meth:`end_fetch`, whatever evicts meanwhile."""
        fetch = self._fetches.get(name)
        if fetch is None:
            fetch = self._fetches[name] = Fetch()
        fetch.count += 1
        return fetch

    def end_fetch(self, name: str, fetch: Fetch, head: Head | None) -> None:
        """After it, with its answer (None: it failed): the newer of that answer and what the
        watch brought meanwhile joins the cache, unless the cache holds a newer head already."""
        fetch.count -= 1
        if fetch.count == 0 and self._fetches.get(name) is fetch:
            del self._fetches[name]
        if not fetch.valid:
            return
        if fetch.newest is not None and (head is None or fetch.newest.version >= head.version):
            head = fetch.newest
        if head is not None:
            self._put(name, head)

    def _put(self, name: str, head: Head) -> None:
        current = self._heads.get(name)
        if current is not None:
            if version_of(current[0]) >= version_of(head):
                return  # versions of a name only go up: never replace a newer head
            del self._heads[name]
            self.bytes -= current[1]
        size = size_of(name, head)
        if size > self.max_bytes:
            return  # too large to keep: the name is simply not cached (its old head is gone)
        self._heads[name] = (head, size)
        self.bytes += size
        while len(self._heads) > self.max_entries or self.bytes > self.max_bytes:
            _, (_, evicted) = self._heads.popitem(last=False)
            self.bytes -= evicted


class ReadIndexUnavailable(Exception):
    """The round's GetRevision call was abandoned: the bridge is stopping."""


def _consume(future: asyncio.Future[int]) -> None:
    # Every reader of a round may have gone away: its error is not an unretrieved one.
    if not future.cancelled():
        future.exception()


class ReadIndex:
    """Rounds of GetRevision: one call in flight at a time, one call for every read that joined
    before it started; a read that joins during a call waits for the next."""

    def __init__(self, fetch: Callable[[], Awaitable[int]]) -> None:
        self._fetch = fetch
        self._next: asyncio.Future[int] | None = None
        self._runner: asyncio.Task[None] | None = None

    async def revision(self) -> int:
        """The revision the next call to start answers (never that of a call in flight)."""
        if self._next is None:
            self._next = asyncio.get_running_loop().create_future()
            self._next.add_done_callback(_consume)
        future = self._next
        if self._runner is None:
            # A context of its own: the call must not carry this request's metadata.
            self._runner = asyncio.create_task(self._run(), context=contextvars.Context())
        return await asyncio.shield(future)

    async def _run(self) -> None:
        future: asyncio.Future[int] | None = None
        try:
            while self._next is not None:
                future, self._next = self._next, None
                try:
                    revision = await self._fetch()
                except Exception as exc:
                    future.set_exception(exc)
                else:
                    future.set_result(revision)
        except asyncio.CancelledError:
            for waiting in (future, self._next):
                if waiting is not None and not waiting.done():
                    waiting.set_exception(ReadIndexUnavailable())
            self._next = None
            raise
        finally:
            self._runner = None

    async def close(self) -> None:
        runner = self._runner
        if runner is not None:
            runner.cancel()
            with suppress(asyncio.CancelledError):
                await runner
        # A runner cancelled before it ever ran resolved nothing.
        if self._next is not None and not self._next.done():
            self._next.set_exception(ReadIndexUnavailable())
        self._next = self._runner = None


Fetcher = Callable[[], Awaitable[pb.Resource]]


class ReadCache:
    """The read path of ``GET /v1/{name}``: the cache, the read index, the watch that feeds the
    cache, and the fallback to an ordinary GetResource."""

    def __init__(self, client: LedgerClient, *, max_entries: int, max_bytes: int,
                 wait_s: float, idle_s: float | None = None,
                 metrics: BridgeMetrics | None = None) -> None:
        self.heads = HeadCache(max_entries=max_entries, max_bytes=max_bytes)
        self.following = False
        self.paused = False
        self.paused_before = False  # this watch resumes a paused one (logged at debug)
        self._client = client
        self._wait_s = wait_s
        self._idle_s = idle_s
        self._last_read = 0.0
        self._running = False
        self._metrics = metrics
        self.index = ReadIndex(self._read_index)
        self._waiters: list[tuple[int, int, asyncio.Future[bool]]] = []
        self._order = itertools.count()
        self._behind = 0  # the revision of the last read that waited in vain
        self._follower: asyncio.Task[None] | None = None
        self._idler: asyncio.Task[None] | None = None
        self._stream: WatchStream | None = None

    # --- reads -----------------------------------------------------------------------------

    async def get(self, name: str, fetch: Fetcher, *, credentials: bool = False) -> pb.Resource:
        """The current version of `name` as GetResource would answer it at some moment between
        this call and its return (NOT_FOUND included); `fetch` is that GetResource."""
        if credentials:
            return await self._fallback("authorization", fetch)
        self._last_read = asyncio.get_running_loop().time()
        if not self.following:
            reason = "paused" if self.paused else "not_following"
            if self.paused and self._idler is None and self._running:
                self._resume()
            return await self._fallback(reason, fetch)
        if self.heads.applied < self._behind:
            # A read waited for the watch in vain: until it has caught up with that read's
            # revision, do not make every read wait as long.
            return await self._fallback("lagging", fetch)
        try:
            revision = await self.index.revision()
        except (LedgerCallError, ReadIndexUnavailable):
            return await self._fallback("read_index_failed", fetch)
        missed = await self._catch_up(revision)
        if missed is not None:
            if missed == "wait_timeout":
                self._behind = max(self._behind, revision)
            return await self._fallback(missed, fetch)
        head = self.heads.lookup(name)
        if head is not None:
            self._count("hit")
            return answer(name, head)
        self._count("miss")
        pending = self.heads.begin_fetch(name)
        found: Head | None = None
        try:
            resource = await fetch()
            found = resource
            return resource
        except LedgerCallError as error:
            if error.reason == "NOT_FOUND":
                found = Absent.of(error)
            raise
        finally:
            self.heads.end_fetch(name, pending, found)

    async def _fallback(self, reason: str, fetch: Fetcher) -> pb.Resource:
        self._count("fallback", reason)
        return await fetch()

    def _count(self, outcome: str, reason: str = "") -> None:
        if self._metrics is not None:
            self._metrics.read_cache_read(outcome, reason)

    async def _read_index(self) -> int:
        if self._metrics is not None:
            self._metrics.read_index_rounds.inc()
        return await self._client.revision()

    async def _catch_up(self, revision: int) -> str | None:
        """Wait until the cache has applied `revision`: None once it has, else why not
        (``wait_timeout``, or ``not_following`` when the watch broke first)."""
        if self.heads.applied >= revision:
            return None
        if len(self._waiters) >= MAX_WAITERS:  # drop those whose wait ran out
            self._waiters = [waiter for waiter in self._waiters if not waiter[2].done()]
            heapq.heapify(self._waiters)
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (revision, next(self._order), future))
        try:
            async with asyncio.timeout(self._wait_s):
                caught_up = await future
        except TimeoutError:
            return "wait_timeout"
        return None if caught_up else "not_following"

    def _wake(self) -> None:
        while self._waiters and self._waiters[0][0] <= self.heads.applied:
            _, _, future = heapq.heappop(self._waiters)
            if not future.done():
                future.set_result(True)

    def _wake_all(self, result: bool) -> None:
        waiters, self._waiters = self._waiters, []
        for _, _, future in waiters:
            if not future.done():
                future.set_result(result)

    # --- the watch ---------------------------------------------------------------------------

    def start(self) -> None:
        self._running = True
        self._resume()

    def _resume(self) -> None:
        """Start following (again): the watch, and the timer that pauses it when idle."""
        self.paused_before, self.paused = self.paused, False
        self._last_read = asyncio.get_running_loop().time()
        self._follower = asyncio.create_task(self._follow(), context=contextvars.Context())
        if self._idle_s is not None:
            self._idler = asyncio.create_task(self._pause_when_idle(),
                                              context=contextvars.Context())

    async def stop(self) -> None:
        self._running = False
        idler, self._idler = self._idler, None
        if idler is not None:
            idler.cancel()
            with suppress(asyncio.CancelledError):
                await idler
        await self._end_follower()
        await self.index.close()
        self._down()

    async def _pause_when_idle(self) -> None:
        """Once no read has come for `idle_s`, stop the watch and forget the cache."""
        assert self._idle_s is not None
        loop = asyncio.get_running_loop()
        try:
            # A timer, not an event: reads only move the deadline, which is checked when due.
            while (left := self._last_read + self._idle_s - loop.time()) > 0:  # noqa: ASYNC110
                await asyncio.sleep(left)
            self.paused = True  # from here, reads fall back without restarting the watch
            paused_at = loop.time()
            await self._end_follower()
            self.heads.forget()
            # At debug, as is the restart: reads now and then would pause and restart it often.
            log.debug("read cache: no read for %g s; watch paused until the next read",
                      self._idle_s)
        finally:
            self._idler = None
        if self._last_read > paused_at and self._running:
            self._resume()  # a read came while the watch was stopping: it restarts it

    async def _end_follower(self) -> None:
        """Stop the watch and wait until its task has ended. The task stays in `_follower`
        until then, so that whoever comes next (a cancelled pause, then stop) finishes it."""
        follower = self._follower
        # Again until it ends: Python 3.11's wait_for (in open_watch) can swallow a
        # cancellation that lands as the watch is accepted.
        while follower is not None and not follower.done():
            follower.cancel()
            if self._stream is not None:
                self._stream.close()
            await asyncio.wait({follower}, timeout=0.1)
        if self._follower is follower:
            self._follower = None
        self._down()

    def _down(self) -> None:
        self.following = False
        self._wake_all(False)

    def _apply(self, resource: pb.Resource) -> None:
        before = self.heads.applied
        if not self.heads.apply(resource):
            log.warning("read cache: revision %d does not follow revision %d; cleared",
                        resource.revision, before)
            if self._metrics is not None:
                self._metrics.read_cache_resets.inc()
        self._wake()

    async def _follow(self) -> None:
        """Keep the cache current: GetRevision, then Watch from the applied revision + 1;
        reconnect with backoff while it fails, the cache kept unless the ledger went back."""
        delay, told = MIN_RETRY_S, False
        while True:
            established, refused = False, False
            try:
                revision = await self._client.revision()
                # Below what was applied (every applied version was committed before this
                # call): another ledger answers now, a restored backup say. Start over.
                if not self.heads.synced or revision < self.heads.applied:
                    if self.heads.synced and self._metrics is not None:
                        self._metrics.read_cache_resets.inc()
                    self.heads.reset(revision)
                    self._behind = 0
                stream = self._stream = await self._client.open_watch(
                    "", self.heads.applied + 1)
                try:
                    self.following = established = True
                    (log.debug if self.paused_before else log.info)(
                        "read cache: following the ledger from revision %d", self.heads.applied)
                    self.paused_before = False
                    told = False
                    async for event in stream:
                        self._apply(event.resource)
                finally:
                    stream.close()
                    self._stream = None
                problem, retry = "the service ended the watch", MIN_RETRY_S
            except LedgerCallError as error:
                problem, retry = str(error), MAX_RETRY_S
                if error.code in REFUSED:
                    problem, retry = (f"access control is on and the bridge has no token of "
                                      f"its own: {error.code.name}"), REFUSED_RETRY_S
                    refused = True
                elif error.reason == "WATCHER_TOO_SLOW":
                    retry = MIN_RETRY_S  # resumes from applied + 1, which the service replays
            except Exception as exc:  # a bug: say so, keep serving (every read falls back)
                log.error("read cache: unexpected failure; reads go to the service",
                          exc_info=exc)
                problem, retry = repr(exc), MAX_RETRY_S
            finally:
                self._down()
            if established:
                delay = MIN_RETRY_S
            # Say it once per outage (a refusal is no fault: at info); the retries at debug.
            (log.debug if told else log.info if refused else log.warning)(
                "read cache: not following the ledger (%s); reads go to the service until it "
                "is again", problem)
            told = True
            await asyncio.sleep(random.uniform(delay / 2, delay))
            delay = min(max(delay * 2, MIN_RETRY_S), retry)


@asynccontextmanager
async def open_read_cache(client: LedgerClient, *, max_entries: int, max_bytes: int,
                          wait_s: float, idle_s: float | None = None,
                          metrics: BridgeMetrics | None = None) -> AsyncIterator[ReadCache]:
    """A read cache following the ledger through `client` until the block ends."""
    cache = ReadCache(client, max_entries=max_entries, max_bytes=max_bytes, wait_s=wait_s,
                      idle_s=idle_s, metrics=metrics)
    if metrics is not None:
        metrics.track_read_cache(
            entries=lambda: len(cache.heads), size=lambda: cache.heads.bytes,
            revision=lambda: cache.heads.applied, following=lambda: float(cache.following))
    cache.start()
    try:
        yield cache
    finally:
        await cache.stop()
