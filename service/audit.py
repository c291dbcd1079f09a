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
from concurrent.futures import Executor, Future, ProcessPoolExecutor, wait
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


# Rows fed between two progress reports (and looks at the workers).
_PROGRESS_ROWS = 4096


def _feed_rows(reader: SQLiteReader, verifier: Verifier, after: int, upto: int,
               advance: Callable[[int], None] = _ignore,
               between: Callable[[], None] = lambda: None) -> None:
    """Feed revisions `after` + 1 .. `upto` through `verifier`, straight from the cursor."""
    with contextlib.closing(reader.scan(after=after, upto=upto)) as rows:
        while fed := verifier.feed_rows(itertools.islice(rows, _PROGRESS_ROWS)):
            advance(fed)
            between()


# The smallest chunk of revisions a worker is handed, in bytes of the file (at most _CHUNK_ROWS
# revisions): near where this process and the workers meet, what one side may wait for the other.
_CHUNK_BYTES = 8 << 20
_CHUNK_ROWS = 4096


def chunks(upto: int, jobs: int, smallest: int) -> list[tuple[int, int]]:
    """Revisions 1..`upto` cut into contiguous chunks (after, last], in order, for `jobs`
    processes that meet somewhere in the middle: this one takes them from the start, the workers
    from the end. Each worker chunk is about a 4·`jobs`-th of what lies between the two sides
    when it is taken (if every process goes alike), so they shrink to `smallest` revisions
    towards the middle and stay that size beyond it: whichever side is slower on the day takes
    fewer, and neither waits long for the other at the end."""
    first = min(upto, smallest)
    edges = [upto]
    while edges[-1] > first:
        between = upto - (upto - edges[-1]) * jobs // (jobs - 1)
        low = edges[-1] - max(smallest, between // (4 * jobs))
        edges.append(low if low - first >= smallest else first)
    edges.append(0)
    return list(itertools.pairwise(reversed(edges)))


def check_file(reader: SQLiteReader, path: str, verifier: Verifier, upto: int, jobs: int,
               advance: Callable[[int], None] = _ignore, workers: Executor | None = None) -> None:
    """Feed revisions 1..`upto` of the ledger file at `path` through `verifier`: in one pass, or
    in `jobs` processes at once, cut into :func:`chunks`. The workers (spawned: each opens the
    file read-only itself) check chunks from the end down; this process feeds the first chunk,
    then each next one no worker has started yet (its task is cancelled), and then stitches the
    workers' chunks on in order (:meth:`Verifier.absorb`; see :mod:`casledger.service.verify`).
    A chunk a worker gave up on is read again here, in order. Either way the problems and the
    state are those of one pass. `workers`: a pool of processes to use instead of starting
    `jobs` - 1 of them."""
    if jobs == 1:
        _feed_rows(reader, verifier, 0, upto, advance)
        return
    row_bytes = os.path.getsize(path) // max(reader.revision(), 1) + 1
    plan = chunks(upto, jobs, max(1, min(_CHUNK_ROWS, _CHUNK_BYTES // row_bytes,
                                         upto // (4 * jobs))))
    digest_at, max_problems = verifier.digest_at, verifier.max_problems
    with contextlib.ExitStack() as stack:
        if workers is None:
            workers = stack.enter_context(ProcessPoolExecutor(
                jobs - 1, mp_context=multiprocessing.get_context("spawn")))
        with _without_main_file():  # the workers start in submit
            futures: dict[int, Future[SliceSummary]] = {
                index: workers.submit(verify_slice, path, after, last, digest_at, max_problems)
                for index, (after, last) in reversed(list(enumerate(plan))) if index}
        # Chunks not started yet are not worth starting if this ends early (those running end
        # with their chunk; a Ctrl-C ends them too).
        stack.callback(lambda: [future.cancel() for future in futures.values()])
        runs: dict[int, tuple[int, SliceSummary]] = {}

        def collect() -> None:  # the workers' finished chunks: joined, and counted as progress
            for index in [index for index, future in futures.items() if future.done()]:
                summary = futures.pop(index).result()
                _join(runs, index, summary, digest_at, max_problems)
                advance(plan[index][1] - plan[index][0])

        index = 0  # this process takes each next chunk no worker has started (or finished)
        while index < len(plan) and (not index or (
                (future := futures.get(index)) is not None and future.cancel())):
            futures.pop(index, None)
            _feed_rows(reader, verifier, *plan[index], advance, collect)
            index += 1
        wait(futures.values())
        collect()
        for first in sorted(runs):
            last, summary = runs[first]
            if not verifier.absorb(summary):
                _feed_rows(reader, verifier, plan[first][0], plan[last][1])


def _join(runs: dict[int, tuple[int, SliceSummary]], index: int, summary: SliceSummary,
          digest_at: int | None, max_problems: int) -> None:
    """Add the summary of chunk `index` to `runs` (first chunk: (last chunk, summary), for each
    run of consecutive chunks the workers have finished), joined to the runs right after and
    right before it where it can be (:meth:`Verifier.resume`): this process holds one summary
    per run, not one per chunk, so its memory does not grow with the chunks."""
    first, last = index, index
    after = runs.pop(last + 1, None)
    if after is not None:
        joined = Verifier.resume(summary, digest_at=digest_at, max_problems=max_problems)
        if joined.absorb(after[1]):
            last, summary = after[0], joined.summary()
        else:
            runs[last + 1] = after
    before = next((start for start, (end, _) in runs.items() if end == first - 1), None)
    if before is not None:
        joined = Verifier.resume(runs[before][1], digest_at=digest_at,
                                 max_problems=max_problems)
        if joined.absorb(summary):
            runs[before] = (last, joined.summary())
            return
    runs[first] = (last, summary)


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
