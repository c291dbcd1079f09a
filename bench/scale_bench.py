"""Read and compare-and-swap latency, and the service's memory, as the ledger grows.

``python -m bench scale [--quick] [--sizes 1e3,1e4,1e5,1e6] [--duration S] [--concurrency C]``

For each size N this builds (once, cached) a SQLite ledger of N versions spread over
``min(N, 1000)`` resources — each created, then updated round-robin, with small JSON content —
offline: the versions are planned with the ledger's own rules (``model.plan_write``, so hashes,
chains, revisions and times are exactly what the service would have written) and loaded through
the store's bulk import (``sqlite_offline.import_versions``). The cache lives in
``bench/results/ledgers/`` (gitignored); a re-run reuses it.

Each measurement runs on a fresh copy of the cached file (CAS writes append to it):
``casledger serve --no-http`` (``--durability full``) is started on the copy, warmed up, and then
measured in two closed-loop phases with the same settings for every size:

- **reads** — C coroutines, each ``GetResource`` of a random resource, back to back;
- **CAS writes** — C coroutines, each owning a disjoint share of the resources, each
  ``UpdateResource`` of a random one of its own with ``precondition.version`` = the version it
  last wrote (every write succeeds unless something is wrong; failures are counted).

Reported per size: p50/p99 latency and throughput of each phase, and the service process's
RSS after warm-up, after the run, and its peak. Flat figures across sizes are the claim.
Results: ``bench/results/scale-*.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.common import (
    RESULTS,
    casledger_serve,
    free_port,
    peak_rss_kib,
    percentile,
    print_table,
    rss_kib,
    sqlite_url,
    write_results,
)
from bench.grpc_bench import ErrorTally
from casledger.service.client import LedgerCallError, LedgerClient, connect, precondition
from casledger.service.model import (
    EMPTY_TAIL,
    Head,
    Precondition,
    Tail,
    Version,
    Write,
    WriteKind,
    plan_write,
)
from casledger.service.storage.sqlite import SCHEMA_VERSION
from casledger.service.storage.sqlite_offline import import_versions

LEDGERS = RESULTS / "ledgers"
# Bump when the generated ledgers change shape: old cached files are then ignored.
LEDGER_FORMAT = 1
MAX_RESOURCES = 1000
COLLECTION = "items"
DEFAULT_SIZES = (1_000, 10_000, 100_000, 1_000_000)
QUICK_SIZES = (1_000, 10_000)
CALL_TIMEOUT_S = 10.0
SEED = 20261122


# --- building the ledgers ----------------------------------------------------------------------


def resource_name(i: int) -> str:
    return f"{COLLECTION}/i{i:05d}"


def resources_for(size: int) -> int:
    return min(size, MAX_RESOURCES)


def generate(size: int) -> Iterator[Version]:
    """`size` versions as the service would write them: resource i % R at step i, created on
    its first write and replaced (with a version precondition) on every later one."""
    resources = resources_for(size)
    heads: dict[str, Head] = {}
    tail = EMPTY_TAIL
    start_us = time.time_ns() // 1000 - size * 1000  # one write per simulated millisecond
    for i in range(size):
        name = resource_name(i % resources)
        head = heads.get(name)
        content = b'{"seq":%d,"owner":"bench","tags":["scale","ledger"],"n":%d}' % (
            i, i // resources)
        if head is None:
            write = Write(WriteKind.CREATE, name, content=content,
                          content_type="application/json")
        else:
            write = Write(WriteKind.UPDATE, name, content=content,
                          content_type="application/json",
                          precondition=Precondition.of_version(head.latest.version))
        version = plan_write(write, head, tail, start_us + i * 1000, limit=1 << 20)
        heads[name] = Head(version, head.latest.update_time_us if head else None)
        tail = Tail(version.revision, version.hash, version.update_time_us)
        yield version


def cached_path(size: int) -> Path:
    """Where the ledger of `size` is cached: named by its format and the store's schema, so a
    file of another shape is never picked up."""
    return LEDGERS / f"ledger-v{LEDGER_FORMAT}-schema{SCHEMA_VERSION}-{size}.db"


def cached_ledger(size: int) -> tuple[Path, tuple[float, float] | None]:
    """The cached ledger of `size` versions, built if missing; and the build's wall-clock and
    CPU seconds (None when it was cached)."""
    path = cached_path(size)
    if path.exists():
        return path, None
    LEDGERS.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    for leftover in LEDGERS.glob(partial.name + "*"):
        leftover.unlink()
    started, cpu_started = time.perf_counter(), time.process_time()
    import_versions(str(partial), generate(size))
    build_s = (time.perf_counter() - started, time.process_time() - cpu_started)
    os.replace(partial, path)
    for leftover in LEDGERS.glob(partial.name + "*"):  # the import's .lock file
        leftover.unlink()
    return path, build_s


def heads_of(size: int) -> dict[str, int]:
    """The current version of every resource of the generated ledger of `size` versions."""
    resources = resources_for(size)
    return {resource_name(r): size // resources + (1 if r < size % resources else 0)
            for r in range(resources)}


# --- measuring ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Phase:
    """One closed-loop phase: successful calls, their latency, and what failed."""

    calls: int
    calls_per_s: float
    p50_ms: float
    p99_ms: float
    errors: ErrorTally


@dataclass(frozen=True, slots=True)
class SizeResult:
    versions: int
    resources: int
    file_mib: float
    build_s: float | None  # None: taken from the cache
    build_cpu_s: float | None
    start_s: float  # from starting `casledger serve` to its health check answering SERVING
    read: Phase
    write: Phase
    rss_after_warmup_kib: int
    rss_after_run_kib: int
    peak_rss_kib: int


async def closed_loop(workers: list[Callable[[], Awaitable[None]]], duration_s: float
                      ) -> Phase:
    """Run every worker's call back to back for `duration_s`; time the successful ones."""
    latencies: list[float] = []
    errors = ErrorTally()
    end = time.perf_counter() + duration_s

    async def loop(call: Callable[[], Awaitable[None]]) -> None:
        while (started := time.perf_counter()) < end:
            try:
                await call()
            except LedgerCallError as error:
                errors.add(error)
                continue
            latencies.append(time.perf_counter() - started)

    await asyncio.gather(*(loop(worker) for worker in workers))
    latencies.sort()
    return Phase(calls=len(latencies), calls_per_s=len(latencies) / duration_s,
                 p50_ms=percentile(latencies, 0.50) * 1000,
                 p99_ms=percentile(latencies, 0.99) * 1000, errors=errors)


