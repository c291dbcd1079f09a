"""The ledger-wide inspection commands: verify, digest, export, import and stats.

They stream the whole ledger once, in revision order, through a
:class:`~casledger.service.verify.Verifier` — from a ledger file (offline, with a progress bar on
a terminal) or from a running service's Watch replay (online) — so tamper evidence is checked
whatever else they do: an export of a ledger that does not verify says so, a digest is never
printed for one, and an import refuses it. See :mod:`casledger.service.inspect` for the modes and
exit codes.

Offline, ``verify`` and ``digest`` read a SQLite ledger file's rows as they are and may check it in
several processes at once (``--jobs``, :func:`check_file`): contiguous slices of the revisions,
stitched in order into the answer one pass gives.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import multiprocessing
import os
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from contextlib import aclosing
from typing import IO, Any

from rich.text import Text

from .client import LedgerClient
from .follow import replay
from .inspect import (
    EXIT_OK,
    EXIT_UNAVAILABLE,
    EXIT_VERIFY_FAILED,
    OFFLINE,
    Command,
    CommandFailed,
    call_online,
    db_path,
    mode_of,
    open_reader,
)
from .model import Version
from .report import Output, Stopwatch, format_time, problem_view
from .storage import import_ledger, is_postgres, redact
from .storage.sqlite_offline import SQLiteReader, verify_slice
from .transfer import ImportRefused, end_line, header_line, read_export, version_line
from .verify import Digest, SliceSummary, Verifier

# --- verify, digest ------------------------------------------------------------------------

def _ignore(count: int) -> None:
    return None


# The default --jobs splits a ledger only into slices of at least this many versions or bytes of
# the file (about half a second of work each): below that, starting a worker process (~0.25 s)
# costs about as much as it saves.
MIN_SLICE_VERSIONS = 50_000
MIN_SLICE_BYTES = 256 << 20


def jobs_for(requested: int | None, revisions: int, file_bytes: int = 0) -> int:
    """How many processes check `revisions` revisions (of a file of `file_bytes`): `requested`
    (--jobs), at most one per revision; by default one per CPU, as long as each gets
    MIN_SLICE_VERSIONS versions or MIN_SLICE_BYTES of the file to check."""
    if requested is None:
        worth = max(revisions // MIN_SLICE_VERSIONS, file_bytes // MIN_SLICE_BYTES)
        return max(1, min(os.cpu_count() or 1, worth, revisions))
    return max(1, min(requested, revisions))


@contextlib.contextmanager
def _without_main_file() -> Iterator[None]:
    """While worker processes start: a spawned process imports its parent's ``__main__`` file
    first — for the ``casledger`` console script, the whole CLI (gRPC, rich ...: ~0.4 s and
    ~20 MiB more per worker) — unless it has no ``__file__`` (as under ``python -c``). A worker
    needs only :func:`verify_slice`'s module, which it imports by name."""
    main = sys.modules["__main__"]
    file = getattr(main, "__file__", None)
    if file is None or getattr(main, "__spec__", None) is not None:
        yield
        return
    del main.__file__
    try:
        yield
    finally:
        main.__file__ = file


