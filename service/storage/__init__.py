"""Storage backends behind one interface: the append-only versions table is the truth.

``open_store(url)`` picks the backend from the URL scheme: ``sqlite:///path`` (one process, one
file; :mod:`.sqlite`) or ``postgresql://...`` (many stateless replicas on one database;
:mod:`.postgres`). Every backend plans its writes with
:func:`casledger.service.model.plan_write` inside one transaction, so the ledger rules and the
hash chain are the same whatever stores them, and an export of one imports into the other.

The offline tools (verify, digest, export, import, stats, log, get, history, migrate) read a
ledger through :func:`open_reader` — a :class:`LedgerReader`, one consistent snapshot — and load
one with :func:`import_ledger`; both take a SQLite path or a PostgreSQL URL.
"""

from __future__ import annotations

import asyncio
import urllib.parse
from collections.abc import AsyncIterator, Coroutine, Iterable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any, Protocol

from .. import errors
from ..model import Version, Write
from ..watch import WatchHub

if TYPE_CHECKING:
    from .sqlite_offline import LedgerSizes

POSTGRES_SCHEMES = ("postgresql://", "postgres://")


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

    async def current_revision(self) -> int:
        """The ledger's latest committed revision: every write acknowledged before this call
        has a revision at or below it (the read index of a linearizable read)."""
        ...

    async def get(self, name: str, version: int = 0) -> Version: ...

    async def list_resources(self, parent: str, limit: int, after: str | None) -> list[Version]: ...

    async def list_versions(
        self, name: str, limit: int, after: int | None, include_content: bool
    ) -> list[Version]: ...

    async def read_revisions(self, after: int, upto: int, prefix: str, limit: int) -> list[Version]:
        ...


class LedgerReader(Protocol):
    """A read-only view of a whole ledger, one consistent snapshot, for the offline tools."""

    def revision(self) -> int:
        """The latest revision (0 for an empty ledger)."""
        ...

    def versions(self, *, after: int = 0, upto: int | None = None, prefix: str = "",
                 batch: int = ...) -> Iterator[list[Version]]:
        """Versions with `after` < revision <= `upto` under `prefix`, in revision order, with
        content, in lists of up to `batch`."""
        ...

    def get(self, name: str, version: int = 0) -> Version: ...

    def history(self, name: str, *, batch: int = ...) -> Iterator[Version]: ...

    def heads(self) -> Iterator[tuple[str, int, bool]]:
        """The derived heads table: (name, version, deleted), sorted by name."""
        ...

    def sizes(self, now_us: int | None = None) -> LedgerSizes: ...


def requested_version(found: list[Version], name: str, version: int) -> Version:
    """What ``Store.get`` answers from the rows its query found: version `version` of `name`
    (0: the current one, which must not be a tombstone), or ResourceNotFound."""
    if not found:
        raise errors.ResourceNotFound(name=name, version=version) if version else (
            errors.ResourceNotFound(name=name))
    if not version and found[0].deleted:
        raise errors.ResourceNotFound(name=name, deleted_at_version=found[0].version)
    return found[0]


class ShieldedWrites:
    """Runs each write in a task of its own, shielded from its caller: cancelling the caller
    cannot interrupt a transaction half done, and :meth:`drain` waits for every write already
    started (those whose callers went away included) before a store closes."""

    def __init__(self) -> None:
        self._in_flight: set[asyncio.Task[Version]] = set()

    async def run(self, write: Coroutine[Any, Any, Version]) -> Version:
        task = asyncio.ensure_future(write)
        self._in_flight.add(task)
        task.add_done_callback(self._in_flight.discard)
        return await asyncio.shield(task)

    async def drain(self) -> None:
        while self._in_flight:
            await asyncio.wait(set(self._in_flight))


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
    if url.startswith(POSTGRES_SCHEMES):
        from .postgres import open_postgres

        async with open_postgres(url, options) as pg_store:
            yield pg_store
        return
    scheme = url.split(":", 1)[0] if ":" in url else url
    raise UnsupportedStore(
        f"unsupported database URL scheme {scheme!r}: use sqlite:///path/to/file.db or "
        "postgresql://user@host/database"
    )


def redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    try:
        password = urllib.parse.urlsplit(url).password
    except ValueError:
        return url
    return url if password is None else url.replace(f":{password}@", ":***@", 1)


def is_postgres(location: str) -> bool:
    """Whether an offline tool's ledger location is a PostgreSQL URL (else a SQLite path)."""
    return location.startswith(POSTGRES_SCHEMES)


@contextmanager
def open_reader(location: str) -> Iterator[LedgerReader]:
    """A read-only snapshot of the ledger at `location`: a SQLite file path or a PostgreSQL URL."""
    if is_postgres(location):
        from .postgres_offline import open_postgres_reader

        with open_postgres_reader(location) as pg_reader:
            yield pg_reader
        return
    from .sqlite_offline import open_sqlite_reader

    with open_sqlite_reader(location) as reader:
        yield reader


def import_ledger(location: str, versions: Iterable[Version]) -> int:
    """Load `versions` (revision order) into the empty ledger at `location`, all or nothing."""
    if is_postgres(location):
        from .postgres_offline import import_postgres

        return import_postgres(location, versions)
    from .sqlite_offline import import_versions

    return import_versions(location, versions)
