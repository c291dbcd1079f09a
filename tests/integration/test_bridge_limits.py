"""The bridge's edges: the body limit (from Content-Length, and while streaming a chunked body),
name rules, OPTIONS and 405, health and readiness, and an unreachable or silent service (503 /
504 with Retry-After). Every error is problem+json and nothing refused is written."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest

from casledger.http_bridge.app import BridgeSettings, create_app
from casledger.service.server import RunningServer

LIMIT = 1024
RESOURCE_METHODS = "GET, HEAD, PUT, PATCH, DELETE, OPTIONS"
COLLECTION_METHODS = "GET, HEAD, POST, OPTIONS"
READ_METHODS = "GET, HEAD, OPTIONS"
ACCEPT_PATCH = "application/merge-patch+json, application/json-patch+json"
ABSENT_ETAG = '"1-0000000000000000"'

Revision = Callable[[], int]


@pytest.fixture
async def small_bridge(make_bridge: Any, server: RunningServer
                       ) -> AsyncIterator[httpx.AsyncClient]:
    """A bridge whose body limit is LIMIT bytes (the service's is the default 1 MiB)."""
    async with make_bridge(BridgeSettings(target=server.target, max_body_bytes=LIMIT)) as http:
        yield http


class Chunks:
    """A request body sent in chunks, recording how much of it the bridge pulled."""

    def __init__(self, *chunks: bytes) -> None:
        self.chunks = chunks
        self.pulled = 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            self.pulled += 1
            yield chunk


def json_of_size(size: int) -> bytes:
    """A JSON string document of exactly `size` bytes."""
    return b'"' + b"x" * (size - 2) + b'"'


# --- the body limit ----------------------------------------------------------------------------


async def test_body_at_the_limit_is_accepted(small_bridge: httpx.AsyncClient) -> None:
    response = await small_bridge.put("/v1/documents/a", content=json_of_size(LIMIT), headers={
        "If-None-Match": "*", "Content-Type": "application/json"})

    assert response.status_code == 201, response.text
    assert response.content == json_of_size(LIMIT)


@pytest.mark.parametrize(("method", "path", "headers"), [
    ("PUT", "/v1/documents/a", {"If-None-Match": "*"}),
    ("PUT", "/v1/documents/a", {"If-Match": ABSENT_ETAG}),
    ("PATCH", "/v1/documents/a", {"If-Match": ABSENT_ETAG,
                                  "Content-Type": "application/merge-patch+json"}),
    ("POST", "/v1/documents", {}),
])
async def test_content_length_over_the_limit_is_413_before_reading(
    small_bridge: httpx.AsyncClient, problem: Any, ledger_revision: Revision,
    method: str, path: str, headers: dict[str, str],
) -> None:
    body = Chunks(json_of_size(LIMIT + 1))

    response = await small_bridge.request(method, path, content=body, headers={
        "Content-Type": "application/json", **headers, "Content-Length": str(LIMIT + 1)})

    problem_body = problem(response, 413, "CONTENT_TOO_LARGE")
    assert problem_body["limit"] == LIMIT
    assert problem_body["size"] == LIMIT + 1
    assert body.pulled == 0  # refused from the header alone
    assert ledger_revision() == 0


async def test_chunked_body_over_the_limit_is_413(
    small_bridge: httpx.AsyncClient, problem: Any, ledger_revision: Revision
) -> None:
    body = Chunks(b'"' + b"x" * 599, b"x" * 600, b'x"', b"never pulled")

    response = await small_bridge.put("/v1/documents/a", content=body, headers={
        "If-None-Match": "*", "Content-Type": "application/json"})

    assert "content-length" not in response.request.headers
    assert response.request.headers["transfer-encoding"] == "chunked"
    problem_body = problem(response, 413, "CONTENT_TOO_LARGE")
    assert problem_body["limit"] == LIMIT
    assert problem_body["size"] == 1200
    assert body.pulled == 2  # stopped as soon as the limit was passed
    assert ledger_revision() == 0
    assert (await small_bridge.get("/v1/documents/a")).status_code == 404


async def test_chunked_body_within_the_limit_is_accepted(small_bridge: httpx.AsyncClient) -> None:
    body = Chunks(b'{"a": ', b"1", b"}")

    response = await small_bridge.put("/v1/documents/a", content=body, headers={
        "If-None-Match": "*", "Content-Type": "application/json"})

    assert response.status_code == 201, response.text
    assert (await small_bridge.get("/v1/documents/a")).content == b'{"a": 1}'


async def test_service_limit_is_413_too(
    make_bridge: Any, small_server: RunningServer, problem: Any
) -> None:
    # The bridge lets 4 KiB through; the service (limit 1 KiB) refuses it.
    settings = BridgeSettings(target=small_server.target, max_body_bytes=4 * LIMIT)
    async with make_bridge(settings) as bridge:
        response = await bridge.put("/v1/documents/a", content=json_of_size(2 * LIMIT), headers={
            "If-None-Match": "*", "Content-Type": "application/json"})

        assert problem(response, 413, "CONTENT_TOO_LARGE")["limit"] == LIMIT
        assert (await bridge.get("/v1/documents/a")).status_code == 404


# --- names -------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", [
    "/v1/documents/a%2Fb",  # an encoded slash
    "/v1/documents%2Fa",
    "/v1/documents/%2E%2E",  # an encoded ..
    "/v1/documents/%C3%A9",  # unicode (httpx percent-encodes it)
    "/v1/documents/é",
    "/v1/documents/-a",  # segment must start alphanumeric
    "/v1/documents/.a",
    "/v1/documents/" + "a" * 129,  # segment too long
    "/v1/a//b/c",  # an empty segment
    "/v1/documents/a b",
])
@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
async def test_invalid_names_are_400(
    bridge: httpx.AsyncClient, problem: Any, ledger_revision: Revision, path: str, method: str
) -> None:
    headers = {"If-None-Match": "*"} if method == "PUT" else {}
    content = b"{}" if method == "PUT" else None

    response = await bridge.request(method, path, content=content, headers=headers)

    problem(response, 400, "INVALID_NAME")
    assert ledger_revision() == 0


