"""The inspection commands as an operator runs them: the installed `casledger` console script
against `casledger serve` subprocesses and real files. `tail` must survive a server that is
killed and restarted on the same port and file, printing every revision exactly once."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest

from casledger.service.client import LedgerCallError, connect, precondition
from tests.support.processes import CASLEDGER, free_port

pytestmark = pytest.mark.e2e

WAIT_S = 20


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items()
            if not k.startswith("CASLEDGER_") and k not in ("FORCE_COLOR", "COLUMNS")}


@pytest.fixture
def casledger() -> str:
    if CASLEDGER is None:
        pytest.fail(f"no casledger console script next to {sys.executable}: pip install -e .")
    return CASLEDGER


@pytest.fixture
def servers(casledger: str, tmp_path: Path) -> Iterator[list[subprocess.Popen[bytes]]]:
    """`casledger serve` processes started by a test; all reaped at the end."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait()


def start_server(casledger: str, servers: list[subprocess.Popen[bytes]], db: Path,
                 port: int) -> subprocess.Popen[bytes]:
    log = db.parent / f"serve-{len(servers)}.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            [casledger, "serve", "--no-http", "--db", f"sqlite:///{db}", "--grpc-listen",
             f"127.0.0.1:{port}", "--shutdown-grace-s", "1"],
            stdin=subprocess.DEVNULL, stdout=output, stderr=output, env=clean_env())
    servers.append(process)
    return process


async def until_serving(target: str) -> None:
    async with asyncio.timeout(WAIT_S), connect(target, call_timeout=1) as client:
        while True:
            try:
                await client.versions("x/probe")
            except LedgerCallError as error:
                if error.reason == "NOT_FOUND":
                    return
            await asyncio.sleep(0.05)


def run(casledger: str, *args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([casledger, *args], input=stdin.decode() if stdin else None,
                          capture_output=True, text=True, env=clean_env(), timeout=WAIT_S,
                          check=False)


async def test_tail_resumes_without_a_gap_after_the_server_restarts(
        casledger: str, servers: list[subprocess.Popen[bytes]], tmp_path: Path) -> None:
    db, port = tmp_path / "ledger.db", free_port()
    target = f"127.0.0.1:{port}"
    start_server(casledger, servers, db, port)
    await until_serving(target)
    async with connect(target) as client:
        for i in range(3):
            await client.create("documents", b"{}", resource_id=f"before{i}")
    errors = (tmp_path / "tail.err").open("wb")
    tail = await asyncio.create_subprocess_exec(
        casledger, "tail", "--from", "1", "--json", "--max-backoff", "0.2", "--target", target,
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=errors, env=clean_env())
    try:
        assert tail.stdout is not None
        seen = []
        async with asyncio.timeout(WAIT_S):
            while len(seen) < 3:
                seen.append(json.loads(await tail.stdout.readline()))
            servers[0].kill()  # not a goodbye: the connection is simply lost
            servers[0].wait()
            async with connect(target) as client:
                with pytest.raises(LedgerCallError):  # nothing is serving now
                    await client.create("documents", b"{}", resource_id="lost")
            start_server(casledger, servers, db, port)
            await until_serving(target)
            async with connect(target) as client:
                for i in range(3):
                    await client.create("documents", b"{}", resource_id=f"after{i}")
            while len(seen) < 6:
                seen.append(json.loads(await tail.stdout.readline()))
        tail.send_signal(signal.SIGTERM)
        async with asyncio.timeout(WAIT_S):
            assert await tail.wait() == 0
            assert await tail.stdout.read() == b""  # nothing printed twice after the restart
    finally:
        if tail.returncode is None:
            tail.kill()
            await tail.wait()
        errors.close()
    assert [e["revision"] for e in seen] == [1, 2, 3, 4, 5, 6]
    assert [e["name"] for e in seen][3:] == [f"documents/after{i}" for i in range(3)]
    assert "resuming from revision 4" in (tmp_path / "tail.err").read_text()


async def test_verify_and_a_round_trip_through_export_and_import(
        casledger: str, servers: list[subprocess.Popen[bytes]], tmp_path: Path) -> None:
    db, port = tmp_path / "ledger.db", free_port()
    target = f"127.0.0.1:{port}"
    server = start_server(casledger, servers, db, port)
    await until_serving(target)
    async with connect(target) as client:
        await client.create("documents", b'{"n":1}', resource_id="a", reason="first")
        await client.replace("documents/a", b'{"n":2}', precondition=precondition(version=1))
        await client.delete("documents/a", precondition=precondition(version=2))
        await client.create("blobs", b"x" * 900_000, resource_id="big",
                            content_type="application/octet-stream")
    online = await asyncio.to_thread(run, casledger, "verify", "--target", target)
    assert online.returncode == 0, online.stderr
    server.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(server.wait, WAIT_S) == 0

    verified = run(casledger, "verify", "--db", f"sqlite:///{db}")
    assert verified.returncode == 0, verified.stderr
    assert "OK: 4 versions of 2 resources" in verified.stdout
    exported = run(casledger, "export", "--db", str(db))
    assert exported.returncode == 0, exported.stderr
    copy = tmp_path / "copy.db"
    imported = run(casledger, "import", "-", "--db", str(copy), "--json",
                   stdin=exported.stdout.encode())
    assert imported.returncode == 0, imported.stderr
    assert json.loads(imported.stdout)["versions"] == 4
    digests = {run(casledger, "digest", "--db", str(path)).stdout for path in (db, copy)}
    assert len(digests) == 1

    with closing(sqlite3.connect(copy)) as connection:
        connection.execute("DROP TRIGGER versions_no_update")
        connection.execute("UPDATE versions SET content = x'7b7d', size = 2 WHERE revision = 1")
        connection.commit()
    tampered = run(casledger, "verify", "--db", str(copy), "--json")
    assert tampered.returncode == 1
    assert [(p["kind"], p["name"], p["version"]) for p in json.loads(tampered.stdout)[
        "problems"]] == [("hash_mismatch", "documents/a", 1)]


    # A reader that goes away early (`| head`) is not an error, and leaves no traceback.
    code, stderr = read_ten_bytes(casledger, "get", "blobs/big", "--raw", "--db", str(db))
    assert code == 0
    assert b"Traceback" not in stderr


def read_ten_bytes(casledger: str, *args: str) -> tuple[int, bytes]:
    """Run `casledger ARGS`, read 10 bytes of its output, then close the pipe."""
    reader = subprocess.Popen([casledger, *args], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env=clean_env())
    assert reader.stdout is not None
    assert reader.stdout.read(10) == b"x" * 10
    reader.stdout.close()
    _, stderr = reader.communicate(timeout=WAIT_S)
    return reader.returncode, stderr


def test_usage_errors_exit_2(casledger: str) -> None:
    assert run(casledger, "verify", "--digest", "nope").returncode == 2
    assert run(casledger, "diff", "documents/a", "1").returncode == 2
    assert run(casledger, "frobnicate").returncode == 2
