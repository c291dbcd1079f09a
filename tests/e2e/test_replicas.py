"""Scale-out, end to end: three `casledger serve --no-http` replicas on one PostgreSQL ledger.

Read-modify-write clients spread across the replicas increment JSON counters under
compare-and-swap while one watcher follows the whole ledger on one replica; mid-load one replica
is killed with SIGKILL (its clients fail over to the others, as behind a load balancer). Then:

- no lost update: every counter's versions hold 0, 1, 2, ... (each increment built on the one
  before), every acknowledged increment is in the ledger exactly once, and nothing else is but
  increments whose outcome the killed replica left unknown;
- the watch stream saw every revision 1..R exactly once, in order, with the ledger's own bytes;
- the ledger verifies offline (`casledger verify --db postgresql://...`), and the survivors stop
  cleanly on SIGTERM.
"""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
from collections.abc import AsyncGenerator, Callable, Iterator
from contextlib import AsyncExitStack, aclosing
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import grpc
import pytest

from casledger.service.api.casledger.v1 import ledger_pb2 as pb
from casledger.service.client import LedgerCallError, LedgerClient, connect, precondition
from tests.support import postgres
from tests.support.processes import (
    CASLEDGER,
    Process,
    Processes,
    clean_env,
    free_port,
    wait_serving,
)

pytestmark = pytest.mark.e2e

REPLICAS = 3
CLIENTS = 9
INCREMENTS = 20  # acknowledged increments per client
KEYS = ("counters/c0", "counters/c1", "counters/c2")
KILL_AFTER = 60  # acknowledged increments (all clients) before the kill
INDETERMINATE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}


@pytest.fixture
def ledger_url() -> Iterator[str]:
    if (reason := postgres.unavailable()) is not None:
        pytest.skip(reason)
    with postgres.ledger() as url:
        yield url


@dataclass
class Tally:
    acked: dict[str, list[str]] = field(default_factory=lambda: {k: [] for k in KEYS})
    unknown: set[str] = field(default_factory=set)
    refused: set[str] = field(default_factory=set)
    acked_event: asyncio.Event = field(default_factory=asyncio.Event)
    unknown_at: set[int] = field(default_factory=set)  # replicas that left outcomes unknown

    @property
    def total_acked(self) -> int:
        return sum(len(ops) for ops in self.acked.values())


async def increment_forever(name: str, ledgers: list[LedgerClient], home: int, tally: Tally,
                            dead: set[int], seed: int) -> None:
    """INCREMENTS acknowledged increments, each a read then a CAS write naming its op id as
    the reason; on UNAVAILABLE, the next live replica."""
    rng = random.Random(seed)
    replica, done, op = home, 0, 0
    while done < INCREMENTS:
        if replica in dead:
            replica = next(r for r in range(REPLICAS) if r not in dead)
        ledger, key = ledgers[replica], rng.choice(KEYS)
        op += 1
        op_id = f"{name}-{op}"
        try:
            current = await ledger.get(key)
            n = json.loads(current.content)["n"]
            await ledger.replace(key, json.dumps({"n": n + 1}).encode(),
                                 precondition=precondition(etag=current.etag), reason=op_id)
        except LedgerCallError as error:
            if error.reason == "VERSION_MISMATCH":
                tally.refused.add(op_id)
                await asyncio.sleep(rng.uniform(0, 0.005))
                continue
            if error.code in INDETERMINATE:
                tally.unknown.add(op_id)  # the write may or may not have been applied
                tally.unknown_at.add(replica)
                await asyncio.sleep(0.05)
                continue
            raise
        tally.acked[key].append(op_id)
        tally.acked_event.set()
        done += 1


async def watch_all(ledger: LedgerClient, events: list[pb.Resource], seen: asyncio.Event
                    ) -> None:
    """Follow the whole ledger from revision 1 (until cancelled)."""
    stream = cast(AsyncGenerator[pb.WatchEvent, None], ledger.watch("", 1))
    async with aclosing(stream) as watched:
        async for event in watched:
            events.append(event.resource)
            seen.set()


