"""`casledger migrate --from URL --to URL`: copy a ledger between backends, verified.

The copy is ``casledger export --db FROM | casledger import - --db TO`` without the pipe: the
source is read from one snapshot and turned into export records
(:mod:`casledger.service.transfer`), which :func:`~casledger.service.transfer.read_export`
verifies one by one — hashes, both chains, then the end record's count and digest — as they are
loaded into the *empty* destination, in one transaction (all or nothing). The destination is then
read back and verified on its own, heads table included, and its digest must equal the source's.
Request ids (idempotency records) are not copied: they only serve retries within a day.

Either side is a SQLite file (``sqlite:///path`` or a path) or a PostgreSQL database
(``postgresql://...``), so SQLite -> PostgreSQL, back, and file to file all work.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator
from typing import Any

from .inspect import (
    DB_ENV,
    EXIT_OK,
    EXIT_USAGE,
    EXIT_VERIFY_FAILED,
    Command,
    CommandFailed,
    db_path,
)
from .report import Output, Stopwatch, problem_view
from .storage import LedgerReader, import_ledger, is_postgres, open_reader, redact
from .transfer import ImportRefused, end_line, header_line, read_export, version_line
from .verify import Verifier


def export_lines(reader: LedgerReader, on_batch: Callable[[int], None] | None = None
                 ) -> Iterator[str]:
    """The ledger `reader` sees, as the lines of an export (header, versions, end)."""
    digester = Verifier()
    yield header_line(reader.revision())
    for batch in reader.versions():
        digester.feed(batch)
        for version in batch:
            yield version_line(version)
        if on_batch is not None:
            on_batch(len(batch))
    yield end_line(digester.versions, digester.digest())


def verify_ledger(location: str) -> Verifier:
    """Read the ledger at `location` once through a verifier, heads table included."""
    verifier = Verifier()
    with open_reader(location) as reader:
        for batch in reader.versions():
            verifier.feed(batch)
        verifier.check_heads(reader.heads())
    return verifier


def _location(url: str, flag: str) -> str:
    return db_path(argparse.Namespace(db=url, command=f"migrate {flag}"))


def _shown(location: str) -> str:
    return redact(location) if is_postgres(location) else location


def cmd_migrate(args: argparse.Namespace, out: Output) -> int:
    source, destination = _location(args.source, "--from"), _location(args.destination, "--to")
    if source == destination:
        raise CommandFailed("--from and --to name the same ledger", EXIT_USAGE)
    clock = Stopwatch()
    loaded = Verifier(max_problems=1)
    with open_reader(source) as reader:
        total = reader.revision()
        with out.progress(total, "migrating") as advance:
            try:
                count = import_ledger(destination,
                                      read_export(export_lines(reader, advance), loaded))
            except ImportRefused as refused:
                if out.json_mode:
                    out.json({"ok": False, "error": str(refused), "problem":
                              problem_view(refused.problem) if refused.problem else None})
                out.error(f"migration refused, nothing was copied: the source does not verify "
                          f"at export {refused}")
                return EXIT_VERIFY_FAILED
    copied = verify_ledger(destination)
    ok = copied.ok and copied.digest() == loaded.digest()
    summary: dict[str, Any] = {
        "ok": ok, "from": _shown(source), "to": _shown(destination), "versions": count,
        "revision": loaded.revision, "digest": str(loaded.digest()),
        "destination_digest": str(copied.digest()), "problem_count": copied.problem_count,
        "seconds": round(clock.seconds, 6)}
    if out.json_mode:
        out.json(summary)
    elif ok:
        out.out.print(f"migrated {count} versions (revisions 1..{loaded.revision}) from "
                      f"{summary['from']} to {summary['to']} in {clock.seconds:.2f} s; both "
                      f"verify, digest {loaded.digest()}")
    if not ok:
        out.problems(copied.problems, copied.problem_count)
        out.error(f"the copy in {summary['to']} does not verify as the source does (digest "
                  f"{copied.digest()}, expected {loaded.digest()})")
        return EXIT_VERIFY_FAILED
    return EXIT_OK


def add_command(commands: Any) -> None:
    """Declare `casledger migrate` on the CLI's subcommands."""
    parser: argparse.ArgumentParser = commands.add_parser(
        "migrate", help="copy a ledger into an empty one, on another backend if need be; "
                        "verified",
        description="Copy every version of a ledger into an empty ledger (SQLite -> PostgreSQL, "
                    "back, or file to file), verifying the source as it loads and the copy "
                    "after; both digests must be equal. Request ids are not copied.")
    parser.add_argument("--from", dest="source", required=True, metavar="URL",
                        help=f"the ledger to copy: sqlite:///path, a path or postgresql://... "
                             f"(read from one snapshot; a server may keep serving it; not "
                             f"{DB_ENV})")
    parser.add_argument("--to", dest="destination", required=True, metavar="URL",
                        help="the empty ledger to copy into (created if need be; a PostgreSQL "
                             "database must exist)")
    parser.add_argument("--json", action="store_true",
                        help="one JSON document: ok, versions, revision and both digests")


COMMANDS: dict[str, Command] = {"migrate": cmd_migrate}
