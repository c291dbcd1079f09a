"""Reading the ledger's stream from a running service, for the online inspection commands.

:func:`replay` watches from a revision up to the revision that was current when the service
accepted the watch (``WatchStream.revision``), then stops: `log`, `verify`, `digest` and `export`
use it online. It watches the whole ledger and filters by prefix here, because only the unfiltered
stream is gap-free: with a prefix, no event would ever say that the replay is over.

:func:`follow` is `tail`: it follows the Watch and, after a lost connection, a server restart or
``WATCHER_TOO_SLOW``, resumes from the last revision it delivered + 1, so nothing is missed and
nothing is delivered twice. While the service is unavailable it retries with exponential backoff
(0.1 s doubling to ``max_backoff``). Every attempt opens a new channel: a channel's own reconnect
backoff grows to minutes, far past the moment the service is back.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable

import grpc

from .api.casledger.v1 import ledger_pb2 as pb
from .client import KEEPALIVE_S, LedgerCallError, LedgerClient, connect
from .model import Version, matches_prefix

INITIAL_BACKOFF_S = 0.1
MAX_BACKOFF_S = 5.0
REPLAY_BATCH = 256

# A stream that ends with these was cut short (network, restart, shutdown): resume it.
_RETRYABLE = frozenset((
    grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED,
    grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL,
))


def from_resource(r: pb.Resource) -> Version:
    """The Version a Resource message carries (content as sent; hashes from hex)."""
    return Version(
        name=r.name, version=r.version, revision=r.revision, content=r.content,
        content_type=r.content_type,
        create_time_us=r.create_time.seconds * 1_000_000 + r.create_time.nanos // 1000,
        update_time_us=r.update_time.seconds * 1_000_000 + r.update_time.nanos // 1000,
        actor=r.actor, reason=r.reason, deleted=r.deleted,
        previous_hash=bytes.fromhex(r.previous_hash),
        ledger_previous_hash=bytes.fromhex(r.ledger_previous_hash), hash=bytes.fromhex(r.hash),
        size=r.size_bytes,
    )


def retryable(error: LedgerCallError) -> bool:
    """Whether a failed watch should be resumed rather than reported."""
    return error.code in _RETRYABLE or error.reason == "WATCHER_TOO_SLOW"


async def replay(client: LedgerClient, start: int = 1, prefix: str = "", *,
                 batch: int = REPLAY_BATCH,
                 on_accept: Callable[[int], None] | None = None
                 ) -> AsyncGenerator[list[Version], None]:
    """Versions under `prefix` from revision `start` up to the revision current now, in lists
    of up to `batch`, in revision order. `on_accept(revision)` learns that revision first."""
    stream = await client.open_watch("", max(start, 1))
    try:
        upto = stream.revision
        if on_accept is not None:
            on_accept(upto)
        if upto < start:
            return
        pending: list[Version] = []
        async for event in stream:
            version = from_resource(event.resource)
            if matches_prefix(version.name, prefix):
                pending.append(version)
            done = version.revision >= upto
            if pending and (done or len(pending) >= batch):
                yield pending
                pending = []
            if done:
                return
    finally:
        stream.close()


async def follow(target: str, on_version: Callable[[Version], None], *, prefix: str = "",
                 start: int = 0, limit: int = 0,
                 on_retry: Callable[[str, float, int], None] | None = None,
                 max_backoff: float = MAX_BACKOFF_S, tls_ca: bytes | None = None,
                 keepalive_s: float = KEEPALIVE_S) -> int:
    """Deliver every version under `prefix` from revision `start` (0 = from now) to
    `on_version`, in order, exactly once, until `limit` versions (0 = forever). Returns how many
    were delivered. `on_retry(why, delay_s, next_revision)` is told of each reconnection.
    A connection that stays silent `keepalive_s` seconds is pinged, and dropped (then resumed)
    when the ping goes unanswered, so a dead peer cannot leave the tail waiting forever."""
    last = start - 1 if start else None
    delivered = 0
    delay = INITIAL_BACKOFF_S
    while True:
        try:
            async with connect(target, tls_ca=tls_ca, keepalive_s=keepalive_s) as client:
                stream = await client.open_watch(prefix, 0 if last is None else last + 1)
                if last is None:
                    last = stream.revision
                delay = INITIAL_BACKOFF_S
                try:
                    async for event in stream:
                        version = from_resource(event.resource)
                        if version.revision <= last:
                            continue
                        on_version(version)
                        last = version.revision
                        delivered += 1
                        if delivered == limit:
                            return delivered
                finally:
                    stream.close()
            why = "the service ended the stream"
        except LedgerCallError as error:
            if not retryable(error):
                raise
            why = error.reason or error.code.name
        if on_retry is not None:
            on_retry(why, delay, 0 if last is None else last + 1)
        await asyncio.sleep(delay)
        delay = min(delay * 2, max_backoff)
