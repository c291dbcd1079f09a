"""The offline commands against real ledger files: verify (and the tampering it must catch, done
to the SQLite file with the stdlib driver), digest, export/import, stats, and log/get/history/diff
with --db. The ledger is written once by a real server; each test works on its own copy."""

from __future__ import annotations

import asyncio
import itertools
import json
import multiprocessing
import os
import shutil
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from casledger.service.audit import (
    MIN_SLICE_BYTES,
    MIN_SLICE_VERSIONS,
    check_file,
    chunks,
    jobs_for,
)
from casledger.service.cli import main
from casledger.service.client import connect, precondition
from casledger.service.config import Settings
from casledger.service.model import Version, compute_hash
from casledger.service.server import RunningServer, serve
from casledger.service.storage.sqlite_offline import open_sqlite_reader
from casledger.service.verify import Digest, Row, SliceSummary, Verifier

# These tamper with the SQLite file itself (the PostgreSQL ledger: test_postgres_offline.py).
pytestmark = pytest.mark.sqlite_only

# What the pristine ledger holds, revision by revision.
LEDGER = [
    (1, "documents/a", 1), (2, "documents/b", 1), (3, "documents/a", 2), (4, "notes/n", 1),
    (5, "documents/a", 3), (6, "documents/b", 2), (7, "documents/a", 4), (8, "documents/b", 3),
]
_COLUMNS = ("name, version, revision, content, content_type, create_time_us, update_time_us, "
            "actor, reason, deleted, previous_hash, ledger_previous_hash, hash, size")


async def _write_ledger(db: Path) -> None:
    settings = Settings(db=f"sqlite:///{db}", grpc_listen="127.0.0.1:0", no_http=True)
    async with serve(settings) as running, connect(running.target) as client:
        await client.create("documents", b'{"title":"draft","n":1}', resource_id="a",
                            reason="first draft")
        await client.create("documents", b'{"b":1}', resource_id="b")
        await client.replace("documents/a", b'{"title":"second","n":2}',
                             precondition=precondition(version=1), reason="edit")
        await client.create("notes", b"hello\nworld\n", resource_id="n",
                            content_type="text/plain")
        await client.replace("documents/a", b'{"title":"third","n":3}',
                             precondition=precondition(version=2))
        await client.delete("documents/b", precondition=precondition(version=1),
                            reason="obsolete")
        await client.replace("documents/a", b'{"title":"fourth","n":4,"tags":["x"]}',
                             precondition=precondition(version=3))
        await client.create("documents", b'{"b":2}', resource_id="b")


@pytest.fixture(scope="session")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    db = tmp_path_factory.mktemp("pristine") / "ledger.db"
    asyncio.run(_write_ledger(db))
    return db


@pytest.fixture(autouse=True)
def _no_casledger_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("CASLEDGER_DB", "CASLEDGER_TARGET", "FORCE_COLOR", "COLUMNS"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def ledger(pristine: Path, tmp_path: Path) -> Path:
    """A copy of the pristine ledger, free to tamper with."""
    copy = tmp_path / "ledger.db"
    for suffix in ("", "-wal"):
        if Path(f"{pristine}{suffix}").exists():
            shutil.copy(f"{pristine}{suffix}", f"{copy}{suffix}")
    return copy


@dataclass
class Run:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)

    def lines(self) -> list[Any]:
        return [json.loads(line) for line in self.out.splitlines()]


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Any:
    def run(*args: str | Path) -> Run:
        code = main([str(arg) for arg in args])
        captured = capsys.readouterr()
        return Run(code, captured.out, captured.err)

    return run


def tamper(db: Path, *statements: tuple[str, tuple[Any, ...]]) -> None:
    """Edit the ledger file behind the service's back: drop the append-only triggers first."""
    with closing(sqlite3.connect(db)) as connection:
        connection.execute("DROP TRIGGER IF EXISTS versions_no_update")
        connection.execute("DROP TRIGGER IF EXISTS versions_no_delete")
        for sql, params in statements:
            connection.execute(sql, params)
        connection.commit()


def rows(db: Path) -> list[Version]:
    with closing(sqlite3.connect(db)) as connection:
        return [Version(*row) for row in connection.execute(
            f"SELECT {_COLUMNS} FROM versions ORDER BY revision")]


