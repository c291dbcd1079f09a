"""gRPC compare-and-swap throughput of casledger against a no-op echo server, same client.

``python -m bench grpc [--quick] [--rounds N] [--duration S] [--concurrency C]
[--channels K] [--processes P]``

Two targets answer ``casledger.v1.Ledger/UpdateResource`` with the same messages on loopback:

- **echo** — :mod:`bench.echo`, a ``grpc.aio`` server that builds a Resource from the request
  and returns it (no storage, no checks): what gRPC, protobuf and asyncio cost on their own;
- **casledger** — ``casledger serve --no-http`` on a fresh SQLite file (``--durability full``:
  every reply waits for its fsync), started by :func:`bench.common.casledger_serve`.

The load generator runs in separate processes (spawned, so no client shares a GIL with a server
or with this one): ``P`` processes, each with ``K`` channels (each its own TCP connection) and
its share of ``C`` coroutines spread round-robin over them. Each coroutine compare-and-swaps a
key of its own — ``UpdateResource`` with ``precondition.version`` = the version it last wrote,
through :class:`casledger.service.client.LedgerClient` — back to back for the run's duration.
Keys are seeded first with ``CreateResource`` (on both targets, so the client code is the same).
Only successful calls that complete inside the measured window (after a warm-up) count; each
one's latency is recorded. Failures are counted by status code, reason and message.

Rounds alternate the targets (echo, casledger, echo, ...) so a burst of other work on a shared
machine hits both alike; the report gives per-target medians over rounds and the ratio
casledger/echo of the median throughputs. Results: ``bench/results/grpc-*.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import AsyncExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from bench.common import (
    casledger_serve,
    cpu_seconds,
    free_port,
    median,
    percentile,
    print_table,
    sqlite_url,
    write_results,
)
from casledger.service.client import LedgerCallError, LedgerClient, connect, precondition

TARGETS = ("echo", "casledger")
_DIGITS = re.compile(r"\d+")
COLLECTION = "bench"
CALL_TIMEOUT_S = 10.0
# How long after the load processes are told to go they start: time to receive the task.
START_DELAY_S = 0.5
ECHO_READY_TIMEOUT_S = 20.0
MAX_LOG_CHARS = 4000
# Separate TCP connections per channel: channels with equal arguments would otherwise share one.
CHANNEL_OPTIONS: list[tuple[str, Any]] = [("grpc.use_local_subchannel_pool", 1)]


@dataclass(frozen=True, slots=True)
class LoadSpec:
    """What one load process does: CAS on `keys` (name, seeded version) from `start_at`."""

    target: str
    keys: list[tuple[str, int]]
    channels: int
    start_at: float  # time.time() at which the warm-up begins
    warmup_s: float
    duration_s: float  # measured window, after the warm-up


@dataclass(frozen=True, slots=True)
class LoadResult:
    """What one load process saw in its measured window."""

    calls: int
    window_s: float
    latencies_us: list[int]
    errors: ErrorTally
    cpu_s: float  # this process's CPU time over the whole run (warm-up included)


@dataclass(frozen=True, slots=True)
class Round:
    """One round against one target, all load processes together."""

    target: str
    round: int
    calls: int
    calls_per_s: float
    p50_ms: float
    p99_ms: float
    errors: ErrorTally
    server_cpu_pct: float  # of one core, over the whole run
    client_cpu_pct: float  # all load processes, of one core
    server_log: str  # the end of what the server wrote (warnings and errors), "" if nothing


# --- the load generator (runs in the spawned processes) ----------------------------------------


@dataclass(slots=True)
class ErrorTally:
    """Failed calls by code, reason and message (digits folded, so that messages differing
    only in a version number count together), with the first exact message of each."""

    counts: dict[str, int] = field(default_factory=dict)
    examples: dict[str, str] = field(default_factory=dict)

    def add(self, error: LedgerCallError) -> None:
        key = f"{error.code.name} {error.reason}: {_DIGITS.sub('N', error.message)}"[:300]
        self.counts[key] = self.counts.get(key, 0) + 1
        self.examples.setdefault(key, error.message)

    def merge(self, other: ErrorTally) -> None:
        for key, count in other.counts.items():
            self.counts[key] = self.counts.get(key, 0) + count
            self.examples.setdefault(key, other.examples[key])

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def lines(self) -> list[str]:
        return [f"{count} x {key}  (first: {self.examples[key]!r})"
                for key, count in self.counts.items()]



def _ready(pause_s: float) -> int:
    """A task that makes a pool process start and import this module (pausing, so that every
    process of the pool gets one)."""
    time.sleep(pause_s)
    return os.getpid()


def run_load(spec: LoadSpec) -> LoadResult:
    """Entry point of a load process."""
    return asyncio.run(_drive(spec))


async def _drive(spec: LoadSpec) -> LoadResult:
    cpu_started = time.process_time()
    async with AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(
            connect(spec.target, call_timeout=CALL_TIMEOUT_S, options=CHANNEL_OPTIONS))
            for _ in range(spec.channels)]
        await asyncio.sleep(max(0.0, spec.start_at - time.time()))
        now = time.perf_counter()
        window = (now + spec.warmup_s, now + spec.warmup_s + spec.duration_s)
        latencies: list[int] = []
        errors = ErrorTally()
        await asyncio.gather(*(
            _cas_loop(clients[i % len(clients)], name, version, window, latencies, errors)
            for i, (name, version) in enumerate(spec.keys)))
    return LoadResult(calls=len(latencies), window_s=spec.duration_s, latencies_us=latencies,
                      errors=errors, cpu_s=time.process_time() - cpu_started)


async def _cas_loop(client: LedgerClient, name: str, version: int,
                    window: tuple[float, float], latencies: list[int],
                    errors: ErrorTally) -> None:
    """Compare-and-swap `name` back to back until the window ends; record what completes in it."""
    begin, end = window
    clock = time.perf_counter
    while (started := clock()) < end:
        content = b'{"n":%d}' % version
        try:
            written = await client.replace(name, content, precondition=precondition(
                version=version))
        except LedgerCallError as error:
            if clock() >= begin:
                errors.add(error)
            # A failed CAS says where the resource is; anything else leaves it where it was.
            version = error.current_version or version
            continue
        finished = clock()
        version = written.version
        if begin <= finished < end:
            latencies.append(round((finished - started) * 1e6))


# --- targets -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Target:
    """A running server: where to call it, its pid, and the file its output goes to."""

    address: str
    pid: int
    log_path: Path

    def log(self) -> str:
        """What the server wrote so far (casledger logs warnings and errors only)."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@contextmanager
