"""Offline `casledger verify`: throughput against raw SHA-256, and peak memory as the ledger grows.

For each ledger size (10^4, 10^5, 10^6 versions by default) this builds a ledger file with the
ledger rules (``model.plan_write``: real hashes and chains, updates, tombstones, re-creations) and
the store's bulk import path, then runs the real command, ``casledger verify --db FILE --json``,
in a fresh process and reads

- the time of the verify pass, as the command reports it (the process start-up is left out),
- the peak RSS of that process (its VmHWM; see _CHILD for why not the rusage of the child),

and times raw ``hashlib.sha256`` over the same number of bytes: every byte ``compute_hash`` feeds
(the content plus the hashed metadata). Two baselines: one hash over all the bytes as a stream
(the fastest SHA-256 can go; the ratio the issue asks about) and one hash per version. The
"ceiling" column is the ratio of a program that only reads the rows from SQLite and hashes their
content, verifying nothing: no verifier reading the file in one Python thread can do better.

A content-size sweep (on by default for runs of 10^5 versions or more) shows how the ratio grows
with the content size: each version costs a fixed amount of Python and SQLite work besides the
hashing, so small versions are dominated by it. The page cache is warm (the file was just
written): this measures the verifier, not the disk.

    python -m bench                          # 10^4, 10^5, 10^6 versions of 4 KiB, plus the sweep
    python -m bench --versions 2000 --no-sweep   # a smoke run of a few seconds
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import sqlite3
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

RESULTS = Path(__file__).parent / "results"
SIZES = (10_000, 100_000, 1_000_000)
SWEEP_CONTENT = (1024, 4096, 16384, 65536, 262144)
SWEEP_BYTES = 256 << 20
MiB = 1 << 20


@dataclass(frozen=True, slots=True)
class Measure:
    versions: int
    resources: int
    content_bytes: int
    hashed_bytes: int
    file_bytes: int
    build_s: float
    verify_s: float
    verify_mb_s: float
    raw_stream_mb_s: float
    raw_per_version_mb_s: float
    ratio_stream: float
    ratio_per_version: float
    ceiling: float
    us_per_version: float
    peak_rss_mib: float


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


def raw_stream_seconds(total: int) -> float:
    """One SHA-256 over `total` bytes, fed 1 MiB at a time."""
    chunk = os.urandom(MiB)
    h = hashlib.sha256()
    started = time.perf_counter()
    for _ in range(total // MiB):
        h.update(chunk)
    h.update(chunk[:total % MiB])
    h.digest()
    return time.perf_counter() - started


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
_CHILD = """
import resource, sys
from casledger.service.cli import main
code = main(["verify", "--db", sys.argv[1], "--json"])
try:
    with open("/proc/self/status") as status:
        peak = int(next(line.split()[1] for line in status if line.startswith("VmHWM:")))
except (OSError, StopIteration):
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
sys.stderr.write(f"peak_kib={peak}\\n")
sys.exit(code)
"""


def run_verify(path: Path) -> tuple[dict[str, object], float]:
    """`casledger verify --db path --json` in a fresh process: its report and peak RSS (MiB)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CASLEDGER_")}
    done = subprocess.run([sys.executable, "-c", _CHILD, str(path)], capture_output=True,
                          text=True, env=env, check=False)
    report = json.loads(done.stdout)
    if done.returncode != 0 or not report["ok"]:
        raise RuntimeError(f"verify failed on the benchmark ledger: {report}")
    peak = next(int(line.split("=", 1)[1]) for line in done.stderr.splitlines()
                if line.startswith("peak_kib="))
    return report, peak / 1024


