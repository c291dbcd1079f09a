"""SQLite ledger files without a server: a read-only reader and a bulk import.

The offline ``casledger`` commands (verify, digest, export, stats, log, and get/history/diff with
``--db``) read a ledger file directly, so an auditor holding a copy needs no server. The reader
opens the file read-only (a ``file:...?mode=ro`` URI): it takes no lock, never writes, and works
while a server is serving the same file (WAL lets it read a consistent snapshot). Every read of one
:class:`SQLiteReader` sees the same snapshot: it holds one read transaction from its first query
until it is closed. On read-only media, where SQLite cannot create the WAL index, it falls back to
``immutable=1`` (nothing can be writing there).

:func:`import_versions` loads versions into an *empty* ledger file in one transaction; whatever
goes wrong (a broken link found by the caller's verifier, a disk error), nothing is left behind:
the transaction is rolled back and a file the import created is deleted.

Rows come out as :class:`~casledger.service.model.Version` built positionally from a SELECT whose
columns are the dataclass's own fields, in order; the ``deleted`` flag is therefore the stored
integer, which the verifier checks is 0 or 1. ``verify`` takes the rows as they are, one at a time
from the cursor (:meth:`SQLiteReader.scan`: building a Version costs about as much as the
verifier's own work on a row), and :func:`verify_slice` is what each worker process of ``verify
--jobs N`` runs, on one chunk of the revisions at a time.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import time
import urllib.parse
from collections.abc import Iterable, Iterator
from contextlib import closing, contextmanager, suppress
from dataclasses import dataclass, fields
from pathlib import Path

from .. import errors
from ..model import Version, parent_of
from ..verify import Row, SliceSummary, Verifier
from .sqlite import _SCHEMA_V1, SCHEMA_VERSION, _split_script

# The Version dataclass's fields, in order: every one is a column of `versions`.
_FIELDS = ", ".join(f.name for f in fields(Version))
# The same, with the content left out (its size is a column of its own).
_FIELDS_NO_CONTENT = _FIELDS.replace("content,", "x'',", 1)
_INSERT = (
    "INSERT INTO versions (name, version, revision, content, content_type, create_time_us, "
    "update_time_us, actor, reason, deleted, previous_hash, ledger_previous_hash, hash, size) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_UPSERT_HEAD = (
    "INSERT INTO heads (name, parent, version, deleted) VALUES (?, ?, ?, ?) "
    "ON CONFLICT (name) DO UPDATE SET version = excluded.version, deleted = excluded.deleted"
)
_CONTENT = [f.name for f in fields(Version)].index("content")
DEFAULT_BATCH = 1024
BATCH_BYTES = 1 << 20


class LedgerFileError(RuntimeError):
    """The file is missing, unreadable, or not a casledger ledger."""


class StoreNotEmpty(RuntimeError):
    """An import was pointed at a ledger that already holds versions."""


class StoreBusy(RuntimeError):
    """A casledger server (or another import) holds the ledger file."""


@dataclass(frozen=True, slots=True)
class LedgerSizes:
    """What `casledger stats` reports of a ledger."""

    revision: int
    resources: int
    live_resources: int
    versions: int
    tombstones: int
    bytes: int
    first_write_us: int
    last_write_us: int
    # Writes committed within the last minute, hour and day (by update_time).
    writes_last_minute: int
    writes_last_hour: int
    writes_last_day: int


def _uri(path: str, **params: str) -> str:
    query = "&".join(f"{key}={value}" for key, value in params.items())
    return f"file:{urllib.parse.quote(os.path.abspath(path))}?{query}"


class SQLiteReader:
    """A read-only view of one ledger file: one consistent snapshot until closed."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def _ints(self, sql: str, params: tuple[object, ...] = ()) -> list[int]:
        row = self._db.execute(sql, params).fetchone()
        assert row is not None
        return [int(value) for value in row]

    def revision(self) -> int:
        """The latest revision (0 for an empty ledger)."""
        return self._ints("SELECT coalesce(max(revision), 0) FROM versions")[0]

    def versions(self, *, after: int = 0, upto: int | None = None, prefix: str = "",
                 batch: int = DEFAULT_BATCH) -> Iterator[list[Version]]:
        """Every version with `after` < revision <= `upto` under `prefix`, in revision order,
        content included, in lists of up to `batch`: memory stays flat however long the ledger."""
        for rows in self.rows(after=after, upto=upto, prefix=prefix, batch=batch):
            yield [Version(*row) for row in rows]

    def rows(self, *, after: int = 0, upto: int | None = None, prefix: str = "",
             batch: int = DEFAULT_BATCH) -> Iterator[list[Row]]:
        """:meth:`versions` as rows, the Version fields in order, as stored."""
        cursor = self._select(after, upto, prefix)
        cursor.arraysize = min(batch, 64)
        with closing(cursor):
            while rows := cursor.fetchmany():
                yield rows
                # Batches of about BATCH_BYTES, whatever the content sizes: memory stays flat.
                size = sum(len(c) if isinstance(c := row[_CONTENT], bytes) else 0 for row in rows)
                cursor.arraysize = max(1, min(batch, BATCH_BYTES * len(rows) // (size + 1)))

    def scan(self, *, after: int = 0, upto: int | None = None) -> sqlite3.Cursor:
        """The versions with `after` < revision <= `upto`, in revision order, as rows (the
        Version fields in order, as stored), one at a time: what the verifier reads, straight
        from the cursor (no batch is built, and each row is freed as the next one comes). Close
        the cursor if it is not read to the end."""
        return self._select(after, upto, "")

    def _select(self, after: int, upto: int | None, prefix: str) -> sqlite3.Cursor:
        sql = f"SELECT {_FIELDS} FROM versions WHERE revision > ?"
        params: list[object] = [after]
        if upto is not None:
            sql += " AND revision <= ?"
            params.append(upto)
        if prefix:
            # `prefix/` .. `prefix0` is exactly the names below prefix ('0' follows '/').
            sql += " AND (name = ? OR (name > ? AND name < ?))"
            params += [prefix, prefix + "/", prefix + "0"]
        return self._db.execute(sql + " ORDER BY revision", params)

    def get(self, name: str, version: int = 0) -> Version:
        """A version of `name` (0 = the current one), like the service's GetResource."""
        if version:
            row = self._db.execute(
                f"SELECT {_FIELDS} FROM versions WHERE name = ? AND version = ?", (name, version)
            ).fetchone()
            if row is None:
                raise errors.ResourceNotFound(name=name, version=version)
            return Version(*row)
        row = self._db.execute(
            f"SELECT {_FIELDS} FROM versions WHERE name = ? ORDER BY version DESC LIMIT 1", (name,)
        ).fetchone()
        if row is None:
            raise errors.ResourceNotFound(name=name)
        found = Version(*row)
        if found.deleted:
            raise errors.ResourceNotFound(name=name, deleted_at_version=found.version)
        return found

    def history(self, name: str, *, batch: int = DEFAULT_BATCH) -> Iterator[Version]:
        """Every version of `name`, oldest first, tombstones included, without content."""
        cursor = self._db.execute(
            f"SELECT {_FIELDS_NO_CONTENT} FROM versions WHERE name = ? ORDER BY version", (name,))
        cursor.arraysize = batch
        found = False
        with closing(cursor):
            while rows := cursor.fetchmany():
                found = True
                for row in rows:
                    yield Version(*row)
        if not found:
            raise errors.ResourceNotFound(name=name)

    def heads(self) -> Iterator[tuple[str, int, bool]]:
        """The derived `heads` table, (name, version, deleted) by name."""
        with closing(self._db.execute("SELECT name, version, deleted FROM heads ORDER BY name")
                     ) as cursor:
            for name, version, deleted in cursor:
                yield name, version, bool(deleted)

    def sizes(self, now_us: int | None = None) -> LedgerSizes:
        """Counts, bytes and the recent write rate; one scan of the versions table."""
        now_us = time.time_ns() // 1000 if now_us is None else now_us
        heads = self._ints("SELECT count(*), coalesce(sum(deleted = 0), 0) FROM heads")
        totals = self._ints(
            "SELECT count(*), coalesce(sum(deleted), 0), coalesce(sum(size), 0), "
            "coalesce(min(update_time_us), 0), coalesce(max(update_time_us), 0) FROM versions")
        recent = [self._writes_since(now_us - seconds * 1_000_000)
                  for seconds in (60, 3600, 86400)]
        return LedgerSizes(self.revision(), *heads, *totals, *recent)

    def _writes_since(self, cutoff_us: int) -> int:
        # update_time strictly increases along the revisions (the ledger rules make it so), so
        # the writes since `cutoff_us` are a suffix of the revisions: binary-search its start
        # over the primary key instead of scanning for times.
        low, high = 1, self.revision() + 1
        while low < high:
            middle = (low + high) // 2
            row = self._db.execute(
                "SELECT update_time_us FROM versions WHERE revision >= ? ORDER BY revision "
                "LIMIT 1", (middle,)).fetchone()
            if row is None or row[0] >= cutoff_us:
                high = middle
            else:
                low = middle + 1
        return self._ints("SELECT count(*) FROM versions WHERE revision >= ?", (low,))[0]


def _connect_read_only(path: str) -> sqlite3.Connection:
    if not os.path.isfile(path):
        raise LedgerFileError(f"{path}: no such ledger file")
    try:
        db = sqlite3.connect(_uri(path, mode="ro"), uri=True, isolation_level=None)
        try:
            db.execute("SELECT count(*) FROM sqlite_master").fetchone()
        except sqlite3.OperationalError:
            db.close()
            # A WAL file in a directory we cannot write to: SQLite cannot create the WAL index.
            # Nothing can be writing there, so the file is safe to read as immutable.
            db = sqlite3.connect(_uri(path, mode="ro", immutable="1"), uri=True,
                                 isolation_level=None)
        db.execute("PRAGMA query_only = 1")
        db.execute("BEGIN")
        tables = {row[0] for row in db.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.DatabaseError as exc:
        raise LedgerFileError(f"{path}: cannot read it as a ledger: {exc}") from None
    if not {"versions", "heads", "meta"} <= tables:
        db.close()
        raise LedgerFileError(f"{path}: not a casledger ledger (no versions table)")
    return db


@contextmanager
def open_sqlite_reader(path: str) -> Iterator[SQLiteReader]:
    """Open the ledger file at `path` read-only; its snapshot ends when the block does."""
    db = _connect_read_only(path)
    try:
        yield SQLiteReader(db)
    finally:
        with suppress(sqlite3.Error):
            db.execute("ROLLBACK")
        db.close()


def verify_slice(path: str, after: int, upto: int, digest_at: int | None = None,
                 max_problems: int = 1000) -> SliceSummary:
    """Check revisions `after` + 1 .. `upto` of the ledger file at `path` on their own, for
    ``casledger verify --jobs``: run in a worker process, which opens the file read-only itself.
    What needs the revisions before is left to the parent (see :mod:`casledger.service.verify`).
    The rows up to `upto` are the same in every snapshot taken after the parent's: the versions
    table only grows."""
    verifier = Verifier.for_slice(digest_at=digest_at, max_problems=max_problems)
    with open_sqlite_reader(path) as reader, closing(reader.scan(after=after, upto=upto)) as rows:
        verifier.feed_rows(rows)  # it stops at a row it gives up on
    return verifier.summary()


@contextmanager
def _exclusive(path: str) -> Iterator[None]:
    """The advisory lock a server holds on `<file>.lock`: no server starts during an import."""
    fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StoreBusy(f"a casledger process is using {path}; stop it before importing"
                            ) from None
        yield
    finally:
        os.close(fd)


def _create_schema(db: sqlite3.Connection) -> None:
    exists = db.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'").fetchone()
    if exists:
        row = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        if row is None or int(row[0]) != SCHEMA_VERSION:
            raise LedgerFileError(f"the ledger's schema version is {row and row[0]}; this "
                                  f"casledger imports into version {SCHEMA_VERSION}")
        return
    for statement in _split_script(_SCHEMA_V1):
        db.execute(statement)
    db.execute("INSERT INTO meta (key, value) VALUES ('schema_version', ?), ('created_us', ?)",
               (str(SCHEMA_VERSION), str(time.time_ns() // 1000)))


def import_versions(path: str, versions: Iterable[Version], *,
                    batch: int = DEFAULT_BATCH) -> int:
    """Append `versions` (in revision order) to the empty ledger at `path`, creating it if need
    be, in one transaction; returns how many. Raises :class:`StoreNotEmpty` if it holds versions.

    `versions` may raise at any point (the caller verifies as it loads): then nothing is kept,
    and the file is deleted if this call created it. Request ids are not carried over (they only
    serve retries within a day of the original write)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    created = [p for p in (path, f"{path}-wal", f"{path}-shm", f"{path}.lock")
               if not os.path.exists(p)]
    try:
        with _exclusive(path), closing(sqlite3.connect(path, isolation_level=None)) as db:
            fresh = path in created
            if fresh:
                # A rollback journal while loading a new file: one big transaction in WAL mode
                # would write every page twice (WAL, then checkpoint). WAL is set after.
                db.execute("PRAGMA journal_mode = DELETE")
            db.execute("PRAGMA synchronous = FULL")
            db.execute("PRAGMA cache_size = -65536")
            db.execute("BEGIN IMMEDIATE")
            try:
                _create_schema(db)
                if db.execute("SELECT 1 FROM versions LIMIT 1").fetchone():
                    raise StoreNotEmpty(f"{path} already holds versions; import only into an "
                                        "empty ledger")
                count = 0
                pending: list[Version] = []
                for version in versions:
                    pending.append(version)
                    if len(pending) >= batch:
                        count += _insert(db, pending)
                        pending = []
                count += _insert(db, pending)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            if fresh:
                db.execute("PRAGMA journal_mode = WAL")
    except BaseException:
        if path in created:
            for leftover in created:
                with suppress(FileNotFoundError):
                    os.unlink(leftover)
        raise
    return count


def _insert(db: sqlite3.Connection, versions: list[Version]) -> int:
    db.executemany(_INSERT, (
        (v.name, v.version, v.revision, v.content, v.content_type, v.create_time_us,
         v.update_time_us, v.actor, v.reason, int(v.deleted), v.previous_hash,
         v.ledger_previous_hash, v.hash, v.size) for v in versions))
    db.executemany(_UPSERT_HEAD, (
        (v.name, parent_of(v.name), v.version, int(v.deleted)) for v in versions))
    return len(versions)
