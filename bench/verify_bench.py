"""Offline `casledger verify`: throughput against raw SHA-256, and peak memory as the ledger grows,
in one process (``--jobs 1``) and in several (``--jobs N``, by default one per CPU).

For each ledger size (10^4, 10^5, 10^6 versions by default) this builds a ledger file with the
ledger rules (``model.plan_write``: real hashes and chains, updates, tombstones, re-creations) and
the store's bulk import path, then runs the real command, ``casledger verify --db FILE --json
--jobs J``, in a fresh process, for J = 1 and J = N, ``--repeat`` times each (alternating), and
reads

- the time of the verify pass, as the command reports it (the process start-up is left out, the
  workers' start-up is not), the median over the repeats;
- the peak RSS of each process: the command's own (its VmHWM, read by itself at exit; see _CHILD
  for why not the rusage of the child) and each of its worker processes' (their VmHWM, sampled
  from /proc every 10 ms while they run; a worker's memory is flat, so the last sample is its
  peak), and of multiprocessing's resource tracker (a small process that comes with the
  workers). "total" is the sum over the processes — an upper bound of what they held at once.

On a machine shared with other work the wall-clock figures swing with it, so each run also
records CPU time: the command's (from its start, imports excluded) and its workers' (start-up
included). The busiest process's CPU time is what the run would take on an idle machine, and
"ratio (CPU time)" compares it with raw SHA-256's own CPU time.

It times raw ``hashlib.sha256`` over the same number of bytes, also ``--repeat`` times (median):
every byte ``compute_hash`` feeds (the content plus the hashed metadata). Two baselines: one hash
over all the bytes as a stream (the fastest SHA-256 can go on one core; the ratio the issue asks
about) and one hash per version. The "ceiling" column is the ratio of a program that only reads
the rows from SQLite and hashes their content, verifying nothing, in one process: no verifier
reading the file in one Python thread can do better (N processes: about N times that).

A content-size sweep (on by default for runs of 10^5 versions or more) shows how the ratio grows
with the content size: each version costs a fixed amount of Python and SQLite work besides the
hashing, so small versions are dominated by it. The page cache is warm: the file is read through
once right before each run (outside the time the command reports), so this measures the
verifier, not the disk — a file just written does not stay cached on every machine (a kernel
that pages out memory left untouched for about a minute drops much of a 4 GiB ledger between
runs, and a run then reads from the disk). Other work on the machine shows in the figures:
compare the spread of the repeats (``runs`` in the JSON results).

    python -m bench                          # 10^4, 10^5, 10^6 versions of 4 KiB, plus the sweep
    python -m bench --versions 20000 --no-sweep --repeat 1   # a smoke run of a few seconds
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import closing
from dataclasses import asdict, dataclass, fields, replace
from datetime import UTC, datetime
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bench.common import RESULTS, children, peak_rss_kib
from casledger.service.model import (
    EMPTY_TAIL,
    HASH_FORMAT,
    Head,
    Precondition,
    Tail,
    Version,
    Write,
    WriteKind,
    plan_write,
)
from casledger.service.storage.sqlite_offline import import_versions

SIZES = (10_000, 100_000, 1_000_000)
SWEEP_CONTENT = (1024, 4096, 16384, 65536, 262144)
# About 1 GiB of content per size (at most SWEEP_VERSIONS versions): a second or two of work,
# so that the workers' start-up (~0.25 s) does not hide what several processes gain.
SWEEP_BYTES = 1 << 30
SWEEP_VERSIONS = 250_000
MiB = 1 << 20


@dataclass(frozen=True, slots=True)
class Run:
    """`casledger verify --jobs jobs` on one ledger: medians over the repeats."""

    jobs: int
    verify_s: float
    verify_mb_s: float
    ratio_stream: float
    ratio_per_version: float
    us_per_version: float
    # CPU time of the busiest process (the command, or a worker: start-up included) and the
    # ratio of raw SHA-256's CPU time to it: what the run would take on an idle machine.
    alone_s: float
    ratio_alone: float
    # Peak RSS in MiB: the command's process, each worker process, multiprocessing's resource
    # tracker (a small process of its own while there are workers), and their sum.
    peak_rss_mib: float
    peak_rss_workers_mib: list[float]
    peak_rss_tracker_mib: float
    peak_rss_total_mib: float
    runs: list[float]  # every repeat's verify_s


@dataclass(frozen=True, slots=True)
class Measure:
    versions: int
    resources: int
    content_bytes: int
    hashed_bytes: int
    file_bytes: int
    build_s: float
    raw_stream_mb_s: float
    raw_per_version_mb_s: float
    ceiling: float
    single: Run
    parallel: Run


def versions(n: int, resources: int, content_bytes: int) -> Iterator[Version]:
    """`n` versions as the ledger rules write them: each resource is created, updated, and every
    97th write to it is a delete (the next one re-creates it)."""
    heads: dict[str, Head] = {}
    tail = EMPTY_TAIL
    pad = os.urandom(content_bytes).hex().encode()
    body = max(content_bytes - 32, 0)
    start_us = time.time_ns() // 1000 - n
    for i in range(n):
        name = f"documents/d{i % resources:07d}"
        head = heads.get(name)
        offset = (i * 7919) % (len(pad) - body + 1)
        content = b'{"seq":%d,"body":"%s"}' % (i, pad[offset:offset + body])
        if head is None or head.latest.deleted:
            write = Write(WriteKind.CREATE, name, content=content, content_type="application/json",
                          reason="bench")
        elif i % 97 == 0:
            write = Write(WriteKind.DELETE, name,
                          precondition=Precondition.of_version(head.latest.version))
        else:
            write = Write(WriteKind.UPDATE, name, content=content, content_type="application/json",
                          precondition=Precondition.of_version(head.latest.version))
        version = plan_write(write, head, tail, start_us + i, limit=1 << 30)
        heads[name] = Head(replace(version, content=b""),
                           head.latest.update_time_us if head else None)
        tail = Tail(version.revision, version.hash, version.update_time_us)
        yield version


def hashed_bytes(path: Path) -> int:
    """Every byte compute_hash feeds for every version: length prefixes, metadata, content."""
    fixed = 4 + len(HASH_FORMAT) + 11 * 4 + 8 + 1  # prefixes, the tag, the deleted flag
    with closing(sqlite3.connect(path)) as db:
        (total,) = db.execute(
            f"SELECT sum({fixed} + length(CAST(name AS BLOB)) + length(CAST(version AS TEXT)) "
            "+ length(CAST(revision AS TEXT)) + length(CAST(content_type AS BLOB)) "
            "+ length(CAST(create_time_us AS TEXT)) + length(CAST(update_time_us AS TEXT)) "
            "+ length(CAST(actor AS BLOB)) + length(CAST(reason AS BLOB)) "
            "+ length(previous_hash) + length(ledger_previous_hash) + length(content)) "
            "FROM versions").fetchone()
    return int(total)


def raw_stream_seconds(total: int) -> tuple[float, float]:
    """One SHA-256 over `total` bytes, fed 1 MiB at a time: wall-clock and CPU seconds."""
    chunk = os.urandom(MiB)
    h = hashlib.sha256()
    started, cpu = time.perf_counter(), time.process_time()
    for _ in range(total // MiB):
        h.update(chunk)
    h.update(chunk[:total % MiB])
    h.digest()
    return time.perf_counter() - started, time.process_time() - cpu


def read_floor_seconds(path: Path) -> float:
    """Read every version's columns with the stdlib driver, in revision order, and hash only its
    content: the least any verifier of this file does in one Python thread."""
    columns = ", ".join(f.name for f in fields(Version))
    sha256 = hashlib.sha256
    with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        started = time.perf_counter()
        for row in db.execute(f"SELECT {columns} FROM versions ORDER BY revision"):
            sha256(row[3]).digest()
        return time.perf_counter() - started


def raw_per_version_seconds(count: int, total: int) -> float:
    """One SHA-256 per version, over buffers of the versions' average size."""
    buffer = os.urandom(max(total // max(count, 1), 1))
    sha256 = hashlib.sha256
    started = time.perf_counter()
    for _ in range(count):
        sha256(buffer).digest()
    return time.perf_counter() - started


# The command as the console script runs it, then its own peak RSS. Not rusage's ru_maxrss: on
# Linux that keeps the high-water mark of the process image before exec, i.e. of this parent
# (which just built a large ledger), so it would grow with the ledger for the wrong reason.
# Also the CPU time of the command and of its workers (reaped by then), for the "alone" figures.
_CHILD = """
import resource, sys, time
from casledger.service.cli import main
cpu = time.process_time()
code = main(["verify", "--db", sys.argv[1], "--json", "--jobs", sys.argv[2]])
cpu = time.process_time() - cpu
workers = resource.getrusage(resource.RUSAGE_CHILDREN)
try:
    with open("/proc/self/status") as status:
        peak = int(next(line.split()[1] for line in status if line.startswith("VmHWM:")))
except (OSError, StopIteration):
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
sys.stderr.write(f"peak_kib={peak}\\ncpu_s={cpu}\\n")
sys.stderr.write(f"workers_cpu_s={workers.ru_utime + workers.ru_stime}\\n")
sys.exit(code)
"""


def _descendants(pid: int) -> list[int]:
    found, pending = [], [pid]
    while pending:
        kids = children(pending.pop())
        found += kids
        pending += kids
    return found


def _is_tracker(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            return b"resource_tracker" in cmdline.read()
    except OSError:
        return False


@dataclass(frozen=True, slots=True)
class Sample:
    """One run of the command."""

    seconds: float  # the verify pass, as the command reports it
    peak_rss_mib: float
    workers_mib: list[float]
    tracker_mib: float
    cpu_s: float  # the command's CPU time, start-up excluded
    workers_cpu_s: float  # its workers', start-up included

    def alone_s(self, jobs: int) -> float:
        """What the run would take on an otherwise idle machine: the CPU time of its busiest
        process (workers share theirs evenly)."""
        return max(self.cpu_s, self.workers_cpu_s / (jobs - 1) if jobs > 1 else 0.0)


def warm(path: Path) -> None:
    """Read the file through, so that the run after this finds it in the page cache."""
    with open(path, "rb", buffering=0) as file:
        while file.read(8 * MiB):
            pass


def run_verify(path: Path, jobs: int) -> Sample:
    """`casledger verify --db path --json --jobs jobs` in a fresh process, on a warm cache."""
    warm(path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CASLEDGER_")}
    workers: dict[int, int] = {}
    trackers: set[int] = set()
    with subprocess.Popen([sys.executable, "-c", _CHILD, str(path), str(jobs)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=env) as child:
        # Sample the workers' peaks while they run (their output would fill no pipe: the
        # command prints one JSON document at the end). The last sample of each counts: a
        # high-water mark only grows, but it starts again at exec, and a process sampled
        # between fork and exec would show its parent's.
        while child.poll() is None:
            for pid in _descendants(child.pid):
                peak = peak_rss_kib(pid)
                if peak:  # 0: gone already
                    workers[pid] = peak
                    if pid not in trackers and _is_tracker(pid):
                        trackers.add(pid)
            time.sleep(0.01)
        out, err = child.communicate()
    report = json.loads(out)
    if child.returncode != 0 or not report["ok"]:
        raise RuntimeError(f"verify failed on the benchmark ledger: {report} {err}")
    values = dict(line.split("=", 1) for line in err.splitlines() if "=" in line)
    return Sample(
        seconds=float(report["seconds"]), peak_rss_mib=int(values["peak_kib"]) / 1024,
        workers_mib=sorted((kib / 1024 for pid, kib in workers.items() if pid not in trackers),
                           reverse=True),
        tracker_mib=sum(kib / 1024 for pid, kib in workers.items() if pid in trackers),
        cpu_s=float(values["cpu_s"]), workers_cpu_s=float(values["workers_cpu_s"]))


def _median(values: list[float]) -> float:
    return statistics.median(values)


def measure(directory: Path, n: int, resources: int, content_bytes: int, jobs: int,
            repeat: int, console: Console) -> Measure:
    path = directory / f"ledger-{n}-{content_bytes}.db"
    console.print(f"building {n:,} versions of {content_bytes:,} bytes "
                  f"({min(resources, n):,} resources) ...")
    started = time.perf_counter()
    import_versions(str(path), versions(n, resources, content_bytes))
    build_s = time.perf_counter() - started
    total = hashed_bytes(path)
    samples: dict[int, list[Sample]] = {1: [], jobs: []}
    stream, stream_cpu, per_version = [], [], []
    for _ in range(repeat):
        for j in samples:  # alternating, so a burst of other work hits both alike
            samples[j].append(run_verify(path, j))
        wall, cpu = raw_stream_seconds(total)
        stream.append(wall)
        stream_cpu.append(cpu)
        per_version.append(raw_per_version_seconds(n, total))
    warm(path)
    floor_s = read_floor_seconds(path)
    file_bytes = path.stat().st_size
    for leftover in directory.glob(f"{path.name}*"):
        leftover.unlink()
    stream_s, per_version_s = _median(stream), _median(per_version)

    def run(j: int) -> Run:
        seconds = [sample.seconds for sample in samples[j]]
        verify_s = _median(seconds)
        alone_s = _median([sample.alone_s(j) for sample in samples[j]])
        # The repeat with the largest total (the workers' peaks are sampled).
        biggest = max(samples[j], key=lambda t: t.peak_rss_mib + sum(t.workers_mib)
                      + t.tracker_mib)
        return Run(jobs=j, verify_s=round(verify_s, 3),
                   verify_mb_s=round(total / verify_s / 1e6, 1),
                   ratio_stream=round(stream_s / verify_s, 3),
                   ratio_per_version=round(per_version_s / verify_s, 3),
                   us_per_version=round(verify_s / n * 1e6, 2),
                   alone_s=round(alone_s, 3),
                   ratio_alone=round(_median(stream_cpu) / alone_s, 3),
                   peak_rss_mib=round(max(sample.peak_rss_mib for sample in samples[j]), 1),
                   peak_rss_workers_mib=[round(w, 1) for w in biggest.workers_mib],
                   peak_rss_tracker_mib=round(biggest.tracker_mib, 1),
                   peak_rss_total_mib=round(biggest.peak_rss_mib + sum(biggest.workers_mib)
                                            + biggest.tracker_mib, 1),
                   runs=[round(t, 3) for t in seconds])

    return Measure(
        versions=n, resources=min(resources, n), content_bytes=content_bytes,
        hashed_bytes=total, file_bytes=file_bytes, build_s=round(build_s, 3),
        raw_stream_mb_s=round(total / stream_s / 1e6, 1),
        raw_per_version_mb_s=round(total / per_version_s / 1e6, 1),
        ceiling=round(stream_s / floor_s, 3), single=run(1), parallel=run(jobs))


def show(console: Console, title: str, rows: list[Measure]) -> None:
    table = Table(title=title)
    for column in ("versions", "content", "hashed MB", "raw MB/s", "jobs", "verify s",
                   "verify MB/s", "ratio", "ratio (per version)", "ratio (CPU time)",
                   "ceiling (1 process)",
                   "µs/version", "peak RSS MiB", "workers' MiB", "tracker MiB", "total MiB"):
        table.add_column(column, justify="right")
    for m in rows:
        for run in (m.single, m.parallel):
            first = run is m.single
            table.add_row(
                f"{m.versions:,}" if first else "", f"{m.content_bytes:,}" if first else "",
                f"{m.hashed_bytes / 1e6:,.1f}" if first else "",
                f"{m.raw_stream_mb_s:,.0f}" if first else "", str(run.jobs),
                f"{run.verify_s:.2f}", f"{run.verify_mb_s:,.0f}", f"{run.ratio_stream:.2f}",
                f"{run.ratio_per_version:.2f}", f"{run.ratio_alone:.2f}",
                f"{m.ceiling:.2f}" if first else "",
                f"{run.us_per_version:.1f}", f"{run.peak_rss_mib:.1f}",
                " + ".join(f"{w:.1f}" for w in run.peak_rss_workers_mib) or "-",
                f"{run.peak_rss_tracker_mib:.1f}" if run.peak_rss_tracker_mib else "-",
                f"{run.peak_rss_total_mib:.1f}")
    console.print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--versions", type=int, default=SIZES[-1],
                        help="the largest ledger (default 1000000); 10^4 and 10^5 below it too")
    parser.add_argument("--content-bytes", type=int, default=4096,
                        help="content size of each version (default 4096)")
    parser.add_argument("--resources", type=int, default=1000,
                        help="distinct resource names (default 1000)")
    parser.add_argument("--jobs", type=int, default=max(2, os.cpu_count() or 1),
                        help="the processes of the parallel run (default: one per CPU, "
                             "at least 2)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs of each measurement; the median is reported (default 3)")
    parser.add_argument("--sweep", action=argparse.BooleanOptionalAction, default=None,
                        help="also sweep content sizes (default: on from 10^5 versions)")
    parser.add_argument("--dir", type=Path, default=None,
                        help="where to build the ledgers (default: a temporary directory)")
    parser.add_argument("--output", type=Path, default=None,
                        help="the JSON results (default bench/results/verify-<time>.json)")
    args = parser.parse_args(argv)
    load_start = os.getloadavg()
    console = Console(highlight=False, width=None if sys.stdout.isatty() else 170)
    sizes = sorted({n for n in SIZES if n < args.versions} | {args.versions})
    sweep = args.sweep if args.sweep is not None else args.versions >= 100_000
    directory = Path(tempfile.mkdtemp(prefix="casledger-bench-", dir=args.dir))
    try:
        growth = [measure(directory, n, args.resources, args.content_bytes, args.jobs,
                          args.repeat, console) for n in sizes]
        sweep_rows = [measure(directory, max(1000, min(SWEEP_VERSIONS, SWEEP_BYTES // size)),
                              args.resources, size, args.jobs, args.repeat, console)
                      for size in SWEEP_CONTENT] if sweep else []
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    show(console, "offline verify as the ledger grows", growth)
    if sweep_rows:
        show(console, "offline verify by content size", sweep_rows)
    results = {
        "benchmark": "verify", "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"python": platform.python_version(), "platform": platform.platform(),
                    "cpus": os.cpu_count(), "sqlite": sqlite3.sqlite_version,
                    "openssl": __import__("ssl").OPENSSL_VERSION,
                    "load_average": {"start": load_start, "end": os.getloadavg()}},
        "repeat": args.repeat,
        "growth": [asdict(m) for m in growth], "sweep": [asdict(m) for m in sweep_rows],
    }
    output = args.output or RESULTS / f"verify-{time.strftime('%Y%m%dT%H%M%S')}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2) + "\n")
    console.print(f"results written to {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