async def wait_until(condition: Callable[[], bool], event: asyncio.Event) -> None:
    while not condition():
        await event.wait()
        event.clear()


async def test_replicas_lose_no_update_and_watchers_see_every_revision_once(
        ledger_url: str, tmp_path: Path) -> None:
    ports = [free_port() for _ in range(REPLICAS)]
    with Processes(tmp_path) as processes:
        replicas: list[Process] = [
            processes.start("serve", "--no-http", "--db", ledger_url, "--grpc-listen",
                            f"127.0.0.1:{port}", "--shutdown-grace-s", "2", "--log-level",
                            "warning")
            for port in ports]
        targets = [f"127.0.0.1:{port}" for port in ports]
        await asyncio.gather(*(wait_serving(p, t) for p, t in zip(replicas, targets,
                                                                     strict=True)))
        async with AsyncExitStack() as stack:
            ledgers = [await stack.enter_async_context(connect(t, call_timeout=10))
                       for t in targets]
            for key in KEYS:  # created through different replicas
                await ledgers[KEYS.index(key)].create("counters", b'{"n": 0}',
                                                      resource_id=key.split("/")[1])
            watcher = await stack.enter_async_context(connect(targets[0]))
            events: list[pb.Resource] = []
            seen, acked = asyncio.Event(), asyncio.Event()
            watching = asyncio.create_task(watch_all(watcher, events, seen))

            tally, dead = Tally(acked_event=acked), set[int]()
            clients = [asyncio.create_task(increment_forever(
                f"client{i}", ledgers, i % REPLICAS, tally, dead, seed=i))
                for i in range(CLIENTS)]
            async with asyncio.timeout(60):
                await wait_until(lambda: tally.total_acked >= KILL_AFTER, acked)
            replicas[-1].kill()  # mid-load: clients of the last replica are in flight
            dead.add(REPLICAS - 1)
            async with asyncio.timeout(90):
                await asyncio.gather(*clients)

            ledger = ledgers[0]
            finals = {key: await ledger.get(key) for key in KEYS}
            last = max(r.revision for r in finals.values())
            async with asyncio.timeout(30):
                await wait_until(lambda: bool(events) and events[-1].revision >= last, seen)
            watching.cancel()

            revisions = [e.revision for e in events]
            assert revisions == list(range(1, last + 1))  # every revision once, in order
            applied: set[str] = set()
            for key in KEYS:
                history = (await ledger.versions(key, include_content=True)).versions
                values = [json.loads(v.content)["n"] for v in history]
                assert values == list(range(len(history))), key  # no increment was lost
                ops = [v.reason for v in history[1:]]
                assert len(set(ops)) == len(ops), key
                assert set(tally.acked[key]) <= set(ops), key  # every acknowledged one is in
                applied.update(ops)
                assert finals[key].version == len(history)
                # What the watcher was sent is what the ledger holds.
                assert [(e.name, e.version, e.content, e.etag) for e in events
                        if e.name == key] == [(key, v.version, v.content, v.etag)
                                              for v in history]
            acked = {op for ops in tally.acked.values() for op in ops}
            # Nothing refused was applied; all the rest are the unknowns the kill left.
            assert not applied & tally.refused
            assert applied - acked <= tally.unknown
            assert tally.total_acked == CLIENTS * INCREMENTS
            # Only the killed replica failed a call: the others never were unavailable.
            assert tally.unknown_at <= {REPLICAS - 1}

        verified = await asyncio.to_thread(
            subprocess.run, [CASLEDGER or "casledger", "verify", "--db", ledger_url, "--json"],
            capture_output=True, text=True, env=clean_env(), timeout=60)
        report = json.loads(verified.stdout)
        assert (verified.returncode, report["ok"], report["revision"]) == (0, True, last)
        for process in replicas[:-1]:
            assert await process.terminate() == 0, process.log()
            assert "Traceback" not in process.log(), process.log()