def rechain_from(db: Path, revision: int) -> None:
    """Recompute every hash and link from `revision` on, as a forger who knows the format."""
    versions = rows(db)
    heads: dict[str, bytes] = {}
    previous = b""
    updates = []
    for v in versions:
        if v.revision >= revision:
            fixed = Version(v.name, v.version, v.revision, v.content, v.content_type,
                            v.create_time_us, v.update_time_us, v.actor, v.reason, v.deleted,
                            heads.get(v.name, b""), previous, b"", v.size)
            digest = compute_hash(fixed)
            updates.append(("UPDATE versions SET previous_hash = ?, ledger_previous_hash = ?, "
                            "hash = ? WHERE revision = ?",
                            (fixed.previous_hash, previous, digest, v.revision)))
        else:
            digest = v.hash
        heads[v.name] = previous = digest
    tamper(db, *updates)


def problems(run: Run) -> set[tuple[str, str, int]]:
    assert run.code == 1, run.err
    return {(p["kind"], p["name"], p["version"]) for p in run.json()["problems"]}


# --- verify --------------------------------------------------------------------------------


def test_an_untampered_ledger_verifies(cli: Any, ledger: Path) -> None:
    run = cli("verify", "--db", ledger)
    assert run.code == 0, run.err
    assert "OK: 8 versions of 3 resources" in run.out
    assert "digest 8:" in run.out
    report = cli("verify", "--db", f"sqlite:///{ledger}", "--json").json()
    assert report["ok"] is True
    assert (report["versions"], report["resources"], report["revision"]) == (8, 3, 8)
    assert report["problems"] == []
    assert report["digest"].startswith("8:")


def test_edited_past_content_is_named(cli: Any, ledger: Path) -> None:
    tamper(ledger, ("UPDATE versions SET content = ? WHERE name = ? AND version = ?",
                    (b'{"title":"forged","n":2}', "documents/a", 2)))
    assert problems(cli("verify", "--db", ledger, "--json")) == {
        ("hash_mismatch", "documents/a", 2)}
    table = cli("verify", "--db", ledger)
    assert table.code == 1
    assert "documents/a" in table.out
    assert "hash_mismatch" in table.out
    assert "FAILED: 1 broken links" in table.out


def test_edited_metadata_is_named(cli: Any, ledger: Path) -> None:
    tamper(ledger, ("UPDATE versions SET reason = 'nothing to see' WHERE revision = 6", ()))
    assert problems(cli("verify", "--db", ledger, "--json")) == {
        ("hash_mismatch", "documents/b", 2)}


def test_a_deleted_middle_version_is_named(cli: Any, ledger: Path) -> None:
    tamper(ledger, ("DELETE FROM versions WHERE name = 'documents/a' AND version = 2", ()))
    found = problems(cli("verify", "--db", ledger, "--json"))
    assert {("revision_gap", "notes/n", 1), ("ledger_chain_broken", "notes/n", 1),
            ("version_gap", "documents/a", 3), ("resource_chain_broken", "documents/a", 3)
            } <= found


@pytest.mark.parametrize(("column", "first", "second", "expected"), [
    # Two versions of one resource trade contents.
    ("content", 3, 5, {("hash_mismatch", "documents/a", 2), ("hash_mismatch", "documents/a", 3)}),
    # Two revisions trade names: each now claims to be another resource's version 1.
    ("name", 2, 4, {("hash_mismatch", "notes/n", 1), ("hash_mismatch", "documents/b", 1),
                    ("resource_chain_broken", "documents/b", 2)}),
])
def test_swapped_versions_are_named(cli: Any, ledger: Path, column: str, first: int,
                                    second: int, expected: set[tuple[str, str, int]]) -> None:
    with closing(sqlite3.connect(ledger)) as connection:
        a, b = (connection.execute(f"SELECT {column} FROM versions WHERE revision = ?",
                                   (revision,)).fetchone()[0] for revision in (first, second))
    # Through a placeholder: (name, version) is unique at every step.
    tamper(ledger, *((f"UPDATE versions SET {column} = ? WHERE revision = ?", params)
                     for params in (("x/placeholder", first), (a, second), (b, first))))
    assert expected <= problems(cli("verify", "--db", ledger, "--json"))