def readers(client: LedgerClient, names: list[str], count: int, rng: random.Random
            ) -> list[Callable[[], Awaitable[None]]]:
    """`count` workers, each reading a random resource per call."""
    async def read() -> None:
        await client.get(rng.choice(names))

    return [read] * count


def writers(client: LedgerClient, versions: dict[str, int], count: int, rng: random.Random
            ) -> list[Callable[[], Awaitable[None]]]:
    """`count` workers, each CAS-writing a random resource of its own share of `versions`
    (which they keep up to date)."""
    names = sorted(versions)

    def worker(mine: list[str]) -> Callable[[], Awaitable[None]]:
        async def write() -> None:
            name = rng.choice(mine)
            try:
                written = await client.replace(
                    name, b'{"seq":%d,"owner":"bench"}' % versions[name],
                    precondition=precondition(version=versions[name]))
            except LedgerCallError as error:
                versions[name] = error.current_version or versions[name]
                raise
            versions[name] = written.version

        return write

    return [worker(names[w::count]) for w in range(min(count, len(names)))]


async def measure_service(target: str, pid: int, size: int, duration_s: float,
                          warmup_s: float, concurrency: int) -> tuple[Phase, Phase, int, int]:
    """Warm up, then the read and write phases; (read, write, RSS after warm-up, after run)."""
    rng = random.Random(SEED)
    versions = heads_of(size)
    names = sorted(versions)
    async with connect(target, call_timeout=CALL_TIMEOUT_S) as client:
        await closed_loop(readers(client, names, concurrency, rng), warmup_s / 2)
        await closed_loop(writers(client, versions, concurrency, rng), warmup_s / 2)
        rss_warm = rss_kib(pid)
        read = await closed_loop(readers(client, names, concurrency, rng), duration_s)
        write = await closed_loop(writers(client, versions, concurrency, rng), duration_s)
    return read, write, rss_warm, rss_kib(pid)


