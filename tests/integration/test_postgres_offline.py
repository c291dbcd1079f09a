"""The offline commands on a PostgreSQL ledger (``--db postgresql://...``) and `casledger
migrate` between the backends: the same answers as on SQLite, the same tamper evidence, and
copies that verify to the same digest, or nothing copied at all."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from casledger.service.cli import main
from casledger.service.model import Precondition, Write, WriteKind
from casledger.service.storage import StoreOptions, import_ledger, open_reader, open_store
from tests.support import postgres


def _create(name: str, content: bytes, content_type: str = "application/json",
            reason: str = "") -> Write:
    return Write(WriteKind.CREATE, name, content, content_type, reason=reason)


def _replace(name: str, content: bytes, version: int, reason: str = "") -> Write:
    return Write(WriteKind.UPDATE, name, content, "application/json",
                 precondition=Precondition.of_version(version), reason=reason)


async def _write_ledger(url: str) -> None:
    """8 revisions: JSON and text, a tombstone, a re-creation (as test_cli_verify's ledger)."""
    async with open_store(url, StoreOptions()) as store:
        await store.write(_create("documents/a", b'{"title":"draft","n":1}', reason="first"))
        await store.write(_create("documents/b", b'{"b":1}'))
        await store.write(_replace("documents/a", b'{"title":"second","n":2}', 1, "edit"))
        await store.write(_create("notes/n", b"hello\nworld\n", "text/plain"))
        await store.write(_replace("documents/a", b'{"title":"third","n":3}', 2))
        await store.write(Write(WriteKind.DELETE, "documents/b",
                                precondition=Precondition.of_version(1), reason="obsolete"))
        await store.write(_replace("documents/a", b'{"n":4,"tags":["x"]}', 3))
        await store.write(_create("documents/b", b'{"b":2}'))


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite ledger written once by the store."""
    db = tmp_path_factory.mktemp("pristine") / "ledger.db"
    asyncio.run(_write_ledger(f"sqlite:///{db}"))
    return db


@pytest.fixture
def new_pg() -> Iterator[list[str]]:
    """The PostgreSQL ledgers this test made (dropped after it); skips without PostgreSQL."""
    if (reason := postgres.unavailable()) is not None:
        pytest.skip(reason)
    made: list[str] = []
    yield made
    for url in made:
        postgres.drop_ledger(url)


@pytest.fixture
def pg_url(new_pg: list[str]) -> str:
    """A new, empty PostgreSQL ledger."""
    new_pg.append(postgres.create_ledger())
    return new_pg[-1]


@pytest.fixture(autouse=True)
def _no_casledger_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("CASLEDGER_DB", "CASLEDGER_TARGET", "FORCE_COLOR", "COLUMNS"):
        monkeypatch.delenv(name, raising=False)


@dataclass
class Run:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Any:
    def run(*args: str | Path) -> Run:
        code = main([str(arg) for arg in args])
        captured = capsys.readouterr()
        return Run(code, captured.out, captured.err)

    return run


@pytest.fixture
def ledger(cli: Any, pristine: Path, pg_url: str) -> str:
    """The pristine ledger, migrated into PostgreSQL."""
    run = cli("migrate", "--from", pristine, "--to", pg_url)
    assert run.code == 0, run.err
    return pg_url


def _without_timing(view: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in view.items() if k not in ("seconds", "mode")}


@pytest.mark.parametrize("command", [
    ("verify", "--json"), ("digest",), ("digest", "--revision", "5"), ("log", "--json"),
    ("log", "--prefix", "documents", "--since", "4", "--json"), ("export",),
    ("get", "documents/a", "--json"), ("get", "documents/b", "--version", "2", "--json"),
    ("history", "documents/b", "--json"), ("diff", "documents/a", "1", "4", "--json"),
])
def test_offline_commands_answer_the_same_on_both_backends(
        cli: Any, pristine: Path, ledger: str, command: tuple[str, ...]) -> None:
    on_sqlite = cli(*command, "--db", pristine)
    on_postgres = cli(*command, "--db", ledger)
    assert (on_postgres.code, on_sqlite.code) == (0, 0), on_postgres.err
    if command[0] == "verify":
        assert _without_timing(on_postgres.json()) == _without_timing(on_sqlite.json())
        assert on_postgres.json()["ok"] is True
    else:
        assert on_postgres.out == on_sqlite.out
        assert on_postgres.out


def test_stats_of_a_postgres_ledger(cli: Any, ledger: str) -> None:
    stats = cli("stats", "--db", ledger, "--json").json()
    assert {k: stats[k] for k in ("revision", "resources", "live_resources", "versions",
                                  "tombstones", "writes_last_day")} == {
        "revision": 8, "resources": 3, "live_resources": 3, "versions": 8, "tombstones": 1,
        "writes_last_day": 8}


def test_not_found_and_unreachable_exit_3(cli: Any, ledger: str, new_pg: list[str]) -> None:
    missing = cli("get", "documents/zz", "--db", ledger)
    assert (missing.code, "does not exist" in missing.err) == (3, True)
    unreachable = cli("verify", "--db", "postgresql://casledger:pw@127.0.0.1:1/x")
    assert unreachable.code == 3
    assert "cannot connect" in unreachable.err
    assert ":pw@" not in unreachable.err
    new_pg.append(postgres.create_ledger())
    empty = cli("verify", "--db", new_pg[-1])  # a database (schema) that holds no ledger
    assert (empty.code, "not a casledger ledger" in empty.err) == (3, True)


def test_verify_catches_tampering_in_postgres(cli: Any, ledger: str) -> None:
    earlier = cli("digest", "--db", ledger).out.strip()
    postgres.execute(ledger, "ALTER TABLE versions DISABLE TRIGGER USER; "
                             "UPDATE versions SET content = '{\"title\":\"forged\",\"n\":2}' "
                             "WHERE revision = 3; ALTER TABLE versions ENABLE TRIGGER USER")
    report = cli("verify", "--db", ledger, "--digest", earlier, "--json")
    assert report.code == 1
    kinds = {(p["kind"], p["revision"]) for p in report.json()["problems"]}
    assert ("hash_mismatch", 3) in kinds
    assert cli("digest", "--db", ledger).code == 1  # no digest vouches for it


def test_verify_catches_a_head_that_points_elsewhere(cli: Any, ledger: str) -> None:
    postgres.execute(ledger, "UPDATE heads SET version = 3 WHERE name = 'documents/a'")
    report = cli("verify", "--db", ledger, "--json")
    assert report.code == 1
    assert {p["kind"] for p in report.json()["problems"]} == {"head_mismatch"}


def test_migrate_sqlite_to_postgres_and_back_keeps_every_byte(
        cli: Any, pristine: Path, pg_url: str, tmp_path: Path) -> None:
    there = cli("migrate", "--from", f"sqlite:///{pristine}", "--to", pg_url, "--json")
    assert there.code == 0, there.err
    summary = there.json()
    assert (summary["ok"], summary["versions"]) == (True, 8)
    assert summary["digest"] == summary["destination_digest"]
    back = tmp_path / "back.db"
    again = cli("migrate", "--from", pg_url, "--to", back)
    assert again.code == 0, again.err
    assert summary["digest"] in again.out
    exports = [cli("export", "--db", db).out for db in (pristine, pg_url, back)]
    assert exports[0] == exports[1] == exports[2]
    # The copy is a ledger like any other: a server continues its chain.
    assert cli("verify", "--db", back).code == 0


async def test_a_running_replica_chains_onto_an_import(pristine: Path, pg_url: str) -> None:
    async with open_store(pg_url) as store:
        def load() -> int:
            with open_reader(str(pristine)) as reader:
                return import_ledger(pg_url, (v for batch in reader.versions() for v in batch))

        assert await asyncio.to_thread(load) == 8
        async with asyncio.timeout(10):
            while store.hub.revision < 8:  # noqa: ASYNC110 (woken by the import's NOTIFY)
                await asyncio.sleep(0.01)
        written = await store.write(_replace("documents/b", b'{"b":3}', 3))
        assert (written.revision, written.version) == (9, 4)
        # Chained to the import's last revision (8: documents/b version 3).
        assert written.ledger_previous_hash == (await store.get("documents/b", 3)).hash


def test_migrate_refuses_a_destination_that_holds_versions(cli: Any, pristine: Path,
                                                           ledger: str) -> None:
    before = cli("digest", "--db", ledger).out
    run = cli("migrate", "--from", pristine, "--to", ledger)
    assert (run.code, "already holds versions" in run.err) == (2, True)
    assert cli("digest", "--db", ledger).out == before


def test_migrate_refuses_a_source_that_does_not_verify_and_copies_nothing(
        cli: Any, pristine: Path, pg_url: str, tmp_path: Path) -> None:
    forged = tmp_path / "forged.db"
    with closing(sqlite3.connect(pristine)) as source, closing(sqlite3.connect(forged)) as copy:
        source.backup(copy)
        copy.execute("DROP TRIGGER versions_no_update")
        copy.execute("UPDATE versions SET content = x'7b7d' WHERE revision = 5")
        copy.commit()
    run = cli("migrate", "--from", forged, "--to", pg_url)
    assert run.code == 1
    assert "hash_mismatch" in run.err
    assert "nothing was copied" in run.err
    # Not even the schema the import created is left.
    assert postgres.fetchval(pg_url, "SELECT to_regclass('versions') IS NULL") is True


def test_import_an_export_into_postgres(cli: Any, pristine: Path, pg_url: str,
                                        tmp_path: Path) -> None:
    export = tmp_path / "export.jsonl"
    assert cli("export", "--db", pristine, "-o", export).code == 0
    imported = cli("import", export, "--db", pg_url, "--json")
    assert imported.code == 0, imported.err
    assert imported.json()["db"] == pg_url
    assert cli("digest", "--db", pg_url).out == cli("digest", "--db", pristine).out
    assert cli("import", export, "--db", pg_url).code == 2  # not empty any more


def test_migrate_needs_two_different_ledgers(cli: Any, pristine: Path) -> None:
    run = cli("migrate", "--from", pristine, "--to", f"sqlite:///{pristine}")
    assert (run.code, "same ledger" in run.err) == (2, True)
    assert cli("migrate", "--from", "mysql://x/y", "--to", pristine).code == 2