@pytest.mark.parametrize(("sql", "expected"), [
    ("UPDATE versions SET deleted = 0 WHERE revision = 6", {("hash_mismatch", "documents/b", 2)}),
    ("UPDATE versions SET content = x'7b7d' WHERE revision = 6",
     {("hash_mismatch", "documents/b", 2), ("bad_tombstone", "documents/b", 2),
      ("size_mismatch", "documents/b", 2)}),
    ("UPDATE versions SET deleted = 2 WHERE revision = 6", {("bad_tombstone", "documents/b", 2)}),
])
def test_an_altered_tombstone_is_named(cli: Any, ledger: Path, sql: str,
                                       expected: set[tuple[str, str, int]]) -> None:
    tamper(ledger, (sql, ()))
    assert expected <= problems(cli("verify", "--db", ledger, "--json"))


def test_a_forged_tombstone_with_a_valid_hash_breaks_the_links_after_it(
        cli: Any, ledger: Path) -> None:
    v = rows(ledger)[4]  # documents/a version 3, revision 5
    forged = Version(v.name, v.version, v.revision, b"", "", v.create_time_us, v.update_time_us,
                     v.actor, "deleted", True, v.previous_hash, v.ledger_previous_hash, b"", 0)
    tamper(ledger, ("UPDATE versions SET content = x'', content_type = '', deleted = 1, "
                    "reason = 'deleted', size = 0, hash = ? WHERE revision = 5",
                    (compute_hash(forged),)))
    found = problems(cli("verify", "--db", ledger, "--json"))
    assert ("ledger_chain_broken", "documents/b", 2) in found  # revision 6
    assert ("resource_chain_broken", "documents/a", 4) in found
    assert not any(kind == "hash_mismatch" for kind, _, _ in found)


def test_a_row_of_the_wrong_type_is_reported_not_a_crash(cli: Any, ledger: Path) -> None:
    tamper(ledger, ("UPDATE versions SET content = 'text, not a blob' WHERE revision = 4", ()))
    assert ("malformed", "notes/n", 1) in problems(cli("verify", "--db", ledger, "--json"))


def test_a_tampered_heads_table_is_named(cli: Any, ledger: Path) -> None:
    with closing(sqlite3.connect(ledger)) as connection:
        connection.execute("UPDATE heads SET version = 2 WHERE name = 'documents/a'")
        connection.commit()
    assert problems(cli("verify", "--db", ledger, "--json")) == {
        ("head_mismatch", "documents/a", 2)}


def test_a_rewritten_history_fails_an_earlier_digest(cli: Any, ledger: Path) -> None:
    earlier = cli("digest", "--db", ledger).out.strip()
    forged = b'{"title":"forged","n":2}'
    tamper(ledger, ("UPDATE versions SET content = ?, size = ? WHERE revision = 3",
                    (forged, len(forged))))
    rechain_from(ledger, 3)
    assert cli("verify", "--db", ledger).code == 0  # both chains recomputed: they hold
    assert problems(cli("verify", "--db", ledger, "--digest", earlier, "--json")) == {
        ("digest_mismatch", "", 0)}


def test_a_truncated_tail_fails_an_earlier_digest(cli: Any, ledger: Path) -> None:
    earlier = cli("digest", "--db", ledger).out.strip()
    tamper(ledger, ("DELETE FROM versions WHERE revision = 8", ()),
           ("UPDATE heads SET version = 2, deleted = 1 WHERE name = 'documents/b'", ()))
    assert cli("verify", "--db", ledger).code == 0
    run = cli("verify", "--db", ledger, "--digest", earlier)
    assert run.code == 1
    assert "truncated" in run.out


def test_a_ledger_extends_its_own_earlier_digests(cli: Any, ledger: Path) -> None:
    earlier = cli("digest", "--db", ledger, "--revision", "5").out.strip()
    assert earlier.startswith("5:")
    run = cli("verify", "--db", ledger, "--digest", earlier)
    assert run.code == 0, run.out
    assert f"the ledger extends digest {earlier}" in run.out