def measure(size: int, duration_s: float, warmup_s: float, concurrency: int,
            workdir: Path) -> SizeResult:
    """Build or reuse the ledger of `size`, serve a copy of it, and measure."""
    cached, build = cached_ledger(size)
    copy = workdir / f"scale-{size}.db"
    shutil.copyfile(cached, copy)
    starting = time.perf_counter()
    with casledger_serve(sqlite_url(copy), grpc_port=free_port(), http_port=None,
                         extra_args=("--durability", "full")) as served:
        start_s = time.perf_counter() - starting
        read, write, rss_warm, rss_run = asyncio.run(measure_service(
            served.grpc_target, served.pid, size, duration_s, warmup_s, concurrency))
        peak = peak_rss_kib(served.pid)
    for leftover in workdir.glob(copy.name + "*"):
        leftover.unlink()
    build_s, build_cpu_s = build if build is not None else (None, None)
    return SizeResult(versions=size, resources=resources_for(size),
                      file_mib=cached.stat().st_size / 2**20, build_s=build_s,
                      build_cpu_s=build_cpu_s, start_s=start_s, read=read,
                      write=write, rss_after_warmup_kib=rss_warm, rss_after_run_kib=rss_run,
                      peak_rss_kib=peak)


# --- command line ------------------------------------------------------------------------------


def parse_sizes(text: str) -> list[int]:
    """`1e3,1e4` -> [1000, 10000]."""
    sizes = [int(float(part)) for part in text.split(",") if part.strip()]
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"sizes are positive numbers like 1e3,1e6: {text!r}")
    return sizes


def row(result: SizeResult) -> dict[str, Any]:
    """The table's row of one size (milliseconds and MiB; everything else is in the JSON)."""
    return {
        "versions": result.versions, "file": result.file_mib,
        "build s": result.build_s, "start s": result.start_s,
        "get p50": result.read.p50_ms, "get p99": result.read.p99_ms,
        "gets/s": result.read.calls_per_s,
        "cas p50": result.write.p50_ms, "cas p99": result.write.p99_ms,
        "cas/s": result.write.calls_per_s,
        "rss warm": result.rss_after_warmup_kib / 1024,
        "rss end": result.rss_after_run_kib / 1024,
        "rss peak": result.peak_rss_kib / 1024,
        "errors": result.read.errors.total + result.write.errors.total,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench scale",
                                     description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true",
                        help="sizes 1e3,1e4 only and shorter phases (unless given)")
    parser.add_argument("--sizes", type=parse_sizes,
                        help="ledger sizes in versions (default 1e3,1e4,1e5,1e6)")
    parser.add_argument("--duration", type=float,
                        help="seconds per measured phase (default 5; 2 with --quick)")
    parser.add_argument("--concurrency", type=int, default=4,
                        help="coroutines per phase, closed loop (default 4)")
    args = parser.parse_args(argv)
    sizes: list[int] = args.sizes or list(QUICK_SIZES if args.quick else DEFAULT_SIZES)
    duration_s = args.duration if args.duration is not None else (2.0 if args.quick else 5.0)
    warmup_s = min(2.0, duration_s)
    results: list[SizeResult] = []
    with tempfile.TemporaryDirectory(prefix="casledger-scale-bench-") as tmp:
        for size in sizes:
            state = "cached" if cached_path(size).exists() else "building the"
            print(f"{size:,} versions: {state} ledger, then serving it ...", flush=True)
            results.append(measure(size, duration_s, warmup_s, args.concurrency, Path(tmp)))
    rows = [row(result) for result in results]
    print_table(f"Latency (ms) and service memory (MiB) by ledger size: {args.concurrency} "
                f"coroutines, {duration_s:g} s per phase, durability full", rows, list(rows[0]))
    for result in results:
        for phase, what in ((result.read, "read"), (result.write, "CAS")):
            for line in phase.errors.lines():
                print(f"  {result.versions:,} {what}: {line}")
    path = write_results("scale", {
        "settings": {"sizes": sizes, "duration_s": duration_s, "warmup_s": warmup_s,
                     "concurrency": args.concurrency, "durability": "full"},
        "results": [asdict(result) for result in results]})
    print(f"results: {path}")
    return 0
