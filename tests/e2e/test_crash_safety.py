"""Crash safety: `casledger serve` killed with SIGKILL under write load, round after round, on the
same ledger file. After every kill the file as the crash left it verifies (`casledger verify
--db`, nothing repaired by hand), and once restarted the service has every write it acknowledged
— name, version, content, ETag — and nothing it was not asked to write. A bridge in front of a
service that dies answers 503 with Retry-After meanwhile and recovers by itself.

The durability setting is checked on the way: `full` (the default) is the mode under test; with
`normal` a crash of the process (not of the machine) must lose nothing either, as the README says.
"""

from __future__ import annotations

import asyncio
import json
import random
import sqlite3
import subprocess
from collections import defaultdict
from collections.abc import Mapping
from contextlib import AsyncExitStack, closing
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx
import pytest

from casledger.service.api.casledger.v1 import ledger_pb2 as pb
from casledger.service.client import LedgerCallError, LedgerClient, connect, precondition
from casledger.service.config import Settings
from casledger.service.server import serve
from tests.support.processes import (
    EXIT_WAIT_S,
    WAIT_TURNS,
    Process,
    Processes,
    free_port,
    wait_ready,
    wait_serving,
)

pytestmark = pytest.mark.e2e

WRITERS = 8
# Acknowledged writes to wait for before each kill: the kill lands at a different point of the
# load in every round.
KILL_AFTER = (30, 45, 60, 75, 90)
MAX_OPS_PER_WRITER = 5_000  # a bound: a kill that never comes ends the loop anyway
CALL_TIMEOUT_S = 10.0
GONE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED}


@dataclass(frozen=True)
class Written:
    name: str
    version: int
    etag: str
    content: bytes
    deleted: bool


@dataclass
class Load:
    """What the writers were told (acknowledged) and what they were never told (in flight)."""

    acknowledged: list[Written] = field(default_factory=list)
    in_flight: dict[str, list[bytes]] = field(default_factory=lambda: defaultdict(list))
    enough: asyncio.Event = field(default_factory=asyncio.Event)
    target: int = 0

    def ack(self, resource: pb.Resource) -> None:
        self.acknowledged.append(Written(resource.name, resource.version, resource.etag,
                                         resource.content, resource.deleted))
        if len(self.acknowledged) >= self.target:
            self.enough.set()


async def writer(ledger: LedgerClient, load: Load, round_: int, w: int) -> None:
    """Creates resources and updates (sometimes deletes and recreates) them under
    compare-and-swap until the service goes away."""
    rng = random.Random(round_ * 100 + w)
    current: pb.Resource | None = None
    for i in range(MAX_OPS_PER_WRITER):
        content = json.dumps({"round": round_, "writer": w, "i": i,
                              "pad": "x" * rng.randrange(0, 3000)}).encode()
        if current is None or rng.random() < 0.1:
            name = f"crash/r{round_}w{w}i{i}"
            call = ledger.create("crash", content, resource_id=name.rpartition("/")[2])
        elif current.deleted:
            name = current.name  # recreate: the numbering goes on after the tombstone
            call = ledger.create("crash", content, resource_id=name.rpartition("/")[2])
        elif rng.random() < 0.1:
            name, content = current.name, b""
            call = ledger.delete(name, precondition=precondition(version=current.version))
        else:
            name = current.name
            call = ledger.replace(name, content, precondition=precondition(etag=current.etag))
        load.in_flight[name].append(content)
        try:
            current = await call
        except LedgerCallError as error:
            if error.code in GONE:
                return  # killed: this write is indeterminate, and the writer is done
            raise
        load.in_flight[name].remove(content)
        load.ack(current)


def verify(casledger: str, db: Path) -> str:
    """`casledger verify --db` on the file, as an operator would run it; its output."""
    done = subprocess.run([casledger, "verify", "--db", str(db)], capture_output=True, text=True,
                          timeout=EXIT_WAIT_S, stdin=subprocess.DEVNULL, check=False)
    assert done.returncode == 0, f"verify failed ({done.returncode}):\n{done.stdout}{done.stderr}"
    return done.stdout


