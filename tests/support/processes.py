"""`casledger` commands as subprocesses, for the end-to-end tests that kill and restart them.

:class:`Processes` starts them (each one's stdout and stderr go to a file), waits until they
answer, and reaps every one it started when the test ends — the bridge child of `casledger serve`
too, by its pid — so no process outlives its test. Waits are bounded by a number of turns: a
hang fails the test instead of stalling the run, and nothing is asserted about time.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

CASLEDGER = shutil.which("casledger", path=os.path.dirname(sys.executable))
WAIT_TURNS = 300  # x 0.1 s
EXIT_WAIT_S = 30


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without any CASLEDGER_* setting, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CASLEDGER_")}
    env.update(extra)
    return env


def wait_http_ready(proc: subprocess.Popen[bytes], base_url: str, stderr: Path) -> None:
    """Wait (synchronously) until `proc`'s bridge answers GET /readyz with 200; fail the test
    with its stderr if it exits or never gets there."""
    for _ in range(WAIT_TURNS):
        assert proc.poll() is None, stderr.read_text()
        try:
            if httpx.get(f"{base_url}/readyz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    pytest.fail(f"the bridge never became ready:\n{stderr.read_text()}")


def children_of(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    try:
        return [int(p) for p in path.read_text().split()]
    except OSError:
        return []


@dataclass
class Process:
    proc: subprocess.Popen[bytes]
    log_path: Path
    args: tuple[str, ...]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL, then reap. A bridge child of `serve` notices its parent is gone and goes."""
        if self.alive():
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=EXIT_WAIT_S)

    async def terminate(self) -> int:
        """SIGTERM, then wait (off the event loop) for the exit code."""
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
        try:
            return await asyncio.to_thread(self.proc.wait, EXIT_WAIT_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"casledger did not exit on SIGTERM:\n{self.log()}")

    def failure(self, what: str) -> str:
        return f"{what}: casledger {' '.join(self.args)} (exit {self.proc.poll()}):\n{self.log()}"


class Processes:
    """Starts casledger commands; reaps all of them (and their children) on exit."""

    def __init__(self, directory: Path) -> None:
        if CASLEDGER is None:
            pytest.fail(f"no casledger console script next to {sys.executable}: pip install -e .")
        self.casledger = CASLEDGER
        self.directory = directory
        self.started: list[Process] = []
        self.children: set[int] = set()

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()

    def start(self, *args: str) -> Process:
        log_path = self.directory / f"casledger-{len(self.started)}.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen([self.casledger, *args], stdin=subprocess.DEVNULL,
                                    stdout=log, stderr=log, cwd=self.directory, env=clean_env())
        process = Process(proc, log_path, args)
        self.started.append(process)
        return process

    def note_children(self, process: Process) -> None:
        """Remember `process`'s children (the bridge of `serve`) so close() can reap them."""
        self.children.update(children_of(process.pid))

    def close(self) -> None:
        for process in self.started:
            self.children.update(children_of(process.pid))
            if process.alive():
                process.proc.send_signal(signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.proc.wait(timeout=EXIT_WAIT_S)
        for pid in self.children:
            # Bridges started by our processes: they stop by themselves once their parent is
            # gone; one still running (and still a casledger bridge, not a reused pid) is killed.
            if is_bridge(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def is_bridge(pid: int) -> bool:
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"casledger.http_bridge" in command


async def wait_serving(process: Process, target: str) -> None:
    """Until the gRPC health check at `target` answers SERVING (fails if the process exits)."""
    async with grpc.aio.insecure_channel(target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for _ in range(WAIT_TURNS):
            if not process.alive():
                pytest.fail(process.failure("exited before serving"))
            try:
                reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
            except grpc.aio.AioRpcError:
                reply = None
            if reply is not None and reply.status == health_pb2.HealthCheckResponse.SERVING:
                return
            await asyncio.sleep(0.1)
    pytest.fail(process.failure("never became SERVING"))


async def wait_ready(process: Process, base_url: str) -> None:
    """Until the bridge's /readyz answers 200 (fails if the process exits)."""
    async with httpx.AsyncClient(base_url=base_url, timeout=2) as http:
        for _ in range(WAIT_TURNS):
            if not process.alive():
                pytest.fail(process.failure("exited before the bridge was ready"))
            with contextlib.suppress(httpx.TransportError):
                if (await http.get("/readyz")).status_code == 200:
                    return
            await asyncio.sleep(0.1)
    pytest.fail(process.failure("the bridge never became ready"))