def echo_server(log_path: Path) -> Iterator[Target]:
    """Run :mod:`bench.echo` in a process of its own, its output to `log_path`."""
    address = f"127.0.0.1:{free_port()}"
    with open(log_path, "wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "bench.echo", "--listen", address],
                                   stdout=log, stderr=subprocess.STDOUT,
                                   cwd=Path(__file__).parent.parent, start_new_session=True)
    target = Target(address, process.pid, log_path)
    try:
        deadline = time.monotonic() + ECHO_READY_TIMEOUT_S
        while not target.log().startswith("serving on"):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"bench.echo did not start:\n{target.log()}")
            time.sleep(0.05)
        yield target
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextmanager
def target_server(kind: str, directory: Path, round_no: int) -> Iterator[Target]:
    """Start `kind`: the echo, or casledger on a fresh SQLite file."""
    if kind == "echo":
        with echo_server(directory / f"echo-{round_no}.log") as echo:
            yield echo
        return
    db = directory / f"grpc-{round_no}.db"
    log_path = directory / f"grpc-{round_no}.log"
    with casledger_serve(sqlite_url(db), grpc_port=free_port(), http_port=None,
                         extra_args=("--durability", "full"), log_path=log_path) as casledger:
        yield Target(casledger.grpc_target, casledger.pid, log_path)


async def seed(target: str, count: int, tag: str) -> list[tuple[str, int]]:
    """Create `count` keys (CreateResource); their names and versions."""
    async with connect(target, call_timeout=CALL_TIMEOUT_S) as client:
        created = await asyncio.gather(*(
            client.create(COLLECTION, b'{"n":0}', resource_id=f"{tag}-{i:05d}")
            for i in range(count)))
    return [(resource.name, resource.version) for resource in created]


# --- rounds ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Settings:
    rounds: int
    duration_s: float
    warmup_s: float
    concurrency: int
    channels: int
    processes: int


def run_round(pool: ProcessPoolExecutor, settings: Settings, kind: str, round_no: int,
              directory: Path) -> Round:
    """One round against `kind`: start it, seed the keys, run the load processes, stop it."""
    with target_server(kind, directory, round_no) as target:
        keys = asyncio.run(seed(target.address, settings.concurrency, f"r{round_no}"))
        start_at = time.time() + START_DELAY_S
        specs = [LoadSpec(target.address, keys[p::settings.processes], settings.channels, start_at,
                          settings.warmup_s, settings.duration_s)
                 for p in range(settings.processes)]
        cpu_before = cpu_seconds(target.pid)
        results = list(pool.map(run_load, specs))
        server_cpu = cpu_seconds(target.pid) - cpu_before
        server_log = "\n".join(line for line in target.log().splitlines()
                               if not line.startswith("serving on"))
    return summarize(kind, round_no, results, server_cpu, server_log, settings)


