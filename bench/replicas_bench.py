"""Compare-and-swap writes per second with 1, 2 and 3 `casledger serve` replicas on one
PostgreSQL ledger.

For each replica count this makes a fresh ledger (a schema of its own in the database the DSN
names, dropped after), starts that many ``casledger serve --no-http`` processes on it, and runs
the same number of concurrent gRPC clients, spread round-robin across the replicas, for
``--seconds``: each client compare-and-swap-increments a JSON counter of its own (UpdateResource
with ``precondition.version`` = the version it wrote last, so every write is a real CAS that
succeeds). Writes completed after a one-second warm-up are counted; latencies are per write.

Every write takes the ledger's tail row lock (see ``service/storage/postgres.py``), so writes
serialize ledger-wide: more replicas add CPU for the gRPC and Python work around a write, not
write concurrency inside the database. On a small machine the clients, the replicas and
PostgreSQL share the same cores: read the figures with that in mind.

    python -m bench.replicas_bench                       # 1, 2, 3 replicas, 5 s each
    python -m bench.replicas_bench --seconds 2 --replicas 1 3 --durability normal
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.parse
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rich.console import Console
from rich.table import Table

from casledger.service.client import LedgerClient, connect, precondition

DSN_ENVS = ("CASLEDGER_BENCH_POSTGRES_DSN", "CASLEDGER_TEST_POSTGRES_DSN")
DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/test"
WARMUP_S = 1.0
RESULTS = Path(__file__).parent / "results"


@dataclass
class Result:
    replicas: int
    clients: int
    seconds: float
    writes: int
    writes_per_s: float
    p50_ms: float
    p99_ms: float
    errors: int


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def with_schema(dsn: str, schema: str) -> str:
    parts = urllib.parse.urlsplit(dsn)
    query = urllib.parse.urlencode([*urllib.parse.parse_qsl(parts.query),
                                    ("search_path", schema)])
    return urllib.parse.urlunsplit(parts._replace(query=query))


async def wait_serving(target: str, process: subprocess.Popen[bytes]) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for _ in range(300):
            if process.poll() is not None:
                raise RuntimeError(f"casledger serve exited with {process.returncode}")
            with contextlib.suppress(grpc.aio.AioRpcError):
                reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            await asyncio.sleep(0.1)
    raise RuntimeError(f"casledger serve on {target} never became SERVING")


async def client_loop(ledger: LedgerClient, key: str, start: float, stop: float,
                      latencies: list[float], errors: list[int]) -> None:
    created = await ledger.create("counters", b'{"n":0}', resource_id=key)
    version, n = created.version, 0
    while (now := time.perf_counter()) < stop:
        try:
            written = await ledger.replace(f"counters/{key}", b'{"n":%d}' % (n + 1),
                                          precondition=precondition(version=version))
        except Exception:
            errors[0] += 1
            continue
        done = time.perf_counter()
        version, n = written.version, n + 1
        if now >= start:
            latencies.append(done - now)


async def admin(dsn: str, *statements: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


async def measure(targets: list[str], processes: list[subprocess.Popen[bytes]], clients: int,
                  seconds: float) -> tuple[list[float], int]:
    for target, process in zip(targets, processes, strict=True):
        await wait_serving(target, process)
    latencies: list[float] = []
    errors = [0]
    async with contextlib.AsyncExitStack() as stack:
        ledgers = [await stack.enter_async_context(connect(targets[i % len(targets)]))
                   for i in range(clients)]
        begin = time.perf_counter()
        start, stop = begin + WARMUP_S, begin + WARMUP_S + seconds
        await asyncio.gather(*(client_loop(ledger, f"c{i}", start, stop, latencies, errors)
                               for i, ledger in enumerate(ledgers)))
    return sorted(latencies), errors[0]


def run_config(casledger: str, dsn: str, replicas: int, clients: int, seconds: float,
               durability: str) -> Result:
    schema = f"casledger_bench_{os.getpid()}_{replicas}"
    asyncio.run(admin(dsn, f'DROP SCHEMA IF EXISTS "{schema}" CASCADE',
                      f'CREATE SCHEMA "{schema}"'))
    url = with_schema(dsn, schema)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CASLEDGER_")}
    targets = [f"127.0.0.1:{free_port()}" for _ in range(replicas)]
    processes = []
    try:
        for target in targets:
            processes.append(subprocess.Popen(
                [casledger, "serve", "--no-http", "--db", url, "--grpc-listen", target,
                 "--durability", durability, "--log-level", "warning"],
                stdin=subprocess.DEVNULL, env=env))
        latencies, errors = asyncio.run(measure(targets, processes, clients, seconds))
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        asyncio.run(admin(dsn, f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
    return Result(
        replicas=replicas, clients=clients, seconds=seconds, writes=len(latencies),
        writes_per_s=round(len(latencies) / seconds, 1),
        p50_ms=round(statistics.median(latencies) * 1000, 2) if latencies else 0.0,
        p99_ms=round(latencies[int(len(latencies) * 0.99)] * 1000, 2) if latencies else 0.0,
        errors=errors)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn", default=next((os.environ[e] for e in DSN_ENVS if
                                               os.environ.get(e)), DEFAULT_DSN),
                        help="an existing PostgreSQL database (a schema is made per run)")
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--clients", type=int, default=24,
                        help="concurrent clients, the same for every replica count")
    parser.add_argument("--seconds", type=float, default=5.0, help="measured, per replica count")
    parser.add_argument("--durability", choices=("full", "normal"), default="full")
    parser.add_argument("--no-save", action="store_true", help="do not write bench/results")
    args = parser.parse_args(argv)
    casledger = shutil.which("casledger", path=os.path.dirname(sys.executable))
    if casledger is None:
        parser.error("no casledger console script next to this Python: pip install -e .")

    results = [run_config(casledger, args.dsn, n, args.clients, args.seconds, args.durability)
               for n in args.replicas]
    table = Table(title=f"CAS writes/s, {args.clients} clients, durability {args.durability}, "
                        f"{os.cpu_count()} CPUs")
    for column in ("replicas", "writes/s", "p50 ms", "p99 ms", "writes", "errors"):
        table.add_column(column, justify="right")
    for r in results:
        table.add_row(str(r.replicas), f"{r.writes_per_s:.0f}", f"{r.p50_ms:.1f}",
                      f"{r.p99_ms:.1f}", str(r.writes), str(r.errors))
    Console().print(table)
    if not args.no_save:
        RESULTS.mkdir(exist_ok=True)
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
        path = RESULTS / f"replicas-{stamp}.json"
        path.write_text(json.dumps({
            "benchmark": "replicas", "durability": args.durability, "clients": args.clients,
            "seconds": args.seconds, "cpus": os.cpu_count(), "python": platform.python_version(),
            "machine": platform.machine(), "results": [asdict(r) for r in results]},
            indent=2) + "\n")
        print(f"saved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