async def lost_writes(ledger: LedgerClient, load: Load) -> list[Written]:
    """Every acknowledged write the service no longer has, exactly as acknowledged; on the way,
    each resource's history must be gap-free and hold nothing but what was asked for."""
    by_name: dict[str, list[Written]] = defaultdict(list)
    for written in load.acknowledged:
        by_name[written.name].append(written)
    lost: list[Written] = []
    for name, writes in by_name.items():
        try:
            stored = {v.version: v async for v in ledger.history(name, include_content=True)}
        except LedgerCallError as error:
            if error.reason != "NOT_FOUND":
                raise
            stored = {}  # the resource is gone altogether
        assert sorted(stored) == list(range(1, len(stored) + 1)), (name, sorted(stored))
        for written in writes:
            found = stored.get(written.version)
            if found is None or (found.etag, found.content, found.deleted) != (
                    written.etag, written.content, written.deleted):
                lost.append(written)
        acknowledged = {w.version for w in writes}
        for version, v in stored.items():
            if version not in acknowledged:
                # Only a write that was in flight when the service died may have landed unseen.
                assert v.content in load.in_flight[name], (name, version, v.content[:80])
    return lost


async def lost_at(target: str, load: Load) -> list[Written]:
    async with connect(target, call_timeout=CALL_TIMEOUT_S) as ledger:
        return await lost_writes(ledger, load)


def stored_revisions(db: Path) -> int:
    with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as connection:
        (count,) = connection.execute("SELECT count(*) FROM versions").fetchone()
    return int(count)


@pytest.mark.parametrize(("durability", "kills"), [("full", 5), ("normal", 2)])
async def test_sigkill_under_write_load_loses_no_acknowledged_write(
    tmp_path: Path, durability: str, kills: int
) -> None:
    db = tmp_path / "ledger.db"
    load = Load()
    in_flight_at_kill: list[int] = []
    lost_after_restart: list[int] = []
    with Processes(tmp_path) as processes:

        def start() -> tuple[Process, str]:
            port = free_port()
            process = processes.start("serve", "--no-http", "--db", f"sqlite:///{db}",
                                      "--grpc-listen", f"127.0.0.1:{port}",
                                      "--durability", durability, "--log-level", "warning")
            return process, f"127.0.0.1:{port}"

        for round_, kill_after in enumerate(KILL_AFTER[:kills]):
            process, target = start()
            await wait_serving(process, target)
            if round_:
                # Restarted on the file the last kill left: every write acknowledged so far.
                lost_after_restart.append(len(await lost_at(target, load)))
            load.enough.clear()
            in_flight_before = sum(map(len, load.in_flight.values()))
            load.target = len(load.acknowledged) + kill_after
            async with AsyncExitStack() as stack:
                writers = []
                for w in range(WRITERS):
                    ledger = await stack.enter_async_context(
                        connect(target, call_timeout=CALL_TIMEOUT_S))
                    writers.append(asyncio.ensure_future(writer(ledger, load, round_, w)))
                try:
                    async with asyncio.timeout(60):
                        await load.enough.wait()
                    # Not right on an acknowledgement: somewhere in the writes that follow.
                    await asyncio.sleep(random.Random(round_).uniform(0, 0.05))
                    in_flight_at_kill.append(
                        sum(map(len, load.in_flight.values())) - in_flight_before)
                finally:
                    process.kill()  # SIGKILL, with writes in flight
                    async with asyncio.timeout(60):
                        await asyncio.gather(*writers)
            assert not process.alive()
            # The file as the crash left it verifies: no repair, no recovery step.
            assert "OK" in verify(processes.casledger, db)

        # Restart once more: every acknowledged write of every round is there.
        process, target = start()
        await wait_serving(process, target)
        lost = await lost_at(target, load)
        lost_after_restart.append(len(lost))
        assert await process.terminate() == 0, process.log()
        assert "Traceback" not in process.log(), process.log()
        verify(processes.casledger, db)

    stored = stored_revisions(db)
    print(f"\ncrash safety ({durability}): {len(load.acknowledged)} acknowledged writes, "
          f"{kills} SIGKILLs with {in_flight_at_kill} writes in flight, lost after each "
          f"restart {lost_after_restart}; {stored} versions stored "
          f"({stored - len(load.acknowledged)} landed unacknowledged)")
    assert not lost, lost[:5]
    assert not any(lost_after_restart), lost_after_restart
    assert all(in_flight_at_kill), "a kill landed while nothing was being written"
    assert len(load.acknowledged) >= sum(KILL_AFTER[:kills])