@pytest.mark.parametrize("path", ["/v1/documents/", "/v1/documents//", "/v1/a//b"])
@pytest.mark.parametrize(("method", "headers"), [
    ("PUT", {"If-None-Match": "*"}),
    ("PUT", {"If-Match": ABSENT_ETAG}),
    ("POST", {}),
])
async def test_empty_segments_are_400_and_create_nothing(
    bridge: httpx.AsyncClient, problem: Any, ledger_revision: Revision,
    path: str, method: str, headers: dict[str, str],
) -> None:
    response = await bridge.request(method, path, content=b"{}", headers=headers)

    problem(response, 400, "INVALID_NAME")
    assert ledger_revision() == 0


async def test_dot_segments_sent_raw_are_400(
    http_server: Any, bridge_settings: BridgeSettings, ledger_revision: Revision
) -> None:
    # httpx normalizes "..", so this one goes over a real socket as raw bytes.
    async with http_server(create_app(bridge_settings)) as url:
        host, port = url.removeprefix("http://").split(":")
        for target in ("/v1/documents/..", "/v1/documents/.", "/v1/documents/../a",
                       "/v1/../documents/a"):
            reader, writer = await asyncio.open_connection(host, int(port))
            try:
                writer.write(f"PUT {target} HTTP/1.1\r\nHost: x\r\nIf-None-Match: *\r\n"
                             "Content-Length: 2\r\nConnection: close\r\n\r\n{}".encode())
                async with asyncio.timeout(5):
                    raw = await reader.read()
            finally:
                writer.close()
                with contextlib.suppress(ConnectionError):
                    await writer.wait_closed()
            head, _, body = raw.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 400 "), (target, raw)
            assert b"content-type: application/problem+json" in head.lower()
            assert b'"reason":"INVALID_NAME"' in body
    assert ledger_revision() == 0


# --- OPTIONS and 405 ---------------------------------------------------------------------------


async def test_options(bridge: httpx.AsyncClient) -> None:
    resource = await bridge.options("/v1/documents/a")
    collection = await bridge.options("/v1/documents")
    history = await bridge.options("/v1/documents/a:history")

    assert resource.status_code == collection.status_code == history.status_code == 204
    assert resource.headers["allow"] == RESOURCE_METHODS
    assert resource.headers["accept-patch"] == ACCEPT_PATCH
    assert collection.headers["allow"] == COLLECTION_METHODS
    assert "accept-patch" not in collection.headers
    assert history.headers["allow"] == READ_METHODS


@pytest.mark.parametrize(("method", "path", "allow"), [
    ("POST", "/v1/documents/a", RESOURCE_METHODS),
    ("PUT", "/v1/documents", COLLECTION_METHODS),
    ("PATCH", "/v1/documents", COLLECTION_METHODS),
    ("DELETE", "/v1/documents", COLLECTION_METHODS),
    ("PUT", "/v1/documents/a:history", READ_METHODS),
    ("POST", "/v1/documents:watch", READ_METHODS),
    ("DELETE", "/v1:watch", READ_METHODS),
    ("TRACE", "/v1/documents/a", RESOURCE_METHODS),
    ("TRACE", "/v1/documents", COLLECTION_METHODS),
])
async def test_unsupported_method_is_405_with_allow(
    bridge: httpx.AsyncClient, problem: Any, ledger_revision: Revision,
    method: str, path: str, allow: str,
) -> None:
    response = await bridge.request(method, path, content=b"{}", headers={"If-None-Match": "*"})

    problem(response, 405, "METHOD_NOT_ALLOWED")
    assert response.headers["allow"] == allow
    assert ledger_revision() == 0