def check_file(reader: SQLiteReader, path: str, verifier: Verifier, upto: int, jobs: int,
               advance: Callable[[int], None] = _ignore, workers: Executor | None = None) -> None:
    """Feed revisions 1..`upto` of the ledger file at `path` through `verifier`: in one pass, or
    cut into `jobs` contiguous slices checked at once — the first here, each other one in a
    worker process (spawned: it opens the file read-only itself) — and stitched in order
    (:meth:`Verifier.absorb`; see :mod:`casledger.service.verify`). A slice a worker gave up on
    is read again here, in order. Either way the problems and the state are those of one pass.
    `workers`: a pool of processes to use instead of starting `jobs` - 1 of them."""
    bounds = [upto * k // jobs for k in range(jobs + 1)]
    if jobs == 1:
        for rows in reader.rows(upto=upto):
            verifier.feed_rows(rows)
            advance(len(rows))
        return
    slices = list(itertools.pairwise(bounds))[1:]  # the workers'
    with contextlib.ExitStack() as stack:
        if workers is None:
            workers = stack.enter_context(ProcessPoolExecutor(
                jobs - 1, mp_context=multiprocessing.get_context("spawn")))
        with _without_main_file():  # the workers start in submit
            futures: list[Future[SliceSummary]] = [
                workers.submit(verify_slice, path, after, last, verifier.digest_at,
                               verifier.max_problems) for after, last in slices]
        # Slices not started yet are not worth starting if this ends early (those running end
        # with their slice; a Ctrl-C ends them too).
        stack.callback(lambda: [future.cancel() for future in futures])
        counted = [False] * len(futures)

        def count_finished() -> None:  # the workers' progress: whole slices
            for index, future in enumerate(futures):
                if not counted[index] and future.done():
                    counted[index] = True
                    advance(slices[index][1] - slices[index][0])

        for rows in reader.rows(upto=bounds[1]):
            verifier.feed_rows(rows)
            advance(len(rows))
            count_finished()
        for (after, last), future in zip(slices, futures, strict=True):
            if not verifier.absorb(future.result()):
                for rows in reader.rows(after=after, upto=last):
                    verifier.feed_rows(rows)
            count_finished()


def _feed(args: argparse.Namespace, out: Output, verifier: Verifier, *, upto: int | None = None,
          heads: bool = False, on_batch: Callable[[list[Version]], None] | None = None,
          on_start: Callable[[int], None] | None = None) -> None:
    """Stream the ledger (revisions 1..upto) through `verifier`, and through `on_batch`."""
    if mode_of(args) == OFFLINE:
        with open_reader(args) as reader:
            latest = reader.revision()
            if upto is not None and upto > latest:
                raise CommandFailed(f"the ledger ends at revision {latest}, before {upto}",
                                    EXIT_UNAVAILABLE)
            if on_start is not None:
                on_start(latest if upto is None else upto)
            with out.progress(upto or latest, args.command) as advance:
                if on_batch is None and isinstance(reader, SQLiteReader):
                    path, last = db_path(args), latest if upto is None else upto
                    jobs = jobs_for(getattr(args, "jobs", None), last,
                                    os.path.getsize(path) * last // max(latest, 1))
                    check_file(reader, path, verifier, last, jobs, advance)
                else:
                    for batch in reader.versions(upto=upto):
                        verifier.feed(batch)
                        if on_batch is not None:
                            on_batch(batch)
                        advance(len(batch))
            if heads:
                verifier.check_heads(reader.heads())
        return

    def accepted(revision: int) -> None:
        if on_start is not None:
            on_start(revision if upto is None else min(upto, revision))

    async def run(client: LedgerClient) -> None:
        async with aclosing(replay(client, on_accept=accepted)) as batches:
            async for stream_batch in batches:
                batch = [v for v in stream_batch if upto is None or v.revision <= upto]
                verifier.feed(batch)
                if on_batch is not None:
                    on_batch(batch)
                if upto is not None and stream_batch[-1].revision >= upto:
                    return

    call_online(args, run)
    if upto is not None and verifier.revision < upto:
        raise CommandFailed(f"the ledger ends at revision {verifier.revision}, before {upto}",
                            EXIT_UNAVAILABLE)


def _report_problems(out: Output, verifier: Verifier) -> None:
    out.problems(verifier.problems, verifier.problem_count)


def cmd_verify(args: argparse.Namespace, out: Output) -> int:
    expected: Digest | None = args.digest
    verifier = Verifier(digest_at=expected.revision if expected else None)
    clock = Stopwatch()
    _feed(args, out, verifier, heads=True)
    if expected is not None:
        verifier.check_digest(expected)
    digest = verifier.digest()
    if out.json_mode:
        out.json({"ok": verifier.ok, "mode": mode_of(args), "revision": verifier.revision,
                  "versions": verifier.versions, "resources": verifier.resources,
                  "digest": str(digest), "expected_digest": str(expected) if expected else None,
                  "problem_count": verifier.problem_count,
                  "problems": [problem_view(p) for p in verifier.problems],
                  "seconds": round(clock.seconds, 6)})
    else:
        _report_problems(out, verifier)
        summary = (f"{verifier.versions} versions of {verifier.resources} resources, revisions "
                   f"1..{verifier.revision}, in {clock.seconds:.2f} s")
        if verifier.ok:
            out.out.print(Text(f"OK: {summary}", style="green"))
            if expected is not None:
                out.out.print(f"the ledger extends digest {expected}")
            out.out.print(f"digest {digest}")
        else:
            out.out.print(Text(f"FAILED: {verifier.problem_count} broken links in {summary}",
                               style="bold red"))
    return EXIT_OK if verifier.ok else EXIT_VERIFY_FAILED


def cmd_digest(args: argparse.Namespace, out: Output) -> int:
    verifier = Verifier()
    _feed(args, out, verifier, upto=args.revision)
    if not verifier.ok:
        _report_problems(out, verifier)
        out.error(f"the ledger up to revision {verifier.revision} does not verify "
                  f"({verifier.problem_count} broken links): no digest vouches for it")
        return EXIT_VERIFY_FAILED
    digest = verifier.digest()
    if out.json_mode:
        out.json({"revision": digest.revision, "digest": str(digest),
                  "versions": verifier.versions, "resources": verifier.resources})
    else:
        out.out.print(str(digest))
    return EXIT_OK


# --- export, import ------------------------------------------------------------------------


def cmd_export(args: argparse.Namespace, out: Output) -> int:
    verifier = Verifier()
    partial = f"{args.output}.partial" if args.output else None
    stream: IO[str] = open(partial, "w", encoding="ascii") if partial else sys.stdout  # noqa: SIM115

    def start(revision: int) -> None:
        stream.write(header_line(revision))

    def write(batch: list[Version]) -> None:
        stream.write("".join(version_line(v) for v in batch))

    try:
        _feed(args, out, verifier, on_start=start, on_batch=write)
        stream.write(end_line(verifier.versions, verifier.digest()))
        stream.flush()
    except BaseException:
        if partial:
            stream.close()
            os.unlink(partial)
        raise
    if partial:
        stream.close()
        os.replace(partial, args.output)
    summary = {"ok": verifier.ok, "output": args.output or "-", "versions": verifier.versions,
               "revision": verifier.revision, "digest": str(verifier.digest()),
               "problem_count": verifier.problem_count}
    _summary(out, summary, to_stdout=bool(args.output),
             text=f"exported {verifier.versions} versions (revisions 1..{verifier.revision}) "
                  f"to {args.output or 'stdout'}; digest {verifier.digest()}")
    if not verifier.ok:
        _report_problems_err(out, verifier)
        return EXIT_VERIFY_FAILED
    return EXIT_OK


def _report_problems_err(out: Output, verifier: Verifier) -> None:
    for problem in verifier.problems:
        out.error(str(problem))
    out.error(f"the ledger does not verify ({verifier.problem_count} broken links); the export "
              "holds it as stored, and an import will refuse it")


def _summary(out: Output, summary: dict[str, Any], *, to_stdout: bool, text: str) -> None:
    if out.json_mode and to_stdout:
        out.json(summary)
    elif out.json_mode:
        sys.stderr.write(json.dumps(summary, separators=(",", ":")) + "\n")
    elif to_stdout:
        out.out.print(text)
    else:
        out.message(text)


def _lines(source: IO[bytes], advance: Callable[[int], None]) -> Iterator[bytes]:
    pending = 0
    for line in source:
        yield line
        pending += len(line)
        if pending >= 1 << 20:
            advance(pending)
            pending = 0
    advance(pending)


def cmd_import(args: argparse.Namespace, out: Output) -> int:
    path = db_path(args)
    verifier = Verifier(max_problems=1)
    source: IO[bytes] = sys.stdin.buffer if args.file == "-" else open(args.file, "rb")  # noqa: SIM115
    try:
        total = os.fstat(source.fileno()).st_size if args.file != "-" else None
        with out.progress(total or None, "importing") as advance:
            count = import_ledger(path, read_export(_lines(source, advance), verifier))
    except ImportRefused as refused:
        if out.json_mode:
            out.json({"ok": False, "line": refused.line, "error": str(refused),
                      "problem": problem_view(refused.problem) if refused.problem else None})
        out.error(f"import refused, nothing was imported: {refused}")
        return EXIT_VERIFY_FAILED
    finally:
        if source is not sys.stdin.buffer:
            source.close()
    digest = verifier.digest()
    shown = redact(path) if is_postgres(path) else path
    summary = {"ok": True, "db": shown, "versions": count, "revision": verifier.revision,
               "digest": str(digest)}
    _summary(out, summary, to_stdout=True,
             text=f"imported {count} versions into {shown}; digest {digest}")
    return EXIT_OK


# --- stats ---------------------------------------------------------------------------------


def cmd_stats(args: argparse.Namespace, out: Output) -> int:
    with open_reader(args) as reader:
        sizes = reader.sizes()
    view: dict[str, Any] = {
        "revision": sizes.revision, "resources": sizes.resources,
        "live_resources": sizes.live_resources, "versions": sizes.versions,
        "tombstones": sizes.tombstones, "bytes": sizes.bytes,
        "first_write": format_time(sizes.first_write_us, precise=True) if sizes.versions else None,
        "last_write": format_time(sizes.last_write_us, precise=True) if sizes.versions else None,
        "writes_last_minute": sizes.writes_last_minute,
        "writes_last_hour": sizes.writes_last_hour, "writes_last_day": sizes.writes_last_day,
        "writes_per_second_last_minute": round(sizes.writes_last_minute / 60, 3),
        "writes_per_second_last_hour": round(sizes.writes_last_hour / 3600, 3),
    }
    if out.json_mode:
        out.json(view)
    else:
        out.fields(view.items())
    return EXIT_OK


COMMANDS: dict[str, Command] = {
    "verify": cmd_verify, "digest": cmd_digest, "export": cmd_export, "import": cmd_import,
    "stats": cmd_stats,
}
