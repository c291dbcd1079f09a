"""No lost update, checked like Jepsen: a real `casledger serve` (service and bridge), many
read-modify-write clients — half gRPC, half HTTP — incrementing a counter in a few hot resources,
every operation recorded with its invocation and completion; then the ledger's history is held
against what the clients saw, and each resource's history of operations must be linearizable as
a compare-and-swap register (`tests/support/linearizability.py`).

Every client loops a bounded number of times: read the resource (its value n and ETag), then
write {"n": n + 1} under a precondition naming what it read — gRPC by ETag or by version, HTTP by
If-Match on a PUT or a merge PATCH. A refusal (ABORTED / 412, VERSION_MISMATCH) is a CAS that
failed; a timeout or an unavailable service would be indeterminate (it may or may not have been
applied). Each write carries its operation id as its reason, so every version in the ledger names
the operation that wrote it.

The register's value is n. A compare-and-swap on the ETag is one on n as long as each version
holds its own n, which the history check proves (version v holds n = v - 1).
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import grpc
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from casledger.service.client import LedgerCallError, LedgerClient, connect, precondition
from tests.support import linearizability as lin
from tests.support.processes import Processes, free_port, wait_ready

pytestmark = pytest.mark.e2e

KEYS = ("counters/hot0", "counters/hot1", "counters/hot2")
GRPC_CLIENTS = 6
HTTP_CLIENTS = 6
ROUNDS = 50  # read + conditional write, per client
CALL_TIMEOUT_S = 10.0
INDETERMINATE_CODES = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}

Outcome = Literal["ok", "fail", "unknown"]


@dataclass
class Record:
    """One operation as its client saw it."""

    op_id: str
    client: str
    key: str
    kind: Literal["read", "cas"]
    invoke: float
    complete: float
    outcome: Outcome
    n: int  # read: the value seen; cas: the value it expected (it writes n + 1)
    etag: str  # read: the ETag seen; cas: the ETag it wrote on (ok: the new one)
    version: int = 0  # cas, gRPC ok: the version written; read, gRPC: the version seen

    def op(self) -> lin.Op:
        if self.kind == "read":
            return lin.read(self.client, self.invoke, self.complete, self.n, label=self.op_id)
        return lin.cas(self.client, self.invoke, self.complete, self.n, self.n + 1,
                       outcome=self.outcome, label=self.op_id)


@dataclass
class Served:
    grpc_target: str
    base_url: str


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    grpc_port, http_port = free_port(), free_port()
    with Processes(tmp_path) as processes:
        process = processes.start(
            "serve", "--db", f"sqlite:///{tmp_path / 'ledger.db'}",
            "--grpc-listen", f"127.0.0.1:{grpc_port}", "--http-listen", f"127.0.0.1:{http_port}",
            "--shutdown-grace-s", "2", "--log-level", "warning")
        base_url = f"http://127.0.0.1:{http_port}"
        await wait_ready(process, base_url)
        processes.note_children(process)
        yield Served(f"127.0.0.1:{grpc_port}", base_url)
        assert await process.terminate() == 0, process.log()
        assert "Traceback" not in process.log(), process.log()


class Recorder:
    def __init__(self) -> None:
        self.records: list[Record] = []
        self.ids = iter(range(1, 1 << 30))

    def next_id(self, client: str) -> str:
        return f"{client}-op{next(self.ids)}"


def body_n(content: bytes) -> int:
    n = json.loads(content)["n"]
    assert isinstance(n, int)
    return n


async def grpc_client(name: str, ledger: LedgerClient, recorder: Recorder, seed: int,
                      by_version: bool) -> None:
    rng = random.Random(seed)
    for _ in range(ROUNDS):
        key = rng.choice(KEYS)
        op_id = recorder.next_id(name)
        invoke = time.monotonic()
        try:
            current = await ledger.get(key)
        except LedgerCallError as error:
            if error.code in INDETERMINATE_CODES:
                continue  # a read that did not return tells nothing
            raise
        n = body_n(current.content)
        recorder.records.append(Record(op_id, name, key, "read", invoke, time.monotonic(), "ok",
                                       n, current.etag, current.version))
        op_id = recorder.next_id(name)
        pre = (precondition(version=current.version) if by_version
               else precondition(etag=current.etag))
        record = Record(op_id, name, key, "cas", time.monotonic(), 0.0, "ok", n, current.etag)
        try:
            written = await ledger.replace(key, json.dumps({"n": n + 1}).encode(),
                                          precondition=pre, reason=op_id)
        except LedgerCallError as error:
            if error.reason == "VERSION_MISMATCH":
                record.outcome = "fail"
            elif error.code in INDETERMINATE_CODES:
                record.outcome = "unknown"
            else:
                raise
        else:
            record.etag, record.version = written.etag, written.version
        record.complete = time.monotonic()
        recorder.records.append(record)


async def http_client(name: str, http: httpx.AsyncClient, recorder: Recorder, seed: int,
                      patch: bool) -> None:
    rng = random.Random(seed)
    for _ in range(ROUNDS):
        key = rng.choice(KEYS)
        op_id = recorder.next_id(name)
        invoke = time.monotonic()
        try:
            read = await http.get(f"/v1/{key}")
        except httpx.TransportError:
            continue
        if read.status_code in (503, 504):
            continue
        assert read.status_code == 200, read.text
        n = body_n(read.content)
        recorder.records.append(Record(op_id, name, key, "read", invoke, time.monotonic(), "ok",
                                       n, read.headers["etag"]))
        op_id = recorder.next_id(name)
        headers = {"If-Match": read.headers["etag"], "Casledger-Reason": op_id,
                   "Content-Type": "application/merge-patch+json" if patch
                   else "application/json"}
        record = Record(op_id, name, key, "cas", time.monotonic(), 0.0, "ok", n,
                        read.headers["etag"])
        try:
            response = await http.request("PATCH" if patch else "PUT", f"/v1/{key}",
                                          content=json.dumps({"n": n + 1}).encode(),
                                          headers=headers)
        except httpx.TransportError:
            record.outcome = "unknown"
        else:
            if response.status_code == 200:
                record.etag = response.headers["etag"]
                assert body_n(response.content) == n + 1
            elif response.status_code == 412:
                assert response.json()["reason"] == "VERSION_MISMATCH", response.text
                record.outcome = "fail"
            elif response.status_code in (503, 504):
                record.outcome = "unknown"
            else:
                pytest.fail(f"{op_id}: {response.status_code} {response.text}")
        record.complete = time.monotonic()
        recorder.records.append(record)


def read_cache_reads(metrics: str, outcome: str) -> float:
    for family in text_string_to_metric_families(metrics):
        for sample in family.samples:
            if (sample.name == "casledger_http_read_cache_reads_total"
                    and sample.labels == {"outcome": outcome}):
                return float(sample.value)
    return 0.0


def by_client_and_key(records: list[Record]) -> Iterator[list[Record]]:
    grouped: dict[tuple[str, str], list[Record]] = defaultdict(list)
    for record in records:  # appended in each client's program order
        grouped[record.client, record.key].append(record)
    yield from grouped.values()


async def test_concurrent_read_modify_write_loses_no_update(served: Served) -> None:
    recorder = Recorder()
    async with AsyncExitStack() as stack:
        seeder = await stack.enter_async_context(
            connect(served.grpc_target, call_timeout=CALL_TIMEOUT_S))
        for key in KEYS:
            parent, _, resource_id = key.rpartition("/")
            await seeder.create(parent, b'{"n": 0}', resource_id=resource_id, reason="seed")
        clients = []
        for i in range(GRPC_CLIENTS):
            ledger = await stack.enter_async_context(
                connect(served.grpc_target, call_timeout=CALL_TIMEOUT_S))
            clients.append(grpc_client(f"grpc{i}", ledger, recorder, seed=i, by_version=i % 2 == 1))
        for i in range(HTTP_CLIENTS):
            http = await stack.enter_async_context(
                httpx.AsyncClient(base_url=served.base_url, timeout=CALL_TIMEOUT_S))
            clients.append(http_client(f"http{i}", http, recorder, seed=100 + i,
                                       patch=i % 2 == 1))
        await asyncio.gather(*clients)

        histories = {key: [v async for v in seeder.history(key, include_content=True)]
                     for key in KEYS}
        finals = {key: await seeder.get(key) for key in KEYS}
        async with httpx.AsyncClient(base_url=served.base_url) as http:
            metrics = (await http.get("/metrics")).text
    # The HTTP reads went through the bridge's read cache (on by default): read index, watch.
    cache_reads = {outcome: read_cache_reads(metrics, outcome)
                   for outcome in ("hit", "miss", "fallback")}
    assert cache_reads["hit"] > 0, cache_reads

    records = recorder.records
    cas_records = {r.op_id: r for r in records if r.kind == "cas"}
    outcomes = Counter(r.outcome for r in cas_records.values())
    assert outcomes["ok"] > 0
    assert outcomes["fail"] > 0, "no CAS ever failed: the clients did not contend"

    for key, versions in histories.items():
        # The ledger: versions 1..K, version v holds n = v - 1, so an ETag names one n.
        assert [v.version for v in versions] == list(range(1, len(versions) + 1))
        assert [body_n(v.content) for v in versions] == list(range(len(versions)))
        assert not any(v.deleted for v in versions)
        assert versions[0].reason == "seed"
        assert finals[key].version == len(versions)
        etag_version = {v.etag: v.version for v in versions}
        writers = Counter(v.reason for v in versions[1:])
        assert max(writers.values(), default=1) == 1, "an operation was applied twice"
        for v in versions[1:]:
            # Each version was written by one CAS on this key, on top of the version it read.
            record = cas_records.get(v.reason)
            assert record is not None, f"{key} v{v.version}: written by no known operation"
            assert record.key == key
            assert record.outcome != "fail", f"{v.reason} was refused yet written ({key})"
            assert record.n == v.version - 2, (record, v.version)
            if record.outcome == "ok":
                assert record.etag == v.etag
                assert record.version in (0, v.version)
        acked = [r for r in cas_records.values() if r.key == key and r.outcome == "ok"]
        assert {r.op_id for r in acked} <= set(writers), "an acknowledged write is missing"
        applied_unknown = sum(1 for op_id in writers if cas_records[op_id].outcome == "unknown")
        # The final value is the number of acknowledged increments (plus any indeterminate
        # increment that did land, each named in the history).
        assert body_n(finals[key].content) == len(acked) + applied_unknown

        # What each client saw is consistent with that order: every ETag it read is a version
        # of the history holding the n it read, and per client the versions it saw (read or
        # wrote) never go back.
        for record in records:
            if record.key == key and record.kind == "read":
                assert etag_version[record.etag] == record.n + 1, record
    for mine in by_client_and_key(records):
        etags = {v.etag: v.version for v in histories[mine[0].key]}
        seen = [etags[r.etag] for r in mine if r.kind == "read" or r.outcome == "ok"]
        assert seen == sorted(seen), (mine[0].client, mine[0].key, seen)

    results = lin.check_keys(((r.key, r.op()) for r in records), dict.fromkeys(KEYS, 0))
    for name, result in results.items():
        assert result.linearizable, f"{name}: {result.explain()}"
    checked = sum(result.ops for result in results.values())
    assert checked == len(records)
    print(f"\nlinearizability: {checked} operations checked over {len(KEYS)} keys "
          f"({sum(1 for r in records if r.kind == 'read')} reads, {outcomes['ok']} acknowledged "
          f"writes, {outcomes['fail']} refused, {outcomes['unknown']} indeterminate); "
          f"final values {[body_n(finals[k].content) for k in KEYS]}; bridge read cache "
          f"{cache_reads}")
