"""Storage backends behind one interface: the append-only versions table is the truth.

``open_store(url)`` picks the backend from the URL scheme (``sqlite:///path``). Every backend
plans its writes with :func:`casledger.service.model.plan_write` inside one transaction, so the
ledger rules and the hash chain are the same whatever stores them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from enum import Enum
from typing import Protocol

from ..model import Version, Write
from ..watch import WatchHub


class Durability(Enum):
    """`full`: a successful reply means the version is on disk (fsync at every commit).
    `normal`: commits survive a crash of the process, but the last ones may be lost on power
    loss or an OS crash; faster."""

    FULL = "full"
    NORMAL = "normal"


@dataclass(frozen=True, slots=True)
class StoreOptions:
    max_content_bytes: int = 1 << 20
    durability: Durability = Durability.FULL
    request_id_ttl_s: int = 24 * 3600
    watch_queue: int = 1024


class Store(Protocol):
    """What the servicer and the tools need of a backend."""

    hub: WatchHub

    async def write(self, write: Write) -> Version:
        """Check and append one write atomically (or replay its recorded outcome)."""
        ...

    async def get(self, name: str, version: int = 0) -> Version: ...

    async def list_resources(self, parent: str, limit: int, after: str | None) -> list[Version]: ...

    async def list_versions(
        self, name: str, limit: int, after: int | None, include_content: bool
    ) -> list[Version]: ...

    async def read_revisions(self, after: int, upto: int, prefix: str, limit: int) -> list[Version]:
        ...


class UnsupportedStore(ValueError):
    """The URL names no backend this build can open."""


@asynccontextmanager
async def open_store(url: str, options: StoreOptions | None = None) -> AsyncIterator[Store]:
    """Open the store a URL names; closed when the block ends."""
    options = options or StoreOptions()
    if url.startswith("sqlite:"):
        from .sqlite import open_sqlite, sqlite_path

        async with open_sqlite(sqlite_path(url), options) as store:
            yield store
        return
    scheme = url.split(":", 1)[0] if ":" in url else url
    raise UnsupportedStore(
        f"unsupported database URL scheme {scheme!r}: use sqlite:///path/to/file.db"
    )
