"""Bad input at scale, over gRPC: Hypothesis builds requests of every Ledger method — names with
unicode, `..`, `%2F` and empty segments, random bytes as content, random media types, every kind
of precondition with any value (negative versions, impossible timestamps), merge patches and JSON
Patches pointing anywhere, random request ids and reasons, and request bytes that are no
message at all — and sends them to the real service.

For every call: an error is one of the contract's codes with an ``ErrorInfo`` in the casledger
domain whose reason is known and maps to that code (never UNKNOWN or INTERNAL); nothing hangs (a
deadline on every call: DEADLINE_EXCEEDED fails the test); a refused request wrote nothing, a
successful write wrote exactly one version (the ledger's latest revision, read from the store
itself, before and after). The cases are counted, and the count is asserted.

How it runs: the service lives on pytest-asyncio's event loop, which must keep running while
Hypothesis (synchronous) drives it, so the fuzzing runs in a worker thread with a blocking gRPC
channel of its own. Hypothesis is derandomized and keeps no example database: a CI run is
reproducible, and a failure prints the request that caused it.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import error_details_pb2, status_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from casledger.service.api.casledger.v1 import ledger_pb2 as pb
from casledger.service.api.casledger.v1 import ledger_pb2_grpc as pb_grpc
from casledger.service.client import LedgerClient
from casledger.service.server import RunningServer
from casledger.service.servicer import ERROR_DOMAIN, GRPC_CODES, bounded

DEADLINE_S = 10.0
EXAMPLES = 200  # per method
RAW_EXAMPLES = 200
WATCH_EXAMPLES = 60
MIN_CASES = 1_000
COMMON = settings(deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))

# The contract's error table: every reason the service may send, with its code.
REASON_CODES: dict[str, grpc.StatusCode] = {cls.reason: code for cls, code in GRPC_CODES.items()}
# What bad input may be answered with; UNAVAILABLE, RESOURCE_EXHAUSTED, UNAUTHENTICATED... are
# not about the input, and none of them may happen on a loopback service at rest.
INPUT_CODES = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION,
               grpc.StatusCode.ABORTED, grpc.StatusCode.ALREADY_EXISTS,
               grpc.StatusCode.NOT_FOUND}
WRITES = {"CreateResource", "UpdateResource", "DeleteResource"}
METHODS = {*WRITES, "GetResource", "ListResources", "ListVersions"}
INT64 = st.integers(-(2**63), 2**63 - 1)
INT32 = st.integers(-(2**31), 2**31 - 1)
# Errors quote what they refuse: a quote this long must not break the answer (gRPC trailers
# are limited to a few KiB).
HUGE = "x" * 100_000
PATCHABLE = b'{"a": {"b": 1}, "arr": [1, 2, 3], "n": {"m": 1}, "s": "x"}'

# --- strategies ---------------------------------------------------------------------------------

text = st.text(st.characters(codec="utf-8"), max_size=40)  # protobuf: valid UTF-8
segment = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._~-]{0,8}", fullmatch=True)
hostile_segment = st.sampled_from(["", ".", "..", "%2F", "a%2Fb", "café", "\uff11", "a b",
                                   "-d", ".d", "_d", "d\x00", "d\n", "x" * 129, "ü", "..."])


def mostly(valid: st.SearchStrategy[Any], hostile: st.SearchStrategy[Any]
           ) -> st.SearchStrategy[Any]:
    """`valid` three times in four: a request with one bad field fails on that field, so the
    others must be good most of the time for the checks behind the first to be reached."""
    return st.integers(0, 3).flatmap(lambda k: hostile if k == 0 else valid)


@dataclass
class Seeds:
    """What exists before the fuzzing starts, so generated requests reach the ledger rules."""

    names: list[str]
    collections: list[str]
    etags: list[str]
    patchable: list[str]  # out of the other requests' reach: deletes never get to them


def names(seeds: Seeds, *, collection: bool = False) -> st.SearchStrategy[str]:
    pool = seeds.collections if collection else seeds.names
    pairs = 0 if collection else 1
    hostile = st.one_of(
        st.lists(segment, min_size=1, max_size=18).map("/".join),
        st.lists(st.one_of(segment, hostile_segment), min_size=1, max_size=6).map("/".join),
        st.builds(lambda p, s: f"{p}/{s}", st.sampled_from(pool), hostile_segment),
        text,
        st.just("/".join(["a" * 85] * (6 + pairs))),
        st.sampled_from([HUGE, f"documents/{HUGE}", "/".join(["a"] * 20_001)]),
    )
    return mostly(st.sampled_from(pool), hostile)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False) | text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4),
    max_leaves=12,
)
nasty_json = st.sampled_from([
    b"[" * 10_000 + b"]" * 10_000, b"[" * 513 + b"]" * 513, b"[" * 512 + b"]" * 512,
    b"1e400", b"-1e400", b"1" * 100_000, b"-" + b"9" * 4301, b"NaN", b"Infinity",
    b'{"a": 1, "a": 2}', b'"\xff\xfe"', b'"\\ud800"', b"\xef\xbb\xbf{}", b"", b"{", b"nul",
    b'{"n": 1}', b"[]", b"{}", b"\x00",
    b'{"' + HUGE.encode() + b'": 1, "' + HUGE.encode() + b'": 2}',
])
contents = mostly(json_values.map(lambda v: json.dumps(v).encode()),
                  st.one_of(st.binary(max_size=2048), nasty_json))
content_types = mostly(st.sampled_from(["application/json", "", "text/plain"]), st.one_of(
    st.sampled_from([
    "", "application/json", "text/plain", "application/merge-patch+json", "application/x+json",
    "application/octet-stream", "*/*", "application/*", "application/json; charset=utf-8",
    "application/json;", "bad", "a/b;c", "a/b; c=\"d\"", "text/plain; q=\"\xe9\"", "x" * 300,
    "APPLICATION/JSON",
]), text))
timestamps = st.builds(Timestamp, seconds=INT64, nanos=INT32)


def preconditions(seeds: Seeds) -> st.SearchStrategy[pb.Precondition | None]:
    return mostly(
        st.one_of(
            st.just(pb.Precondition(exists=True)),
            st.builds(lambda v: pb.Precondition(version=v), st.integers(1, 4)),
            st.builds(lambda e: pb.Precondition(etag=e), st.sampled_from(seeds.etags)),
            st.builds(lambda t: pb.Precondition(unmodified_since=t),
                      st.builds(Timestamp, seconds=st.integers(0, 2**33))),
        ),
        st.one_of(
            st.none(),
            st.just(pb.Precondition()),
            st.builds(lambda e: pb.Precondition(etag=e),
                      st.sampled_from(['"1-x"', f'"{HUGE}"', HUGE]) | text),
            st.builds(lambda v: pb.Precondition(version=v), st.one_of(st.integers(-2, 0), INT64)),
            st.just(pb.Precondition(exists=False)),
            st.builds(lambda t: pb.Precondition(unmodified_since=t), timestamps),
        ),
    )


pointers = mostly(st.sampled_from(["", "/", "/a", "/a/b/c", "/-", "/0", "/arr/0", "/arr/99",
                                   "/arr/-", "/n", "/n/m", "/n/m/x", "/arr/01", "/nope"]),
                  st.one_of(st.sampled_from(["/~2", "/~", "a", "/" + "x/" * 600, "/" + HUGE,
                                             HUGE]), text))
json_patch_ops = st.fixed_dictionaries(
    {"op": st.sampled_from(["add", "remove", "replace", "move", "copy", "test", "bogus"]),
     "path": pointers},
    optional={"value": json_values, "from": pointers},
)
patch_documents = mostly(
    st.one_of(st.lists(json_patch_ops, max_size=5).map(lambda ops: json.dumps(ops).encode()),
              json_values.map(lambda v: json.dumps(v).encode())),
    st.one_of(nasty_json, st.binary(max_size=200)),
)
patch_types = mostly(st.sampled_from(["application/merge-patch+json",
                                     "application/json-patch+json",
                                     "APPLICATION/JSON-PATCH+JSON; charset=utf-8"]),
                     st.one_of(st.sampled_from(["application/json", "", "text/plain"]), text))
request_ids = mostly(st.one_of(st.just(""), st.from_regex(r"[A-Za-z0-9_-]{1,20}", fullmatch=True)),
                     st.one_of(text, st.just("k" * 257), st.just(HUGE)))
reasons = mostly(st.one_of(st.just(""), st.just("fuzz")),
                 st.one_of(text, st.just("r" * 1025), st.just("a\x01b"), st.just(HUGE)))
page_tokens = st.one_of(st.just(""), text, st.binary(max_size=40).map(lambda b: b.hex()),
                        st.just(HUGE))


def requests(seeds: Seeds) -> dict[str, st.SearchStrategy[Message]]:
    pre = preconditions(seeds)
    change = mostly(
        st.one_of(
            st.builds(lambda d, t: {"content": pb.ResourceContent(data=d, content_type=t)},
                      contents, content_types),
            st.builds(lambda d, t: {"patch": pb.Patch(document=d, media_type=t)},
                      patch_documents, patch_types),
        ),
        st.just({}),  # neither
    )
    return {
        "GetResource": st.builds(pb.GetResourceRequest, name=names(seeds),
                                 version=st.one_of(st.integers(-2, 5), INT64)),
        "ListResources": st.builds(pb.ListResourcesRequest, parent=names(seeds, collection=True),
                                   page_size=st.one_of(st.integers(-1, 3), INT32),
                                   page_token=page_tokens),
        "ListVersions": st.builds(pb.ListVersionsRequest, name=names(seeds),
                                  page_size=st.one_of(st.integers(-1, 3), INT32),
                                  page_token=page_tokens, include_content=st.booleans()),
        "CreateResource": st.builds(
            pb.CreateResourceRequest, parent=names(seeds, collection=True),
            resource_id=st.one_of(st.just(""), segment, hostile_segment, text),
            content=contents, content_type=content_types, request_id=request_ids,
            reason=reasons),
        "UpdateResource": st.builds(
            lambda name, change, pre, request_id, reason: pb.UpdateResourceRequest(
                name=name, precondition=pre, request_id=request_id, reason=reason, **change),
            names(seeds), change, pre, request_ids, reasons),
        "DeleteResource": st.builds(
            pb.DeleteResourceRequest, name=names(seeds), precondition=pre,
            request_id=request_ids, reason=reasons),
        # Patches that pass every argument check and the precondition, so what they point at
        # is what is judged: into the seeded document, or to nowhere.
        "UpdateResource:patch": st.builds(
            lambda name, ops: pb.UpdateResourceRequest(
                name=name, precondition=pb.Precondition(exists=True),
                patch=pb.Patch(media_type="application/json-patch+json",
                               document=json.dumps(ops).encode())),
            st.sampled_from(seeds.patchable), st.lists(json_patch_ops, min_size=1, max_size=3)),
    }


# --- the oracle ---------------------------------------------------------------------------------


@dataclass
class Report:
    cases: Counter[str] = field(default_factory=Counter)
    outcomes: Counter[str] = field(default_factory=Counter)

    def record(self, method: str, outcome: str) -> None:
        self.cases[method] += 1
        self.outcomes[outcome] += 1


def error_info(error: grpc.RpcError) -> error_details_pb2.ErrorInfo | None:
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            for detail in status_pb2.Status.FromString(value).details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info):
                    return info
    return None


def shown(request: object) -> str:
    text = repr(request)
    return text if len(text) <= 600 else text[:600] + f"... ({len(text)} characters)"


def check_refusal(method: str, request: object, error: grpc.RpcError) -> str:
    """The refusal is a contract error; returns its reason."""
    code = error.code()
    assert code != grpc.StatusCode.DEADLINE_EXCEEDED, f"{method} hung: {shown(request)}"
    assert code in INPUT_CODES, f"{method} -> {code} {error.details()}: {shown(request)}"
    info = error_info(error)
    assert info is not None, f"{method} -> {code} without ErrorInfo: {shown(request)}"
    assert info.domain == ERROR_DOMAIN
    assert REASON_CODES.get(info.reason) == code, (method, info.reason, code, shown(request))
    return str(info.reason)


Revision = Callable[[], int]


class Fuzzer:
    """Sends one request and judges the answer (runs in the worker thread)."""

    def __init__(self, channel: grpc.Channel, revision: Revision, report: Report) -> None:
        self.stub = pb_grpc.LedgerStub(channel)
        self.channel = channel
        self.revision = revision
        self.report = report

    def unary(self, method: str, request: Message | bytes) -> None:
        before = self.revision()
        if isinstance(request, bytes):
            call = self.channel.unary_unary(f"/casledger.v1.Ledger/{method}")
        else:
            call = getattr(self.stub, method)
        try:
            response: Any = call(request, timeout=DEADLINE_S)
        except grpc.RpcError as error:
            reason = check_refusal(method, request, error)
            assert self.revision() == before, (
                f"{method} refused ({reason}) yet wrote: {shown(request)}")
            self.report.record(method, reason)
            return
        after = self.revision()
        if method in WRITES:
            written = pb.Resource.FromString(response) if isinstance(response, bytes) else response
            replay = isinstance(request, Message) and bool(getattr(request, "request_id", ""))
            assert after == before + 1 or (replay and after == before), (method, before, after)
            assert written.revision <= after
        else:
            assert after == before, f"{method} is a read, yet the ledger moved: {shown(request)}"
        self.report.record(method, "OK")

    def watch(self, request: pb.WatchRequest) -> None:
        call = self.stub.Watch(request, timeout=DEADLINE_S)
        try:
            call.initial_metadata()  # sent once the watch is accepted; or the call ended
            if call.done():
                assert call.code() != grpc.StatusCode.OK
                reason = check_refusal("Watch", request, call)
                self.report.record("Watch", reason)
            else:
                self.report.record("Watch", "OK")
        finally:
            call.cancel()


def fuzz_method(fuzzer: Fuzzer, method: str, strategy: st.SearchStrategy[Message]) -> None:
    @given(request=strategy)
    @settings(COMMON, max_examples=EXAMPLES)
    def run(request: Message) -> None:
        fuzzer.unary(method, request)

    run()


def fuzz(target: str, revision: Revision, seeds: Seeds) -> Report:
    report = Report()
    strategies = requests(seeds)
    with grpc.insecure_channel(target) as channel:
        fuzzer = Fuzzer(channel, revision, report)
        for kind, strategy in strategies.items():
            fuzz_method(fuzzer, kind.partition(":")[0], strategy)

        @given(method=st.sampled_from(sorted(METHODS)), data=st.one_of(
            st.binary(max_size=300),
            # A valid request's bytes with some of them flipped: close to parsing, often not.
            st.builds(lambda b, i, x: b[:i] + bytes([x]) + b[i + 1:],
                      st.builds(lambda n: pb.UpdateResourceRequest(
                          name=n, content=pb.ResourceContent(data=b"{}"),
                          precondition=pb.Precondition(version=1)).SerializeToString(),
                          st.sampled_from(seeds.names)),
                      st.integers(0, 30), st.integers(0, 255))))
        @settings(COMMON, max_examples=RAW_EXAMPLES)
        def raw(method: str, data: bytes) -> None:
            fuzzer.unary(method, data)

        raw()

        @given(request=st.builds(pb.WatchRequest, prefix=st.one_of(
            st.just(""), names(seeds), names(seeds, collection=True)),
            start_revision=st.one_of(st.integers(-1, 3), INT64)))
        @settings(COMMON, max_examples=WATCH_EXAMPLES)
        def watch(request: pb.WatchRequest) -> None:
            fuzzer.watch(request)

        watch()
    return report


async def seed(client: LedgerClient) -> Seeds:
    made = [
        await client.create("documents", b'{"a": 1, "arr": [1, 2, 3], "n": {"m": 1}}',
                            resource_id="a"),
        await client.create("documents", b"plain text", resource_id="b",
                            content_type="text/plain"),
        await client.create("projects/p1/notes", b"{}", resource_id="n1"),
        await client.create("documents", b"{}", resource_id="gone"),
    ]
    gone = await client.delete("documents/gone", precondition=pb.Precondition(etag=made[3].etag))
    patchable = [await client.create("patchable", PATCHABLE, resource_id=f"p{i}")
                 for i in range(3)]
    return Seeds(names=[r.name for r in made] + ["documents/never"],
                 collections=["documents", "projects/p1/notes", "projects", "nothing"],
                 etags=[r.etag for r in made] + [gone.etag],
                 patchable=[r.name for r in patchable])


# A failing example holding a 100 KB string is worth printing all the same.
@pytest.mark.filterwarnings("ignore:Generating overly large repr")
async def test_generated_grpc_requests_get_contract_errors_and_bad_ones_write_nothing(
    server: RunningServer, client: LedgerClient, ledger_revision: Revision,
    caplog: pytest.LogCaptureFixture
) -> None:
    seeds = await seed(client)

    report = await asyncio.to_thread(fuzz, server.target, ledger_revision, seeds)

    total = sum(report.cases.values())
    print(f"\ngRPC fuzz: {total} generated requests, 0 server errors, 0 hangs; "
          f"per method {dict(report.cases)}; answers {dict(report.outcomes.most_common())}")
    assert total >= MIN_CASES, report.cases
    assert set(report.cases) == {*METHODS, "Watch"}
    # The generation reached past the argument checks into the ledger rules and the writes.
    for reached in ("OK", "INVALID_NAME", "INVALID_CONTENT", "INVALID_PRECONDITION",
                    "INVALID_PATCH", "NOT_FOUND", "VERSION_MISMATCH", "PRECONDITION_REQUIRED",
                    "UNKNOWN_FIELD", "PATCH_CONFLICT"):
        assert report.outcomes[reached] > 0, (reached, report.outcomes)
    assert set(report.outcomes) - {"OK"} <= set(REASON_CODES)
    # Nor did the service fail behind the answers (a task that died, a handler that raised).
    failures = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not failures, [r.getMessage() for r in failures[:3]]



@pytest.mark.parametrize(("text", "limit", "expected"), [
    ("short", 10, "short"),
    ("x" * 20, 10, "xxxxxxx..."),
    ("é" * 10, 10, "ééé..."),  # never half a character: 7 bytes hold 3 of them
])
def test_quotes_in_errors_are_cut_to_a_byte_limit(text: str, limit: int, expected: str) -> None:
    assert bounded(text, limit) == expected
    assert len(bounded(text, limit).encode()) <= limit
