"""Hand-picked hostile requests to the bridge, served by uvicorn on a real socket so the header and
request-line handling is the real one: huge, repeated and non-ASCII headers; names with `..`,
`%2F`, unicode and empty segments; JSON nested 10,000 deep, huge numbers, invalid UTF-8; JSON
Patch pointers to nowhere. Most are sent as raw bytes on a socket, exactly as written here (an
HTTP client would normalize or refuse them).

Each one is a clear 4xx — a problem+json body with the reason, or, for bytes that are not HTTP
at all, uvicorn's own 400/431 — and writes nothing: the ledger's latest revision, read from the
store itself, is the same before and after, and the target resource is unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

import httpx
import pytest

from casledger.service.api.casledger.v1 import ledger_pb2 as pb
from casledger.service.client import LedgerClient

PROBLEM_JSON = "application/problem+json"
ORIGINAL = b'{"a": {"b": 1}, "arr": [1, 2], "s": "x"}'
READ_TIMEOUT_S = 10.0
T = TypeVar("T")


@dataclass
class RawResponse:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)


async def send_raw(base_url: str, data: bytes) -> RawResponse:
    """Write `data` on a fresh connection and read the one response (the server closes)."""
    url = urlsplit(base_url)
    reader, writer = await asyncio.open_connection(url.hostname, url.port)
    received = b""
    try:
        with contextlib.suppress(ConnectionError):  # it may answer before reading everything
            writer.write(data)
            await writer.drain()
        async with asyncio.timeout(READ_TIMEOUT_S):
            while True:
                try:
                    chunk = await reader.read(65536)
                except ConnectionError:
                    break
                if not chunk:
                    break
                received += chunk
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 "), f"no HTTP response: {received[:200]!r}"
    lines = head.decode("latin-1").split("\r\n")
    headers = [(k.strip(), v.strip()) for k, _, v in (line.partition(":") for line in lines[1:])]
    return RawResponse(int(lines[0].split()[1]), headers, body)


def request(method: str, target: bytes | str, *headers: bytes | str, body: bytes = b"") -> bytes:
    """An HTTP/1.1 request as raw bytes (str parts are encoded as UTF-8)."""

    def raw(part: bytes | str) -> bytes:
        return part.encode() if isinstance(part, str) else part

    lines = [raw(method) + b" " + raw(target) + b" HTTP/1.1", b"Host: bridge.test",
             b"Connection: close", *(raw(h) for h in headers)]
    if body or method in ("PUT", "POST", "PATCH"):
        lines.append(b"Content-Length: " + str(len(body)).encode())
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def judge(response: RawResponse | httpx.Response, status: int | None = None,
          reason: str | None = None) -> None:
    """A 4xx; a problem+json body with `status`/`reason` when given; else uvicorn's own 400/431
    for bytes that never reached the app."""
    if isinstance(response, httpx.Response):
        code, content_type, body = (response.status_code, response.headers.get("content-type"),
                                    response.content)
    else:
        code, content_type, body = response.status, response.header("content-type"), response.body
    assert 400 <= code < 500, (code, body[:300])
    if content_type != PROBLEM_JSON:
        assert status is None, f"expected a {status} problem, got {code} {body[:300]!r}"
        assert code in (400, 431), (code, body[:300])  # uvicorn's answer to non-HTTP
        return
    problem: dict[str, Any] = json.loads(body)
    assert problem["status"] == code
    assert problem["title"]
    assert problem["detail"]
    assert problem["type"].startswith("https://casledger.dev/problems/")
    if status is not None:
        assert code == status, (code, problem)
    if reason is not None:
        assert problem["reason"] == reason, problem


async def each(cases: Mapping[str, T], check: Callable[[T], Awaitable[None]]) -> None:
    """Run `check` on every case (one server for all: each costs a request, not a server);
    fail listing every case that failed, not only the first."""
    failures = []
    for case_id, case in cases.items():
        try:
            await check(case)
        except AssertionError as exc:
            failures.append(f"[{case_id}] {exc}")
    assert not failures, "\n".join(failures)


@pytest.fixture
async def target(client: LedgerClient) -> pb.Resource:
    """documents/d at version 1: what the hostile writes aim at."""
    return await client.create("documents", ORIGINAL, resource_id="d")


Unchanged = Callable[[], Any]


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def logged_errors(live_bridge: httpx.AsyncClient) -> Iterator[list[logging.LogRecord]]:
    """Errors logged meanwhile, uvicorn's ("Exception in ASGI application") included: a refusal
    the client sees as a clean 4xx may still have been an unhandled exception in the app."""
    handler = Collect()
    # After live_bridge: uvicorn's logging configuration resets its loggers' handlers.
    loggers = [logging.getLogger("uvicorn.error"), logging.getLogger()]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        yield handler.records
    finally:
        for logger in loggers:
            logger.removeHandler(handler)


@pytest.fixture
def unchanged(client: LedgerClient, target: pb.Resource, ledger_revision: Callable[[], int],
              logged_errors: list[logging.LogRecord]) -> Callable[[], Any]:
    """`await unchanged()`: nothing was written since `target` (revision and content), and
    nothing failed behind the answers."""
    revision = ledger_revision()

    async def check() -> None:
        failures = [r.getMessage() for r in logged_errors]
        logged_errors.clear()
        assert not failures, failures
        assert ledger_revision() == revision, "a refused request wrote to the ledger"
        current = await client.get(target.name)
        assert (current.version, current.content) == (1, ORIGINAL)

    return check


JSON_TYPE = "Content-Type: application/json"
CREATE = "If-None-Match: *"


# --- headers -----------------------------------------------------------------------------------


async def test_a_100_kb_if_match_is_refused(live_bridge: httpx.AsyncClient, target: pb.Resource,
                                            unchanged: Unchanged) -> None:
    base = str(live_bridge.base_url)
    huge = '"' + "x" * 100_000 + '"'
    judge(await send_raw(base, request("PUT", "/v1/documents/d", f"If-Match: {huge}", JSON_TYPE,
                                       body=b"{}")), 412, "VERSION_MISMATCH")
    # A list of 10,000 entity-tags, none of them the current one.
    many = ", ".join(f'"{i}-{i:016x}"' for i in range(10_000))
    judge(await send_raw(base, request("PUT", "/v1/documents/d", f"If-Match: {many}", JSON_TYPE,
                                       body=b"{}")), 412, "VERSION_MISMATCH")
    await unchanged()


async def test_if_match_repeated_200_times_is_refused(live_bridge: httpx.AsyncClient,
                                                      target: pb.Resource,
                                                      unchanged: Unchanged) -> None:
    lines = [f'If-Match: "{i}-{i:016x}"' for i in range(200)]
    response = await send_raw(str(live_bridge.base_url),
                              request("PUT", "/v1/documents/d", *lines, JSON_TYPE, body=b"{}"))
    judge(response, 412, "VERSION_MISMATCH")
    # The same through httpx, the real ETag among 200 stale ones: the write is allowed (RFC 9110
    # lists), which shows the repeated lines are all read, not only the first.
    stale = [("If-Match", f'"{i}-{i:016x}"') for i in range(199)]
    allowed = await live_bridge.put("/v1/documents/d", content=b'{"n": 2}', headers=[
        *stale, ("If-Match", target.etag), ("Content-Type", "application/json")])
    assert allowed.status_code == 200, allowed.text


HEADERS = {
    "if-match-ff": b'If-Match: "\xff\xfe"',
    "if-match-utf8": b"If-Match: \xc3\xa9",
    "ius-ff": b"If-Unmodified-Since: \xff",
    "reason-not-utf8": b"Casledger-Reason: \xff\xfe not utf-8",
    "content-type-ff": b"Content-Type: application/\xffjson",
    "idempotency-key-snowman": b"Idempotency-Key: \xe2\x98\x83",
    "header-name-ff": b"X-\xff: 1",
    "nul": b'If-Match: "1-a"\x00',
    "obs-fold": b'If-Match: "1-a"\r\n bad continuation',
    "no-colon": b"No colon here",
}


async def test_non_ascii_and_malformed_header_bytes_are_refused(
    live_bridge: httpx.AsyncClient, target: pb.Resource, unchanged: Unchanged
) -> None:
    base = str(live_bridge.base_url)

    async def check(header: bytes) -> None:
        # An update of d (which a stray precondition could let through) and a create of d2.
        judge(await send_raw(base, request("PUT", "/v1/documents/d", header, JSON_TYPE,
                                           body=b'{"n": 2}')))
        if b"If-" not in header:
            judge(await send_raw(base, request("PUT", "/v1/documents/d2", header, CREATE,
                                               JSON_TYPE, body=b'{"n": 2}')))
        await unchanged()

    await each(HEADERS, check)


async def test_a_100_kb_media_type_is_refused(live_bridge: httpx.AsyncClient,
                                              target: pb.Resource,
                                              unchanged: Unchanged) -> None:
    huge = "application/" + "x" * 100_000
    judge(await send_raw(str(live_bridge.base_url), request(
        "PUT", "/v1/documents/d2", CREATE, f"Content-Type: {huge}", body=b"{}")),
        400, "INVALID_CONTENT")
    judge(await send_raw(str(live_bridge.base_url), request(
        "PATCH", "/v1/documents/d", f"If-Match: {target.etag}", f"Content-Type: {huge}",
        body=b"{}")), 415, "UNSUPPORTED_PATCH_TYPE")
    await unchanged()


async def test_ten_thousand_headers_are_refused(live_bridge: httpx.AsyncClient,
                                                target: pb.Resource,
                                                unchanged: Unchanged) -> None:
    lines = [f"X-Junk-{i}: {'y' * 20}" for i in range(10_000)]
    judge(await send_raw(str(live_bridge.base_url),
                         request("PUT", "/v1/documents/d", *lines, JSON_TYPE, body=b"{}")))
    await unchanged()


NOT_HTTP = {
    "not-http": b"GARBAGE\r\n\r\n",
    "http-9.9": b"PUT /v1/documents/d HTTP/9.9\r\nHost: x\r\n\r\n",
    "content-length-abc": b"PUT /v1/documents/d2 HTTP/1.1\r\nHost: x\r\nIf-None-Match: *\r\n"
                          b"Content-Length: abc\r\n\r\n{}",
    "two-content-lengths": b"PUT /v1/documents/d2 HTTP/1.1\r\nHost: x\r\nIf-None-Match: *\r\n"
                           b"Content-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
    "length-and-chunked": b"PUT /v1/documents/d2 HTTP/1.1\r\nHost: x\r\nIf-None-Match: *\r\n"
                          b"Content-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n"
                          b"2\r\n{}\r\n0\r\n\r\n",
    "bad-chunk-size": b"PUT /v1/documents/d2 HTTP/1.1\r\nHost: x\r\nIf-None-Match: *\r\n"
                      b"Transfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
}


async def test_bytes_that_are_not_http_are_refused(live_bridge: httpx.AsyncClient,
                                                   target: pb.Resource,
                                                   unchanged: Unchanged) -> None:
    async def check(data: bytes) -> None:
        judge(await send_raw(str(live_bridge.base_url), data))
        await unchanged()

    await each(NOT_HTTP, check)


# --- names -------------------------------------------------------------------------------------


BAD_PATHS = {
    "dot-dot": b"/v1/documents/..",
    "dot-dot-inside": b"/v1/documents/../documents/d2",
    "dot": b"/v1/documents/./d2",
    "percent-2f": b"/v1/documents/a%2Fb",
    "percent-2f-collection": b"/v1/documents%2Fd2",
    "percent-letters": b"/v1/documents/%64%32",
    "percent-unicode": b"/v1/documents/caf%C3%A9",
    "raw-unicode": "/v1/documents/café".encode(),
    "raw-ff": b"/v1/documents/\xff",
    "empty-segment": b"/v1/documents//d2",
    "empty-first-segment": b"/v1//documents/d2",
    "trailing-slash": b"/v1/documents/d2/",
    "trailing-slashes": b"/v1/documents/d2//",
    "empty-inner": b"/v1/projects//notes/n1",
    "percent-nul": b"/v1/documents/d2%00",
    "long-segment": b"/v1/documents/" + b"x" * 129,
    "18-segments": b"/v1/" + b"/".join([b"a"] * 18),
}


async def test_bad_names_are_refused_and_create_nothing(
    live_bridge: httpx.AsyncClient, target: pb.Resource, unchanged: Unchanged
) -> None:
    base = str(live_bridge.base_url)

    async def check(path: bytes) -> None:
        # A create that would succeed on any name the router accepted; a read and a delete.
        judge(await send_raw(base, request("PUT", path, CREATE, JSON_TYPE, body=b'{"n": 1}')))
        judge(await send_raw(base, request("POST", path, JSON_TYPE, body=b'{"n": 1}')))
        judge(await send_raw(base, request("GET", path)))
        judge(await send_raw(base, request("DELETE", path, f"If-Match: {target.etag}")))
        await unchanged()

    await each(BAD_PATHS, check)


# --- bodies ------------------------------------------------------------------------------------

DEEP = b"[" * 10_000 + b"]" * 10_000
DEEP_OBJECT = b'{"a":' * 10_000 + b"1" + b"}" * 10_000
BAD_JSON = {
    "nested-10000": DEEP,
    "nested-objects-10000": DEEP_OBJECT,
    "1e400": b"1e400",
    "minus-1e400-inside": b'{"x": [-1e400]}',
    "100000-digits": b"1" * 100_000,
    "100000-digits-inside": b'{"n": ' + b"9" * 100_000 + b"}",
    "invalid-utf8": b'{"a": "\xff\xfe"}',
    "overlong-utf8": b'{"a": "\xc0\xaf"}',
    "lone-surrogate": b'{"a": "\\ud800"}',
    "nan": b'{"a": NaN}',
    "duplicate-keys": b'{"a": 1, "a": 2}',
    "trailing-garbage": b'{"a": 1} x',
    "duplicate-100-kb-keys": b'{"' + b"k" * 100_000 + b'": 1, "' + b"k" * 100_000 + b'": 2}',
}


async def test_bad_json_is_invalid_content_and_writes_nothing(
    live_bridge: httpx.AsyncClient, target: pb.Resource, unchanged: Unchanged
) -> None:
    json_type = {"Content-Type": "application/json"}

    async def check(body: bytes) -> None:
        judge(await live_bridge.put("/v1/documents/d2", content=body,
                                    headers={**json_type, "If-None-Match": "*"}),
              400, "INVALID_CONTENT")
        judge(await live_bridge.post("/v1/documents", content=body, headers=json_type),
              400, "INVALID_CONTENT")
        judge(await live_bridge.put("/v1/documents/d", content=body,
                                    headers={**json_type, "If-Match": target.etag}),
              400, "INVALID_CONTENT")
        # The same bytes as a patch document: malformed, whichever patch type.
        for media_type in ("application/merge-patch+json", "application/json-patch+json"):
            judge(await live_bridge.patch("/v1/documents/d", content=body, headers={
                "Content-Type": media_type, "If-Match": target.etag}), 400, "INVALID_PATCH")
        await unchanged()

    await each(BAD_JSON, check)


async def test_a_patch_that_would_nest_deeper_than_allowed_is_refused(
    live_bridge: httpx.AsyncClient, client: LedgerClient, ledger_revision: Callable[[], int]
) -> None:
    # Each document is 302 levels deep, within the limit of 512; the patch would put one at the
    # bottom of the other: the result is judged too, not only the patch document.
    deep = json.loads(b'{"a":' * 300 + b"1" + b"}" * 300)
    created = await client.create("documents", json.dumps(deep).encode(), resource_id="deep")
    revision = ledger_revision()
    patch = [{"op": "add", "path": "/a" * 299 + "/x", "value": deep}]
    response = await live_bridge.patch("/v1/documents/deep", content=json.dumps(patch).encode(),
                                       headers={"Content-Type": "application/json-patch+json",
                                                "If-Match": created.etag})
    judge(response, 400, "INVALID_PATCH")
    assert ledger_revision() == revision


# --- JSON Patch pointers to nowhere ------------------------------------------------------------

NOWHERE = {
    "replace-missing": ([{"op": "replace", "path": "/nope", "value": 1}], 409, "PATCH_CONFLICT"),
    "remove-deep-missing": ([{"op": "remove", "path": "/a/b/c/d"}], 409, "PATCH_CONFLICT"),
    "add-under-missing": ([{"op": "add", "path": "/nope/deeper", "value": 1}], 409,
                          "PATCH_CONFLICT"),
    "add-under-scalar": ([{"op": "add", "path": "/s/x", "value": 1}], 409, "PATCH_CONFLICT"),
    "replace-index-out-of-range": ([{"op": "replace", "path": "/arr/5", "value": 1}], 409,
                                   "PATCH_CONFLICT"),
    "add-index-past-end": ([{"op": "add", "path": "/arr/99", "value": 1}], 409,
                           "PATCH_CONFLICT"),
    "remove-dash": ([{"op": "remove", "path": "/arr/-"}], 409, "PATCH_CONFLICT"),
    "move-from-missing": ([{"op": "move", "from": "/nope", "path": "/x"}], 409,
                          "PATCH_CONFLICT"),
    "copy-from-missing": ([{"op": "copy", "from": "/a/nope", "path": "/x"}], 409,
                          "PATCH_CONFLICT"),
    "move-into-itself": ([{"op": "move", "from": "/a", "path": "/a/b/c"}], 409,
                         "PATCH_CONFLICT"),
    "test-missing": ([{"op": "test", "path": "/nope", "value": None}], 409, "PATCH_CONFLICT"),
    "second-op-missing": ([{"op": "add", "path": "/ok", "value": 1},
                           {"op": "remove", "path": "/nope"}], 409, "PATCH_CONFLICT"),
    "no-leading-slash": ([{"op": "add", "path": "nope", "value": 1}], 400, "INVALID_PATCH"),
    "bad-escape": ([{"op": "add", "path": "/~2", "value": 1}], 400, "INVALID_PATCH"),
    "unknown-op": ([{"op": "frobnicate", "path": "/a"}], 400, "INVALID_PATCH"),
    "missing-value": ([{"op": "add", "path": "/x"}], 400, "INVALID_PATCH"),
    "not-a-list": ({"op": "add", "path": "/x", "value": 1}, 400, "INVALID_PATCH"),
    # The error names the pointer: one of 100 KB must not break the answer.
    "100-kb-pointer-to-nowhere": ([{"op": "remove", "path": "/" + "n" * 100_000}], 409,
                                  "PATCH_CONFLICT"),
    "100-kb-malformed-pointer": ([{"op": "remove", "path": "n" * 100_000}], 400,
                                 "INVALID_PATCH"),
    "100-kb-test-value": ([{"op": "test", "path": "/s", "value": "v" * 100_000}], 409,
                          "PATCH_CONFLICT"),
}


async def test_json_patch_pointers_to_nowhere_write_nothing(
    live_bridge: httpx.AsyncClient, target: pb.Resource, unchanged: Unchanged
) -> None:
    async def check(case: tuple[Any, int, str]) -> None:
        patch, status, reason = case
        response = await live_bridge.patch(
            "/v1/documents/d", content=json.dumps(patch).encode(),
            headers={"Content-Type": "application/json-patch+json", "If-Match": target.etag})
        judge(response, status, reason)
        await unchanged()

    await each(NOWHERE, check)