async def test_restarted_service_under_a_running_bridge(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'ledger.db'}"
    grpc_port, http_port = free_port(), free_port()
    target, base_url = f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{http_port}"
    service_args = ("serve", "--no-http", "--db", db, "--grpc-listen", target,
                    "--log-level", "warning")
    with Processes(tmp_path) as processes:
        service = processes.start(*service_args)
        await wait_serving(service, target)
        bridge = processes.start("bridge", "--target", target, "--http-listen",
                                 f"127.0.0.1:{http_port}", "--log-level", "warning")
        await wait_ready(bridge, base_url)
        async with httpx.AsyncClient(base_url=base_url, timeout=CALL_TIMEOUT_S) as http:
            created = await http.put("/v1/notes/n1", content=b'{"v": 1}', headers={
                "If-None-Match": "*", "Content-Type": "application/json"})
            assert created.status_code == 201, created.text

            service.kill()

            # Meanwhile: 503 + Retry-After, as problem+json, for reads and writes alike.
            for method, headers in (("GET", {}), ("PUT", {"If-Match": created.headers["etag"],
                                                          "Content-Type": "application/json"})):
                down = await http.request(method, "/v1/notes/n1", content=b'{"v": 2}'
                                          if method == "PUT" else None, headers=headers)
                assert down.status_code == 503, (method, down.status_code, down.text)
                assert int(down.headers["retry-after"]) >= 1
                assert down.headers["content-type"] == "application/problem+json"
                problem = down.json()
                assert problem["status"] == 503
                assert problem["title"]
                assert problem["detail"]
            assert (await http.get("/readyz")).status_code == 503
            assert bridge.alive()

            again = processes.start(*service_args)  # the same port, the same file
            await wait_serving(again, target)
            # The bridge reconnects by itself: no restart, the same process.
            for _ in range(WAIT_TURNS):
                recovered = await http.get("/v1/notes/n1")
                if recovered.status_code == 200:
                    break
                assert recovered.status_code == 503, recovered.text
                await asyncio.sleep(0.1)
            else:
                pytest.fail(f"the bridge never recovered:\n{bridge.log()}")
            assert recovered.headers["etag"] == created.headers["etag"]
            assert recovered.content == b'{"v": 1}'  # the refused PUT above wrote nothing
            updated = await http.put("/v1/notes/n1", content=b'{"v": 3}', headers={
                "If-Match": created.headers["etag"], "Content-Type": "application/json"})
            assert updated.status_code == 200, updated.text
            assert (await http.get("/readyz")).status_code == 200
        assert bridge.alive()
        assert await bridge.terminate() == 0, bridge.log()
        assert await again.terminate() == 0, again.log()
        for process in (bridge, again):
            assert "Traceback" not in process.log(), process.log()


# --- the durability setting ------------------------------------------------------------------


async def synchronous_of(settings: Settings) -> int:
    """The writer connection's PRAGMA synchronous in a service started with `settings`."""
    async with serve(settings) as running:
        store = running.store
        row = await asyncio.get_running_loop().run_in_executor(
            store._thread,  # type: ignore[attr-defined]
            lambda: store._db.execute("PRAGMA synchronous").fetchone())  # type: ignore[attr-defined]
    assert row is not None
    return int(row[0])


@pytest.mark.parametrize(("environ", "flags", "expected"), [
    ({}, {}, 2),  # FULL by default: a reply means the write is on disk
    ({"CASLEDGER_DURABILITY": "normal"}, {}, 1),
    ({}, {"durability": "normal"}, 1),
    ({"CASLEDGER_DURABILITY": "normal"}, {"durability": "full"}, 2),  # a flag wins
])
async def test_the_durability_setting_reaches_the_store(
    tmp_path: Path, environ: Mapping[str, str], flags: Mapping[str, str], expected: int
) -> None:
    settings = Settings.from_env(environ, db=f"sqlite:///{tmp_path / 'l.db'}",
                                 grpc_listen="127.0.0.1:0", no_http=True, **flags)
    assert await synchronous_of(settings) == expected