def measure(directory: Path, n: int, resources: int, content_bytes: int,
            console: Console) -> Measure:
    path = directory / f"ledger-{n}-{content_bytes}.db"
    console.print(f"building {n:,} versions of {content_bytes:,} bytes "
                  f"({min(resources, n):,} resources) ...")
    started = time.perf_counter()
    import_versions(str(path), versions(n, resources, content_bytes))
    build_s = time.perf_counter() - started
    total = hashed_bytes(path)
    report, rss = run_verify(path)
    verify_s = float(report["seconds"])  # type: ignore[arg-type]
    stream_s = raw_stream_seconds(total)
    per_version_s = raw_per_version_seconds(n, total)
    floor_s = read_floor_seconds(path)
    file_bytes = path.stat().st_size
    for leftover in directory.glob(f"{path.name}*"):
        leftover.unlink()
    return Measure(
        versions=n, resources=min(resources, n), content_bytes=content_bytes,
        hashed_bytes=total, file_bytes=file_bytes, build_s=round(build_s, 3),
        verify_s=round(verify_s, 3), verify_mb_s=round(total / verify_s / 1e6, 1),
        raw_stream_mb_s=round(total / stream_s / 1e6, 1),
        raw_per_version_mb_s=round(total / per_version_s / 1e6, 1),
        ratio_stream=round(stream_s / verify_s, 3),
        ratio_per_version=round(per_version_s / verify_s, 3),
        ceiling=round(stream_s / floor_s, 3),
        us_per_version=round(verify_s / n * 1e6, 2), peak_rss_mib=round(rss, 1))


def show(console: Console, title: str, rows: list[Measure]) -> None:
    table = Table(title=title)
    for column in ("versions", "content", "hashed MB", "verify s", "verify MB/s",
                   "raw MB/s (stream)", "ratio", "raw MB/s (per version)", "ratio",
                   "ceiling", "µs/version", "peak RSS MiB"):
        table.add_column(column, justify="right")
    for m in rows:
        table.add_row(f"{m.versions:,}", f"{m.content_bytes:,}", f"{m.hashed_bytes / 1e6:,.1f}",
                      f"{m.verify_s:.2f}", f"{m.verify_mb_s:,.0f}", f"{m.raw_stream_mb_s:,.0f}",
                      f"{m.ratio_stream:.2f}", f"{m.raw_per_version_mb_s:,.0f}",
                      f"{m.ratio_per_version:.2f}", f"{m.ceiling:.2f}", f"{m.us_per_version:.1f}",
                      f"{m.peak_rss_mib:.1f}")
    console.print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--versions", type=int, default=SIZES[-1],
                        help="the largest ledger (default 1000000); 10^4 and 10^5 below it too")
    parser.add_argument("--content-bytes", type=int, default=4096,
                        help="content size of each version (default 4096)")
    parser.add_argument("--resources", type=int, default=1000,
                        help="distinct resource names (default 1000)")
    parser.add_argument("--sweep", action=argparse.BooleanOptionalAction, default=None,
                        help="also sweep content sizes (default: on from 10^5 versions)")
    parser.add_argument("--dir", type=Path, default=None,
                        help="where to build the ledgers (default: a temporary directory)")
    parser.add_argument("--output", type=Path, default=None,
                        help="the JSON results (default bench/results/verify-<time>.json)")
    args = parser.parse_args(argv)
    console = Console(highlight=False, width=None if sys.stdout.isatty() else 170)
    sizes = sorted({n for n in SIZES if n < args.versions} | {args.versions})
    sweep = args.sweep if args.sweep is not None else args.versions >= 100_000
    directory = Path(tempfile.mkdtemp(prefix="casledger-bench-", dir=args.dir))
    try:
        growth = [measure(directory, n, args.resources, args.content_bytes, console)
                  for n in sizes]
        sweep_rows = [measure(directory, max(1000, min(100_000, SWEEP_BYTES // size)),
                              args.resources, size, console)
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
                    "openssl": __import__("ssl").OPENSSL_VERSION},
        "growth": [asdict(m) for m in growth], "sweep": [asdict(m) for m in sweep_rows],
    }
    output = args.output or RESULTS / f"verify-{time.strftime('%Y%m%dT%H%M%S')}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2) + "\n")
    console.print(f"results written to {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
