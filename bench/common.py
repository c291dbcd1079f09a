"""Helpers shared by the benchmarks: free ports, a `casledger serve` subprocess that is ready
when it is yielded and stopped cleanly after, medians, tables, JSON results and RSS from /proc.

    from bench.common import casledger_serve, free_port, write_results

    with casledger_serve("sqlite:///tmp/x.db", grpc_port=free_port(),
                         http_port=free_port()) as served:
        ...  # served.grpc_target, served.http_url, served.pid, served.bridge_pid
"""

from __future__ import annotations

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
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rich.console import Console
from rich.table import Table

# Where results go: bench/results, or CASLEDGER_BENCH_RESULTS (the smoke tests use a tmp dir).
RESULTS = Path(os.environ.get("CASLEDGER_BENCH_RESULTS") or Path(__file__).parent / "results")
READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0


class ServeFailed(RuntimeError):
    """`casledger serve` exited, or did not become ready in time; the message has its output."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def sqlite_url(path: Path) -> str:
    """The --db URL of a SQLite file (`sqlite:////abs/path.db` for an absolute path)."""
    return f"sqlite:///{path}"


def casledger_executable() -> str:
    """The `casledger` console script beside this Python (the project's virtualenv)."""
    found = shutil.which("casledger", path=os.path.dirname(sys.executable))
    if found is None:
        raise ServeFailed(f"no casledger console script next to {sys.executable}: "
                          "run `make venv` (pip install -e .)")
    return found


def children(pid: int) -> list[int]:
    """Direct child processes of `pid` (from /proc), empty if it has none or is gone."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as kids:
            return [int(kid) for kid in kids.read().split()]
    except OSError:
        return []


def _status_kib(pid: int, key: str) -> int:
    """A KiB figure of `pid`'s /proc status (`key` such as ``VmRSS``), 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith(f"{key}:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def rss_kib(pid: int) -> int:
    """The resident set size of `pid` in KiB (VmRSS from /proc), 0 if it is gone."""
    return _status_kib(pid, "VmRSS")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time `pid` has used so far, in seconds (from /proc), 0.0 if it is
    gone. The difference over a run says how much CPU it took, whatever else the machine ran."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            # The command name (field 2) may hold spaces: split after its closing parenthesis.
            rest = stat.read().rsplit(")", 1)[1].split()
        return (int(rest[11]) + int(rest[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def peak_rss_kib(pid: int) -> int:
    """The peak resident set size of `pid` in KiB (VmHWM from /proc), 0 if it is gone."""
    return _status_kib(pid, "VmHWM")


@dataclass
class Served:
    """A running `casledger serve`: its process, its bridge's (None with --no-http) and where
    to reach them."""

    process: subprocess.Popen[bytes]
    grpc_target: str
    http_url: str | None
    bridge_pid: int | None = None
    log_path: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def pids(self) -> list[int]:
        """The service's pid, then the bridge's if there is one."""
        return [self.pid] + ([self.bridge_pid] if self.bridge_pid is not None else [])

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of what the processes wrote (stdout and stderr), for error messages."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def _grpc_serving(target: str, timeout: float) -> bool:
    try:
        with grpc.insecure_channel(target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
            return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)
    except grpc.RpcError:
        return False


def _http_ready(url: str, timeout: float) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/readyz", timeout=timeout) as reply:
            return bool(reply.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _stop(process: subprocess.Popen[bytes], timeout: float) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextmanager
def casledger_serve(db_url: str, *, grpc_port: int, http_port: int | None,
                    extra_args: Sequence[str] = (), log_path: Path | None = None,
                    env: Mapping[str, str] | None = None,
                    ready_timeout_s: float = READY_TIMEOUT_S) -> Iterator[Served]:
    """Run `casledger serve --db db_url` on 127.0.0.1 (with the bridge on `http_port`, or
    `--no-http` when it is None) until the block ends; yield it once gRPC health says SERVING
    and, with the bridge, GET /readyz answers 200. Then SIGTERM, wait, kill after a timeout.

    Output goes to `log_path` (default: a file beside a sqlite database, else /dev/null);
    ``CASLEDGER_*`` variables of this environment are not passed on (flags only), and
    `--log-level warning` is the default unless `extra_args` says otherwise."""
    grpc_target = f"127.0.0.1:{grpc_port}"
    command = [casledger_executable(), "serve", "--db", db_url, "--grpc-listen", grpc_target]
    if http_port is None:
        command.append("--no-http")
    else:
        command += ["--http-listen", f"127.0.0.1:{http_port}"]
    if not any(arg.startswith("--log-level") for arg in extra_args):
        command += ["--log-level", "warning"]
    command += list(extra_args)
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("CASLEDGER_")}
    child_env.update(env or {})
    if log_path is None and db_url.startswith("sqlite:///"):
        log_path = Path(db_url.removeprefix("sqlite:///")).with_suffix(".log")
    log = open(log_path, "wb") if log_path is not None else open(os.devnull, "wb")  # noqa: SIM115
    http_url = f"http://127.0.0.1:{http_port}" if http_port is not None else None
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log,
                               stderr=subprocess.STDOUT, env=child_env, start_new_session=True)
    served = Served(process, grpc_target, http_url, log_path=log_path)
    try:
        deadline = time.monotonic() + ready_timeout_s
        while True:
            if process.poll() is not None:
                raise ServeFailed(f"casledger serve exited with {process.returncode}:\n"
                                  f"{served.log_tail()}")
            if time.monotonic() > deadline:
                raise ServeFailed(f"casledger serve not ready after {ready_timeout_s:.0f} s:\n"
                                  f"{served.log_tail()}")
            if _grpc_serving(grpc_target, 1.0) and (http_url is None
                                                    or _http_ready(http_url, 1.0)):
                break
            time.sleep(0.1)
        if http_port is not None:
            kids = children(process.pid)
            served.bridge_pid = kids[0] if kids else None
        yield served
    finally:
        _stop(process, STOP_TIMEOUT_S)
        log.close()


def median(xs: Iterable[float]) -> float:
    """The median of `xs`; 0.0 for none."""
    values = list(xs)
    return float(statistics.median(values)) if values else 0.0


def percentile(sorted_xs: Sequence[float], q: float) -> float:
    """The `q` quantile (0..1) of an already sorted sequence, nearest rank; 0.0 for none."""
    if not sorted_xs:
        return 0.0
    return float(sorted_xs[min(len(sorted_xs) - 1, max(0, round(q * len(sorted_xs)) - 1))])


def console() -> Console:
    """A rich console that stays wide when its output goes to a file or a pipe."""
    return Console(highlight=False, width=None if sys.stdout.isatty() else 160)


def print_table(title: str, rows: Sequence[Mapping[str, Any] | Sequence[Any]],
                columns: Sequence[str], *, out: Console | None = None) -> None:
    """Print `rows` (mappings keyed by column, or sequences in column order) as a table; floats
    get thousands separators and at most 2 decimals, the first column is left-aligned."""
    table = Table(title=title)
    for i, column in enumerate(columns):
        table.add_column(column, justify="left" if i == 0 else "right")
    for row in rows:
        cells = [row.get(c) for c in columns] if isinstance(row, Mapping) else list(row)
        table.add_row(*(_cell(cell) for cell in cells))
    (out or console()).print(table)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:,.2f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def machine() -> dict[str, Any]:
    """What the results were measured on (the load average says how busy it was)."""
    return {"python": platform.python_version(), "platform": platform.platform(),
            "cpus": os.cpu_count(), "load_average": os.getloadavg()}


def write_results(name: str, data: dict[str, Any]) -> Path:
    """Write `data` as bench/results/<name>-<UTC timestamp>.json (with `benchmark`, `when` and
    `machine` added unless present) and return the path."""
    document = {"benchmark": name, "when": datetime.now(UTC).isoformat(timespec="seconds"),
                "machine": machine(), **data}
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    path = RESULTS / f"{name}-{stamp}.json"
    n = 1
    while path.exists():
        n += 1
        path = RESULTS / f"{name}-{stamp}-{n}.json"
    path.write_text(json.dumps(document, indent=2) + "\n")
    return path