def summarize(kind: str, round_no: int, results: list[LoadResult], server_cpu_s: float,
              server_log: str, settings: Settings) -> Round:
    latencies = sorted(us for result in results for us in result.latencies_us)
    errors = ErrorTally()
    for result in results:
        errors.merge(result.errors)
    run_s = START_DELAY_S + settings.warmup_s + settings.duration_s
    return Round(
        target=kind, round=round_no, calls=len(latencies),
        calls_per_s=len(latencies) / settings.duration_s,
        p50_ms=percentile(latencies, 0.50) / 1000, p99_ms=percentile(latencies, 0.99) / 1000,
        errors=errors, server_cpu_pct=100 * server_cpu_s / run_s,
        client_cpu_pct=100 * sum(r.cpu_s for r in results) / run_s,
        server_log=server_log[-MAX_LOG_CHARS:])


def summary_rows(rounds: list[Round]) -> list[dict[str, Any]]:
    """Per target: the medians over its rounds."""
    rows = []
    for kind in TARGETS:
        mine = [r for r in rounds if r.target == kind]
        rows.append({
            "target": kind, "rounds": len(mine),
            "calls/s": median(r.calls_per_s for r in mine),
            "p50 ms": median(r.p50_ms for r in mine), "p99 ms": median(r.p99_ms for r in mine),
            "server CPU %": median(r.server_cpu_pct for r in mine),
            "client CPU %": median(r.client_cpu_pct for r in mine),
            "errors": sum(r.errors.total for r in mine)})
    return rows


def parse_args(argv: list[str] | None) -> Settings:
    parser = argparse.ArgumentParser(prog="python -m bench grpc",
                                     description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true",
                        help="short rounds (2 s after a 0.5 s warm-up)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per target (default 3)")
    parser.add_argument("--duration", type=float, help="measured seconds per round (default 5)")
    parser.add_argument("--warmup", type=float, help="seconds before measuring (default 1)")
    parser.add_argument("--concurrency", type=int, default=64,
                        help="coroutines in all, one key each (default 64)")
    parser.add_argument("--channels", type=int, default=1,
                        help="channels (TCP connections) per load process (default 1)")
    parser.add_argument("--processes", type=int, default=1,
                        help="load generator processes (default 1)")
    args = parser.parse_args(argv)
    if min(args.rounds, args.concurrency, args.channels, args.processes) < 1:
        parser.error("--rounds, --concurrency, --channels and --processes must be at least 1")
    if args.processes > args.concurrency:
        parser.error("--processes cannot exceed --concurrency")
    return Settings(
        rounds=args.rounds,
        duration_s=args.duration if args.duration is not None else (2.0 if args.quick else 5.0),
        warmup_s=args.warmup if args.warmup is not None else (0.5 if args.quick else 1.0),
        concurrency=args.concurrency, channels=args.channels, processes=args.processes)


def main(argv: list[str] | None = None) -> int:
    settings = parse_args(argv)
    rounds: list[Round] = []
    with tempfile.TemporaryDirectory(prefix="casledger-grpc-bench-") as tmp, \
            ProcessPoolExecutor(settings.processes, mp_context=get_context("spawn")) as pool:
        list(pool.map(_ready, [0.2] * settings.processes))  # spawn and import before timing
        for round_no in range(settings.rounds):
            for kind in TARGETS:
                result = run_round(pool, settings, kind, round_no, Path(tmp))
                rounds.append(result)
                print(f"round {round_no + 1}/{settings.rounds} {kind:>9}: "
                      f"{result.calls_per_s:,.0f} calls/s, p50 {result.p50_ms:.2f} ms, "
                      f"p99 {result.p99_ms:.2f} ms, {result.errors.total} errors",
                      flush=True)
    rows = summary_rows(rounds)
    echo, casledger = (row["calls/s"] for row in rows)
    ratio = casledger / echo if echo else 0.0
    print_table(f"gRPC CAS, {settings.concurrency} coroutines, {settings.processes} process(es) "
                f"x {settings.channels} channel(s), medians of {settings.rounds} round(s)",
                rows, list(rows[0]))
    print(f"casledger/echo throughput ratio: {ratio:.2f} (target >= 0.8)")
    for r in rounds:
        for line in r.errors.lines():
            print(f"  {r.target} round {r.round + 1}: {line}")
        if r.server_log.strip():
            print(f"  {r.target} round {r.round + 1} server log:\n{r.server_log}")
    path = write_results("grpc", {"settings": asdict(settings), "ratio": ratio,
                                  "summary": rows, "rounds": [asdict(r) for r in rounds]})
    print(f"results: {path}")
    return 0