def test_a_malformed_digest_is_a_usage_error(cli: Any, ledger: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli("verify", "--db", ledger, "--digest", "latest")
    assert exited.value.code == 2
    assert "REVISION:64-hex-digits" in capsys.readouterr().err


# --- digest --------------------------------------------------------------------------------


def test_digest_is_the_one_verify_prints(cli: Any, ledger: Path) -> None:
    digest = cli("digest", "--db", ledger).out.strip()
    assert cli("verify", "--db", ledger, "--json").json()["digest"] == digest
    view = cli("digest", "--db", ledger, "--revision", "3", "--json").json()
    assert view["revision"] == 3
    assert view["digest"].startswith("3:")
    assert view["digest"] != digest


def test_digest_past_the_end_is_not_found(cli: Any, ledger: Path) -> None:
    run = cli("digest", "--db", ledger, "--revision", "9")
    assert run.code == 3
    assert "ends at revision 8" in run.err


def test_digest_of_a_broken_ledger_is_refused(cli: Any, ledger: Path) -> None:
    tamper(ledger, ("UPDATE versions SET actor = 'mallory' WHERE revision = 2", ()))
    run = cli("digest", "--db", ledger)
    assert run.code == 1
    assert not run.out.strip().startswith("8:")
    assert "does not verify" in run.err


# --- export and import ---------------------------------------------------------------------


def test_export_then_import_gives_a_ledger_with_the_same_digest(cli: Any, ledger: Path,
                                                               tmp_path: Path) -> None:
    export = tmp_path / "export.jsonl"
    run = cli("export", "--db", ledger, "--output", export)
    assert run.code == 0, run.err
    assert "exported 8 versions" in run.out
    assert not Path(f"{export}.partial").exists()
    records = [json.loads(line) for line in export.read_text().splitlines()]
    assert [r["record"] for r in records] == ["header", *["version"] * 8, "end"]
    copy = tmp_path / "copy" / "imported.db"
    imported = cli("import", export, "--db", f"sqlite:///{copy}", "--json")
    assert imported.code == 0, imported.err
    assert imported.json()["versions"] == 8
    assert cli("verify", "--db", copy).code == 0
    assert cli("digest", "--db", copy).out == cli("digest", "--db", ledger).out
    assert cli("log", "--db", copy, "--json").out == cli("log", "--db", ledger, "--json").out


def test_export_to_stdout_is_the_same_json_lines(cli: Any, ledger: Path, tmp_path: Path) -> None:
    cli("export", "--db", ledger, "-o", tmp_path / "file.jsonl")
    run = cli("export", "--db", ledger)
    assert run.out == (tmp_path / "file.jsonl").read_text()
    assert "exported 8 versions" in run.err


def test_import_refuses_a_tampered_export_and_leaves_nothing(cli: Any, ledger: Path,
                                                            tmp_path: Path) -> None:
    export = tmp_path / "export.jsonl"
    cli("export", "--db", ledger, "-o", export)
    lines = export.read_text().splitlines(keepends=True)
    record = json.loads(lines[6])  # revision 6: the tombstone of documents/b
    record["reason"] = "who knows"
    lines[6] = json.dumps(record) + "\n"
    export.write_text("".join(lines))
    target = tmp_path / "new.db"
    run = cli("import", export, "--db", target)
    assert run.code == 1
    assert "documents/b version 2" in run.err
    assert "nothing was imported" in run.err
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith("new.db")]


def test_import_refuses_a_truncated_export(cli: Any, ledger: Path, tmp_path: Path) -> None:
    export = tmp_path / "export.jsonl"
    cli("export", "--db", ledger, "-o", export)
    export.write_text("".join(export.read_text().splitlines(keepends=True)[:-1]))
    run = cli("import", export, "--db", tmp_path / "new.db", "--json")
    assert run.code == 1
    assert "truncated" in run.lines()[0]["error"]
    assert not (tmp_path / "new.db").exists()


def test_import_refuses_a_ledger_that_is_not_empty(cli: Any, ledger: Path,
                                                  tmp_path: Path) -> None:
    export = tmp_path / "export.jsonl"
    cli("export", "--db", ledger, "-o", export)
    before = ledger.read_bytes()
    run = cli("import", export, "--db", ledger)
    assert run.code == 2
    assert "already holds versions" in run.err
    assert ledger.read_bytes() == before


