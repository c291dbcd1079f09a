"""`casledger serve` as a subprocess, over real loopback gRPC: the CAS flow, signals, restarts,
environment variables and the failures an operator sees at startup."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from casledger.service.api.casledger.v1 import ledger_pb2 as pb
from casledger.service.api.casledger.v1 import ledger_pb2_grpc as pb_grpc
from tests.support.processes import CASLEDGER, clean_env, free_port

pytestmark = pytest.mark.e2e

# Bounds on waiting for a process, so a hang fails the test instead of stalling the run; they
# are generous on purpose and nothing is asserted about how long anything takes.
STARTUP_TURNS = 300  # x 0.1 s
EXIT_WAIT_S = 30
CALL_TIMEOUT_S = 10


@dataclass
class Process:
    proc: subprocess.Popen[bytes]
    port: int
    stderr_path: Path

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def exit_code(self) -> int:
        """Wait (off the event loop's thread when called via asyncio.to_thread) for the exit."""
        try:
            return self.proc.wait(timeout=EXIT_WAIT_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"casledger did not exit; stderr:\n{self.stderr()}")

    async def stop(self, signum: int = signal.SIGTERM) -> int:
        self.proc.send_signal(signum)
        return await asyncio.to_thread(self.exit_code)


Launch = Callable[..., Process]


@pytest.fixture
def casledger() -> str:
    if CASLEDGER is None:
        pytest.fail(f"no casledger console script next to {sys.executable}: pip install -e .")
    return CASLEDGER


@pytest.fixture
def launch(tmp_path: Path, casledger: str) -> Iterator[Launch]:
    """Start `casledger serve ARGS` (always --no-http); every process is reaped at the end."""
    started: list[Process] = []

    def start(*args: str, port: int | None = None, env: dict[str, str] | None = None,
              flags: bool = True) -> Process:
        port = free_port() if port is None else port
        command = [casledger, "serve"]
        if flags:
            command += ["--grpc-listen", f"127.0.0.1:{port}", "--no-http"]
        stderr_path = tmp_path / f"stderr-{len(started)}.txt"
        with stderr_path.open("wb") as stderr:
            proc = subprocess.Popen(
                [*command, *args], stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr,
                cwd=tmp_path, env=clean_env() if env is None else env)
        process = Process(proc, port, stderr_path)
        started.append(process)
        return process

    yield start
    for process in started:
        if process.proc.poll() is None:
            process.proc.kill()
        process.proc.wait()


async def wait_serving(process: Process) -> None:
    """Until Health.Check answers SERVING (or the process dies: then fail with its stderr)."""
    async with grpc.aio.insecure_channel(process.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for _ in range(STARTUP_TURNS):
            if process.proc.poll() is not None:
                pytest.fail(f"casledger exited with {process.proc.returncode}:\n"
                            f"{process.stderr()}")
            try:
                reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
            except grpc.aio.AioRpcError:
                reply = None
            if reply is not None and reply.status == health_pb2.HealthCheckResponse.SERVING:
                return
            await asyncio.sleep(0.1)
    pytest.fail(f"casledger never became SERVING:\n{process.stderr()}")


@contextlib.asynccontextmanager
async def ledger(process: Process) -> AsyncIterator[pb_grpc.LedgerStub]:
    async with grpc.aio.insecure_channel(process.target) as channel:
        yield pb_grpc.LedgerStub(channel)


def reason_of(error: grpc.aio.AioRpcError) -> tuple[str, dict[str, str]]:
    """The ErrorInfo reason and metadata a refused call carries."""
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            assert isinstance(value, bytes)
            for detail in status_pb2.Status.FromString(value).details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info):
                    assert info.domain == "casledger.dev"
                    return info.reason, dict(info.metadata)
    raise AssertionError(f"no ErrorInfo in {error!r}")


def content(data: bytes) -> pb.ResourceContent:
    return pb.ResourceContent(data=data, content_type="application/json")


async def create(stub: pb_grpc.LedgerStub, resource_id: str, data: bytes) -> pb.Resource:
    reply: pb.Resource = await stub.CreateResource(pb.CreateResourceRequest(
        parent="documents", resource_id=resource_id, content=data,
        content_type="application/json"), timeout=CALL_TIMEOUT_S)
    return reply


async def update(stub: pb_grpc.LedgerStub, name: str, data: bytes,
                 precondition: pb.Precondition | None) -> pb.Resource:
    reply: pb.Resource = await stub.UpdateResource(pb.UpdateResourceRequest(
        name=name, content=content(data), precondition=precondition), timeout=CALL_TIMEOUT_S)
    return reply


async def history(stub: pb_grpc.LedgerStub, name: str) -> list[pb.Resource]:
    reply = await stub.ListVersions(pb.ListVersionsRequest(name=name, include_content=True),
                                    timeout=CALL_TIMEOUT_S)
    assert not reply.next_page_token
    return list(reply.versions)


def assert_clean_exit(process: Process, code: int) -> None:
    stderr = process.stderr()
    assert code == 0, stderr
    assert "Traceback" not in stderr, stderr


# --- the CAS flow over the wire ----------------------------------------------------------------


async def test_cas_flow_over_loopback(launch: Launch, tmp_path: Path) -> None:
    server = launch("--db", f"sqlite:///{tmp_path / 'l.db'}")
    await wait_serving(server)
    async with ledger(server) as stub:
        v1 = await create(stub, "d1", b'{"n":1}')
        assert (v1.name, v1.version, v1.revision) == ("documents/d1", 1, 1)

        with pytest.raises(grpc.aio.AioRpcError) as blind:
            await update(stub, v1.name, b'{"n":2}', None)
        assert blind.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert reason_of(blind.value) == ("PRECONDITION_REQUIRED", {
            "name": v1.name, "current_version": "1", "current_etag": v1.etag})

        v2 = await update(stub, v1.name, b'{"n":2}', pb.Precondition(etag=v1.etag))
        assert (v2.version, v2.revision) == (2, 2)

        with pytest.raises(grpc.aio.AioRpcError) as stale:
            await update(stub, v1.name, b'{"n":"lost"}', pb.Precondition(etag=v1.etag))
        assert stale.value.code() == grpc.StatusCode.ABORTED
        assert reason_of(stale.value) == ("VERSION_MISMATCH", {
            "name": v1.name, "current_version": "2", "current_etag": v2.etag})

        with pytest.raises(grpc.aio.AioRpcError) as stale_version:
            await update(stub, v1.name, b'{"n":"lost"}', pb.Precondition(version=1))
        assert stale_version.value.code() == grpc.StatusCode.ABORTED

        v3 = await update(stub, v1.name, b'{"n":3}', pb.Precondition(version=2))
        assert (v3.version, v3.revision) == (3, 3)

        versions = await history(stub, v1.name)
        assert [(v.version, v.revision, v.content) for v in versions] == [
            (1, 1, b'{"n":1}'), (2, 2, b'{"n":2}'), (3, 3, b'{"n":3}')]
        assert [v.etag for v in versions] == [v1.etag, v2.etag, v3.etag]
        current = await stub.GetResource(pb.GetResourceRequest(name=v1.name),
                                         timeout=CALL_TIMEOUT_S)
        assert (current.version, current.content) == (3, b'{"n":3}')
    assert_clean_exit(server, await server.stop())


# --- signals -----------------------------------------------------------------------------------


async def test_sigterm_with_a_watch_in_flight_exits_0(launch: Launch, tmp_path: Path) -> None:
    server = launch("--db", f"sqlite:///{tmp_path / 'l.db'}", "--shutdown-grace-s", "1")
    await wait_serving(server)
    async with ledger(server) as stub:
        await create(stub, "d1", b"{}")
        call = stub.Watch(pb.WatchRequest(start_revision=1))
        first = await call.read()
        assert first.resource.revision == 1  # the stream is established and replaying
        code = await server.stop(signal.SIGTERM)
        # The stream ends (with a status, not a hang) when the server goes away.
        with contextlib.suppress(grpc.aio.AioRpcError):
            while await call.read() is not grpc.aio.EOF:
                pass
        assert call.done()
    assert_clean_exit(server, code)


async def test_sigterm_during_a_stream_of_writes_loses_no_acknowledged_write(
    launch: Launch, tmp_path: Path
) -> None:
    db = f"sqlite:///{tmp_path / 'l.db'}"
    server = launch("--db", db)
    await wait_serving(server)
    acknowledged: list[pb.Resource] = []
    busy = asyncio.Event()

    async def writer(stub: pb_grpc.LedgerStub) -> None:
        try:
            current = await create(stub, "busy", b'{"n":0}')
            acknowledged.append(current)
            for n in range(1, 100_000):
                try:
                    current = await update(stub, current.name, b'{"n":%d}' % n,
                                           pb.Precondition(etag=current.etag))
                except grpc.aio.AioRpcError:
                    return  # the server is going away: from here on, nothing is acknowledged
                acknowledged.append(current)
                if len(acknowledged) == 20:
                    busy.set()
        finally:
            busy.set()  # also when it failed early: the test then fails on `await task`

    async with ledger(server) as stub:
        task = asyncio.ensure_future(writer(stub))
        await busy.wait()
        code = await server.stop(signal.SIGTERM)
        await task
    assert_clean_exit(server, code)
    assert len(acknowledged) >= 20

    again = launch("--db", db)
    await wait_serving(again)
    async with ledger(again) as stub:
        stored = await history(stub, "documents/busy")
    # Every acknowledged write is on disk, in order; at most one more whose reply was lost.
    assert [(v.version, v.etag) for v in stored[:len(acknowledged)]] == [
        (v.version, v.etag) for v in acknowledged]
    assert len(stored) - len(acknowledged) in (0, 1)
    assert [v.revision for v in stored] == list(range(1, len(stored) + 1))
    assert_clean_exit(again, await again.stop())


async def test_sigint_exits_0(launch: Launch, tmp_path: Path) -> None:
    server = launch("--db", f"sqlite:///{tmp_path / 'l.db'}")
    await wait_serving(server)
    assert_clean_exit(server, await server.stop(signal.SIGINT))


# --- restarts ----------------------------------------------------------------------------------


async def test_restart_keeps_data_and_continues_revisions(launch: Launch, tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'l.db'}"
    first = launch("--db", db)
    await wait_serving(first)
    async with ledger(first) as stub:
        v1 = await create(stub, "d1", b'{"n":1}')
        v2 = await update(stub, v1.name, b'{"n":2}', pb.Precondition(etag=v1.etag))
        await create(stub, "d2", b'{"other":true}')
    assert_clean_exit(first, await first.stop())

    second = launch("--db", db)
    await wait_serving(second)
    async with ledger(second) as stub:
        current = await stub.GetResource(pb.GetResourceRequest(name=v1.name),
                                         timeout=CALL_TIMEOUT_S)
        assert (current.version, current.etag, current.content) == (2, v2.etag, b'{"n":2}')
        with pytest.raises(grpc.aio.AioRpcError) as stale:
            await update(stub, v1.name, b'{"n":"lost"}', pb.Precondition(etag=v1.etag))
        assert stale.value.code() == grpc.StatusCode.ABORTED
        v3 = await update(stub, v1.name, b'{"n":3}', pb.Precondition(etag=v2.etag))
        assert (v3.version, v3.revision) == (3, 4)
        assert [v.revision for v in await history(stub, v1.name)] == [1, 2, 4]
    assert_clean_exit(second, await second.stop())


async def test_a_second_server_on_the_same_file_is_refused(launch: Launch,
                                                           tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'l.db'}"
    first = launch("--db", db)
    await wait_serving(first)
    second = launch("--db", db)
    code = await asyncio.to_thread(second.exit_code)
    assert code != 0
    assert "another casledger process is serving" in second.stderr()
    assert "Traceback" not in second.stderr()
    await wait_serving(first)  # undisturbed
    assert_clean_exit(first, await first.stop())


# --- configuration -----------------------------------------------------------------------------


async def test_environment_variables_instead_of_flags(launch: Launch, tmp_path: Path) -> None:
    port = free_port()
    db_file = tmp_path / "from-env" / "l.db"
    server = launch(port=port, flags=False, env=clean_env(
        CASLEDGER_GRPC_LISTEN=f"127.0.0.1:{port}", CASLEDGER_DB=f"sqlite:///{db_file}",
        CASLEDGER_NO_HTTP="1"))
    await wait_serving(server)
    async with ledger(server) as stub:
        await create(stub, "from-env", b'{"env":true}')
    assert_clean_exit(server, await server.stop())
    with contextlib.closing(sqlite3.connect(db_file)) as db:
        rows = db.execute("SELECT name, version FROM versions").fetchall()
    assert rows == [("documents/from-env", 1)]
    assert not (tmp_path / "casledger.db").exists()  # not the default path


@pytest.mark.parametrize(("args", "env", "mentions"), [
    (["--max-content-bytes", "nope"], {}, ["max-content-bytes", "nope"]),
    ([], {"CASLEDGER_MAX_CONTENT_BYTES": "nope"}, ["CASLEDGER_MAX_CONTENT_BYTES", "nope"]),
    (["--max-content-bytes", "0"], {}, ["max_content_bytes"]),
    (["--grpc-listen", "nowhere"], {}, ["grpc_listen", "nowhere"]),
    (["--durability", "sometimes"], {}, ["durability", "sometimes"]),
    (["--request-id-ttl-s", "60"], {}, ["86400"]),
    (["--no-such-flag"], {}, ["--no-such-flag"]),
])
def test_bad_settings_exit_2_with_a_message(
    casledger: str, tmp_path: Path, args: list[str], env: dict[str, str], mentions: list[str]
) -> None:
    done = subprocess.run(
        [casledger, "serve", "--no-http", "--db", f"sqlite:///{tmp_path / 'l.db'}", *args],
        capture_output=True, text=True, cwd=tmp_path, env=clean_env(**env), check=False,
        timeout=EXIT_WAIT_S, stdin=subprocess.DEVNULL)
    assert done.returncode == 2, done.stderr
    for word in mentions:
        assert word in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "l.db").exists()  # refused before touching anything


async def test_a_port_in_use_exits_nonzero_with_a_message(launch: Launch,
                                                          tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        server = launch("--db", f"sqlite:///{tmp_path / 'l.db'}", port=port)
        code = await asyncio.to_thread(server.exit_code)
    stderr = server.stderr()
    assert code != 0
    assert f"cannot listen on 127.0.0.1:{port}" in stderr
    assert "Traceback" not in stderr


async def test_a_port_held_by_another_casledger_is_refused(launch: Launch,
                                                           tmp_path: Path) -> None:
    first = launch("--db", f"sqlite:///{tmp_path / 'one.db'}")
    await wait_serving(first)
    # Another ledger on the same port must not share it (gRPC's SO_REUSEPORT would allow that).
    second = launch("--db", f"sqlite:///{tmp_path / 'two.db'}", port=first.port)
    code = await asyncio.to_thread(second.exit_code)
    assert code != 0
    assert f"cannot listen on 127.0.0.1:{first.port}" in second.stderr()
    assert "Traceback" not in second.stderr()
    assert_clean_exit(first, await first.stop())