async def test_unknown_path_is_a_404_problem(bridge: httpx.AsyncClient, problem: Any) -> None:
    problem(await bridge.get("/v2/documents/a"), 404, "NO_ROUTE")


# --- health ------------------------------------------------------------------------------------


async def test_healthz_and_readyz(bridge: httpx.AsyncClient) -> None:
    health = await bridge.get("/healthz")
    ready = await bridge.get("/readyz")

    assert health.status_code == 200
    assert health.json() == {"status": "ok"}
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready"}


async def test_readyz_without_a_service_is_503(
    make_bridge: Any, closed_target: str, problem: Any
) -> None:
    async with make_bridge(BridgeSettings(target=closed_target, call_timeout_s=2)) as bridge:
        health = await bridge.get("/healthz")
        ready = await bridge.get("/readyz")

    assert health.status_code == 200
    problem(ready, 503, "SERVICE_UNAVAILABLE")
    assert ready.headers["retry-after"] == "1"


# --- an unreachable or silent service ----------------------------------------------------------


async def test_unreachable_service_is_503_with_retry_after(
    make_bridge: Any, closed_target: str, problem: Any
) -> None:
    async with make_bridge(BridgeSettings(target=closed_target, call_timeout_s=2)) as bridge:
        responses = [
            await bridge.get("/v1/documents/a"),
            await bridge.head("/v1/documents/a"),
            await bridge.get("/v1/documents"),
            await bridge.get("/v1/documents/a:history"),
            await bridge.put("/v1/documents/a", content=b"{}", headers={"If-None-Match": "*"}),
            await bridge.put("/v1/documents/a", content=b"{}", headers={"If-Match": ABSENT_ETAG}),
            await bridge.patch("/v1/documents/a", content=b"{}", headers={
                "If-Match": ABSENT_ETAG, "Content-Type": "application/merge-patch+json"}),
            await bridge.delete("/v1/documents/a", headers={"If-Match": ABSENT_ETAG}),
            await bridge.post("/v1/documents", content=b"{}"),
            await bridge.get("/v1/documents:watch"),
        ]

    for response in responses:
        assert response.status_code == 503, (response.request.method, response.request.url)
        assert response.headers["retry-after"] == "1"
        if response.request.method != "HEAD":
            problem(response, 503, "UNAVAILABLE")


async def test_silent_service_is_504_with_retry_after(
    make_bridge: Any, silent: str, problem: Any
) -> None:
    async with make_bridge(BridgeSettings(target=silent, call_timeout_s=0.3)) as bridge:
        responses = [
            await bridge.get("/v1/documents/a"),
            await bridge.put("/v1/documents/a", content=b"{}", headers={"If-Match": ABSENT_ETAG}),
            await bridge.put("/v1/documents/a", content=b"{}", headers={"If-None-Match": "*"}),
            await bridge.get("/v1/documents:watch"),
        ]

    for response in responses:
        problem(response, 504, "DEADLINE_EXCEEDED")
        assert response.headers["retry-after"] == "1"


# --- CORS --------------------------------------------------------------------------------------

ORIGIN = "https://app.example"


async def test_cors_is_off_by_default(bridge: httpx.AsyncClient) -> None:
    response = await bridge.get("/healthz", headers={"Origin": ORIGIN})

    assert "access-control-allow-origin" not in response.headers


async def test_cors_exposes_etag_and_allows_conditional_headers(
    make_bridge: Any, server: RunningServer
) -> None:
    settings = BridgeSettings(target=server.target, cors_allow_origins=(ORIGIN,))
    async with make_bridge(settings) as bridge:
        created = await bridge.put("/v1/documents/a", content=b"{}", headers={
            "Origin": ORIGIN, "If-None-Match": "*", "Content-Type": "application/json"})
        preflight = await bridge.options("/v1/documents/a", headers={
            "Origin": ORIGIN, "Access-Control-Request-Method": "PUT",
            "Access-Control-Request-Headers": "if-match, content-type, idempotency-key"})
        foreign = await bridge.options("/v1/documents/a", headers={
            "Origin": "https://evil.example", "Access-Control-Request-Method": "PUT"})

    assert created.status_code == 201
    assert created.headers["access-control-allow-origin"] == ORIGIN
    exposed = {h.strip().lower() for h in
               created.headers["access-control-expose-headers"].split(",")}
    assert {"etag", "location", "accept-patch"} <= exposed
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == ORIGIN
    assert "PUT" in preflight.headers["access-control-allow-methods"]
    allowed = {h.strip().lower() for h in
               preflight.headers["access-control-allow-headers"].split(",")}
    assert {"if-match", "if-none-match", "if-unmodified-since", "content-type",
            "idempotency-key"} <= allowed
    assert foreign.status_code == 400
    assert "access-control-allow-origin" not in foreign.headers