async def test_import_refused_into_an_existing_empty_ledger_leaves_it_empty(
        cli: Any, ledger: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty.db"
    async with serve(Settings(db=f"sqlite:///{empty}", grpc_listen="127.0.0.1:0", no_http=True)):
        pass
    export = tmp_path / "export.jsonl"
    cli("export", "--db", ledger, "-o", export)
    lines = export.read_text().splitlines(keepends=True)
    export.write_text("".join(lines[:-1]) + lines[-1].replace('"versions":8', '"versions":7'))
    assert cli("import", export, "--db", empty).code == 1
    assert empty.exists()
    with closing(sqlite3.connect(empty)) as connection:
        assert connection.execute("SELECT count(*) FROM versions").fetchone() == (0,)
    export.write_text("".join(lines))
    assert cli("import", export, "--db", empty).code == 0
    assert cli("verify", "--db", empty).code == 0


async def test_import_refuses_a_file_a_server_holds(cli: Any, ledger: Path, tmp_path: Path,
                                                    server: RunningServer,
                                                    settings: Settings) -> None:
    export = tmp_path / "export.jsonl"
    cli("export", "--db", ledger, "-o", export)
    run = await asyncio.to_thread(cli, "import", export, "--db", settings.db)
    assert run.code == 3
    assert "stop it before importing" in run.err


def test_import_reads_stdin(cli: Any, ledger: Path, tmp_path: Path,
                            monkeypatch: pytest.MonkeyPatch) -> None:
    export = tmp_path / "export.jsonl"
    cli("export", "--db", ledger, "-o", export)
    with export.open("rb") as stdin:
        monkeypatch.setattr("sys.stdin", type("Stdin", (), {"buffer": stdin})())
        run = cli("import", "-", "--db", tmp_path / "piped.db")
    assert run.code == 0, run.err
    assert "imported 8 versions" in run.out


# --- while a server runs; stats; the other offline readers ---------------------------------


async def test_verify_reads_a_file_while_its_server_runs(cli: Any, server: RunningServer,
                                                         settings: Settings) -> None:
    async with connect(server.target) as client:
        await client.create("documents", b"{}", resource_id="live")
        run = await asyncio.to_thread(cli, "verify", "--db", settings.db, "--json")
        await client.create("documents", b"{}", resource_id="later")
    assert run.code == 0, run.err
    assert run.json()["versions"] == 1


def test_stats_counts_the_ledger(cli: Any, ledger: Path) -> None:
    stats = cli("stats", "--db", ledger, "--json").json()
    assert {key: stats[key] for key in ("revision", "resources", "live_resources", "versions",
                                        "tombstones")} == {
        "revision": 8, "resources": 3, "live_resources": 3, "versions": 8, "tombstones": 1}
    assert stats["bytes"] == sum(v.size for v in rows(ledger))
    assert stats["writes_last_day"] == 8
    table = cli("stats", "--db", ledger)
    assert table.code == 0
    assert "tombstones" in table.out


def test_log_reads_the_file_in_revision_order(cli: Any, ledger: Path) -> None:
    entries = cli("log", "--db", ledger, "--json").lines()
    assert [(e["revision"], e["name"], e["version"]) for e in entries] == LEDGER
    assert [e["event"] for e in entries][4:] == ["updated", "deleted", "updated", "created"]
    assert entries[0]["reason"] == "first draft"
    assert {e["actor"] for e in entries} == {"anonymous"}
    documents = cli("log", "--db", ledger, "--prefix", "documents", "--since", "4",
                    "--limit", "2", "--json").lines()
    assert [e["revision"] for e in documents] == [5, 6]
    text = cli("log", "--db", ledger).out
    assert "documents/b@2" in text
    assert "obsolete" in text


def test_get_history_and_diff_read_the_file(cli: Any, ledger: Path) -> None:
    got = cli("get", "documents/a", "--db", ledger, "--json").json()
    assert (got["version"], got["content"]) == (4, '{"title":"fourth","n":4,"tags":["x"]}')
    history = cli("history", "documents/b", "--db", ledger, "--json").lines()
    assert [(h["version"], h["deleted"], h["reason"]) for h in history] == [
        (1, False, ""), (2, True, "obsolete"), (3, False, "")]
    diff = cli("diff", "documents/a", "1", "4", "--db", ledger, "--json").json()
    assert diff["changes"] == [
        {"op": "replace", "path": "/title", "value": "fourth", "old": "draft"},
        {"op": "replace", "path": "/n", "value": 4, "old": 1},
        {"op": "add", "path": "/tags", "value": ["x"]}]


@pytest.mark.parametrize(("args", "code", "message"), [
    (("verify", "--db", "missing.db"), 3, "no such ledger file"),
    (("verify", "--db", "mysql://x/y"), 2, "read SQLite ledger files"),
    (("verify", "--db", "sqlite://relative"), 2, "sqlite:///path"),
    (("stats",), 2, "give --db"),
    (("get", "documents/zz", "--db", "LEDGER"), 3, "does not exist"),
    (("get", "documents", "--db", "LEDGER"), 2, "names a collection"),
])
def test_offline_failures_have_their_exit_codes(cli: Any, ledger: Path, args: tuple[str, ...],
                                                code: int, message: str) -> None:
    run = cli(*(str(ledger) if arg == "LEDGER" else arg for arg in args))
    assert run.code == code
    assert message in run.err


def test_a_file_that_is_not_a_ledger_is_not_found(cli: Any, tmp_path: Path) -> None:
    other = tmp_path / "other.db"
    with closing(sqlite3.connect(other)) as connection:
        connection.execute("CREATE TABLE t (x)")
    run = cli("verify", "--db", other)
    assert run.code == 3
    assert "not a casledger ledger" in run.err


def test_casledger_db_selects_offline_mode(cli: Any, ledger: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CASLEDGER_DB", f"sqlite:///{ledger}")
    monkeypatch.setenv("CASLEDGER_TARGET", "127.0.0.1:1")  # nothing listens: offline or fail
    assert cli("verify", "--json").json()["mode"] == "offline"
    assert cli("get", "notes/n", "--raw").out == "hello\nworld\n"


def test_an_online_only_command_has_no_db_flag(cli: Any, ledger: Path) -> None:
    with pytest.raises(SystemExit) as exited:
        cli("tail", "--db", ledger)
    assert exited.value.code == 2


async def test_reading_a_copy_never_writes_to_it(cli: Any, server: RunningServer,
                                                settings: Settings, tmp_path: Path) -> None:
    # A copy taken from a live server: its last writes are still in the WAL file.
    async with connect(server.target) as client:
        for i in range(3):
            await client.create("documents", b"{}", resource_id=f"d{i}")
    copy = tmp_path / "copy" / "ledger.db"
    before = await asyncio.to_thread(_copy_with_wal, settings.db, copy)
    run = await asyncio.to_thread(cli, "verify", "--db", copy, "--json")
    assert run.json()["versions"] == 3  # the WAL was read ...
    assert await asyncio.to_thread(_contents, copy) == before  # ... and not merged into the file


def _copy_with_wal(url: str, copy: Path) -> tuple[bytes, bytes]:
    live = Path(url.removeprefix("sqlite:///"))
    copy.parent.mkdir()
    for suffix in ("", "-wal"):
        shutil.copy(f"{live}{suffix}", f"{copy}{suffix}")
    return _contents(copy)


def _contents(db: Path) -> tuple[bytes, bytes]:
    return db.read_bytes(), Path(f"{db}-wal").read_bytes()


# --- verify --jobs: slices checked at once give the answer of one pass ---------------------


def _swap(column: str, first: int, second: int) -> Callable[[Path], None]:
    def swap(db: Path) -> None:
        with closing(sqlite3.connect(db)) as connection:
            a, b = (connection.execute(f"SELECT {column} FROM versions WHERE revision = ?",
                                       (revision,)).fetchone()[0] for revision in (first, second))
        tamper(db, *((f"UPDATE versions SET {column} = ? WHERE revision = ?", params)
                     for params in (("x/placeholder", first), (a, second), (b, first))))
    return swap


def _forge_tombstone(db: Path) -> None:
    v = rows(db)[4]
    forged = Version(v.name, v.version, v.revision, b"", "", v.create_time_us, v.update_time_us,
                     v.actor, "deleted", True, v.previous_hash, v.ledger_previous_hash, b"", 0)
    tamper(db, ("UPDATE versions SET content = x'', content_type = '', deleted = 1, "
                "reason = 'deleted', size = 0, hash = ? WHERE revision = 5",
                (compute_hash(forged),)))


def _rewrite_history(db: Path) -> None:
    forged = b'{"title":"forged","n":2}'
    tamper(db, ("UPDATE versions SET content = ?, size = ? WHERE revision = 3",
                (forged, len(forged))))
    rechain_from(db, 3)


def _sql(*statements: str) -> Callable[[Path], None]:
    return lambda db: tamper(db, *((statement, ()) for statement in statements))


# Every tampering of the tests above, and values of the wrong type the slices must step aside for.
TAMPERINGS: dict[str, Callable[[Path], None]] = {
    "intact": lambda db: None,
    "edited content": lambda db: tamper(db, (
        "UPDATE versions SET content = ? WHERE name = ? AND version = ?",
        (b'{"title":"forged","n":2}', "documents/a", 2))),
    "edited metadata": _sql("UPDATE versions SET reason = 'nothing to see' WHERE revision = 6"),
    "deleted middle version": _sql(
        "DELETE FROM versions WHERE name = 'documents/a' AND version = 2"),
    "swapped contents": _swap("content", 3, 5),
    "swapped names": _swap("name", 2, 4),
    "tombstone undone": _sql("UPDATE versions SET deleted = 0 WHERE revision = 6"),
    "tombstone with content": _sql("UPDATE versions SET content = x'7b7d' WHERE revision = 6"),
    "deleted flag 2": _sql("UPDATE versions SET deleted = 2 WHERE revision = 6"),
    "forged tombstone": _forge_tombstone,
    "content of the wrong type": _sql(
        "UPDATE versions SET content = 'text, not a blob' WHERE revision = 4"),
    "tampered heads": _sql("UPDATE heads SET version = 2 WHERE name = 'documents/a'"),
    "rewritten history": _rewrite_history,
    "truncated tail": _sql(
        "DELETE FROM versions WHERE revision = 8",
        "UPDATE heads SET version = 2, deleted = 1 WHERE name = 'documents/b'"),
    "version as text": _sql("UPDATE versions SET version = 'two' WHERE revision = 3"),
    "time as text": _sql("UPDATE versions SET update_time_us = 'later' WHERE revision = 4"),
    "hash as text": _sql("UPDATE versions SET hash = 'forged' WHERE revision = 5"),
}


class Counting(Verifier):
    """Counts the chunks absorbed and those it had to be fed instead. Its first feed is slow,
    so that the workers take chunks (this process takes every chunk no worker has started)."""

    absorbed = fed = 0
    slow_start = False

    def feed_rows(self, rows: Iterable[Row]) -> int:
        if self.slow_start:
            self.slow_start = False
            time.sleep(0.2)
        return super().feed_rows(rows)

    def absorb(self, summary: SliceSummary) -> bool:
        done = super().absorb(summary)
        if done:
            self.absorbed += 1
        else:
            self.fed += 1
        return done


@pytest.fixture(scope="module")
def workers() -> Iterator[ProcessPoolExecutor]:
    """Two worker processes for the whole module: started once, not once per test."""
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        yield pool


@pytest.fixture(scope="module")
def digest_at_5(pristine: Path) -> Digest:
    verifier = Verifier(digest_at=5)
    with open_sqlite_reader(str(pristine)) as reader:
        check_file(reader, str(pristine), verifier, reader.revision(), 1)
    assert verifier.target_digest is not None
    return verifier.target_digest


def check(db: Path, jobs: int, workers: ProcessPoolExecutor | None,
          expected: Digest) -> tuple[dict[str, Any], Counting]:
    """What `verify --digest expected` finds, in `jobs` processes."""
    verifier = Counting(digest_at=expected.revision)
    verifier.slow_start = jobs > 1
    with open_sqlite_reader(str(db)) as reader:
        check_file(reader, str(db), verifier, reader.revision(), jobs, workers=workers)
        verifier.check_heads(reader.heads())
    verifier.check_digest(expected)
    return {"problems": verifier.problems, "problem_count": verifier.problem_count,
            "versions": verifier.versions, "revision": verifier.revision,
            "resources": verifier.resources, "heads": list(verifier.heads()),
            "digest": verifier.digest(), "target": verifier.target_digest}, verifier


@pytest.mark.parametrize("jobs", [1, 2, 3])
@pytest.mark.parametrize("tampering", list(TAMPERINGS))
def test_jobs_report_what_one_pass_reports(ledger: Path, tampering: str, jobs: int,
                                           workers: ProcessPoolExecutor,
                                           digest_at_5: Digest) -> None:
    TAMPERINGS[tampering](ledger)
    single, _ = check(ledger, 1, None, digest_at_5)
    sliced, verifier = check(ledger, jobs, workers, digest_at_5)
    assert sliced == single
    assert verifier.absorbed + verifier.fed >= (jobs > 1)
    if tampering in ("intact", "edited content", "deleted middle version", "rewritten history"):
        assert verifier.fed == 0  # the slices were stitched, not read again


def test_verify_jobs_prints_what_one_pass_prints(cli: Any, ledger: Path) -> None:
    TAMPERINGS["swapped names"](ledger)
    one = cli("verify", "--db", ledger, "--json", "--jobs", "1").json()
    three = cli("verify", "--db", ledger, "--json", "-j", "3").json()
    assert one.pop("seconds") >= 0
    assert three.pop("seconds") >= 0
    assert three == one
    assert {("hash_mismatch", "notes/n", 1), ("resource_chain_broken", "documents/b", 2)} <= {
        (p["kind"], p["name"], p["version"]) for p in three["problems"]}


def test_digest_and_verify_digest_with_jobs(cli: Any, ledger: Path) -> None:
    earlier = cli("digest", "--db", ledger, "--revision", "5", "--jobs", "2").out.strip()
    assert earlier == cli("digest", "--db", ledger, "--revision", "5", "--jobs", "1").out.strip()
    assert earlier.startswith("5:")
    run = cli("verify", "--db", ledger, "--digest", earlier, "--jobs", "2")
    assert run.code == 0, run.out
    assert f"the ledger extends digest {earlier}" in run.out
    _rewrite_history(ledger)
    assert problems(cli("verify", "--db", ledger, "--digest", earlier, "--jobs", "3",
                        "--json")) == {("digest_mismatch", "", 0)}


@pytest.mark.parametrize("jobs", ["0", "-1", "two"])
def test_jobs_must_be_a_positive_number(cli: Any, ledger: Path, jobs: str,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli("verify", "--db", ledger, "--jobs", jobs)
    assert exited.value.code == 2


def test_the_default_jobs_split_only_ledgers_worth_it() -> None:
    cpus = os.cpu_count() or 1
    assert jobs_for(None, 8, 1 << 20) == 1
    assert jobs_for(None, 10 * MIN_SLICE_VERSIONS * cpus) == cpus
    assert jobs_for(None, 2 * cpus, 10 * MIN_SLICE_BYTES * cpus) == cpus  # big versions
    assert jobs_for(None, 1, 10 * MIN_SLICE_BYTES * cpus) == 1
    assert jobs_for(4, 8) == 4
    assert jobs_for(4, 2) == 2


@pytest.mark.parametrize(("upto", "jobs", "smallest"), [
    (1, 2, 1), (2, 2, 1), (9, 3, 1), (100, 2, 6), (10**6, 2, 1900), (10**6, 5, 4096)])
def test_chunks_cover_the_revisions_once_and_shrink_towards_the_middle(
        upto: int, jobs: int, smallest: int) -> None:
    plan = chunks(upto, jobs, smallest)
    assert plan[0][0] == 0
    assert plan[-1][1] == upto
    assert all(earlier[1] == later[0] for earlier, later in itertools.pairwise(plan))
    sizes = [last - after for after, last in plan]
    assert min(sizes) >= min(smallest, upto)
    assert sizes[-1] <= max(smallest, upto // (4 * jobs))
    back = [last - after for after, last in plan if after >= upto // 2]
    assert back == sorted(back)  # growing from the middle to the end
