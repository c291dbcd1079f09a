"""Access control through the HTTP bridge: the Authorization header reaches the service, which
decides; 401 with WWW-Authenticate and 403 come back as problem+json; the principal is the actor
in :history; SSE watches are checked like any read."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from starlette.types import Receive, Scope, Send

from casledger.http_bridge.app import BridgeSettings, create_app
from casledger.http_bridge.security import ForwardAuthorization, forwardable
from casledger.service import auth
from casledger.service.client import call_metadata
from casledger.service.config import Settings
from casledger.service.server import RunningServer, serve

from .conftest import BridgeFactory, HTTPServerFactory, ProblemCheck


@dataclass(frozen=True)
class Tokens:
    admin: str
    reader: str
    docs: str  # read, write under documents only


@pytest.fixture
def tokens(tmp_path: Path) -> tuple[Path, Tokens]:
    file = tmp_path / "tokens.toml"
    return file, Tokens(
        admin=auth.create_token(file, principal="root", scopes=["admin"]),
        reader=auth.create_token(file, principal="reader", scopes=["read"]),
        docs=auth.create_token(file, principal="docs", scopes=["read", "write"],
                               prefixes=["documents"]),
    )


@pytest.fixture
async def auth_server(settings: Settings, tokens: tuple[Path, Tokens]
                      ) -> AsyncIterator[RunningServer]:
    async with serve(settings.replace(auth_tokens_file=str(tokens[0]))) as running:
        yield running


@pytest.fixture
async def http(auth_server: RunningServer, make_bridge: BridgeFactory
               ) -> AsyncIterator[httpx.AsyncClient]:
    """A bridge in front of a service with access control."""
    async with make_bridge(BridgeSettings(target=auth_server.target)) as client:
        yield client


@pytest.fixture
def token(tokens: tuple[Path, Tokens]) -> Tokens:
    return tokens[1]


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def seed(http: httpx.AsyncClient, token: Tokens) -> str:
    created = await http.put("/v1/documents/d1", content=b'{"n":1}',
                             headers={"If-None-Match": "*", "Content-Type": "application/json",
                                      **bearer(token.admin)})
    assert created.status_code == 201, created.text
    etag: str = created.headers["etag"]
    return etag


REQUESTS: list[tuple[str, str, dict[str, str], bytes]] = [
    ("GET", "/v1/documents/d1", {}, b""),
    ("HEAD", "/v1/documents/d1", {}, b""),
    ("GET", "/v1/documents", {}, b""),
    ("GET", "/v1/documents/d1:history", {}, b""),
    ("GET", "/v1/documents:watch", {}, b""),
    ("GET", "/v1:watch", {}, b""),
    ("PUT", "/v1/documents/d2", {"If-None-Match": "*"}, b"{}"),
    ("PUT", "/v1/documents/d1", {"If-Match": "*"}, b"{}"),
    ("PATCH", "/v1/documents/d1", {"If-Match": "*",
                                   "Content-Type": "application/merge-patch+json"}, b"{}"),
    ("DELETE", "/v1/documents/d1", {"If-Match": "*"}, b""),
    ("POST", "/v1/documents", {}, b"{}"),
]


@pytest.mark.parametrize(("method", "path", "headers", "body"), REQUESTS,
                         ids=[f"{m} {p}" for m, p, _, _ in REQUESTS])
@pytest.mark.parametrize("authorization", [None, "Bearer cl_unknown", "Basic dXNlcjpwdw==",
                                           "Bearer caf\u00e9", "Bearer " + "x" * 5000])
async def test_without_a_valid_token_401_with_www_authenticate(
        http: httpx.AsyncClient, token: Tokens, problem: ProblemCheck, method: str, path: str,
        headers: dict[str, str], body: bytes, authorization: str | None) -> None:
    await seed(http, token)
    sent = dict(headers)
    if authorization is not None:
        sent["Authorization"] = authorization
    response = await http.request(method, path, headers={
        k: v.encode("utf-8") for k, v in sent.items()}, content=body)
    assert response.status_code == 401, response.text
    assert response.headers["www-authenticate"] == 'Bearer realm="casledger"'
    if method != "HEAD":
        problem(response, 401, "UNAUTHENTICATED")
    # Nothing was written.
    current = await http.get("/v1/documents/d1", headers=bearer(token.admin))
    assert current.status_code == 200
    assert current.json() == {"n": 1}


@pytest.mark.parametrize(("method", "path", "headers", "body"),
                         [r for r in REQUESTS if r[0] not in ("GET", "HEAD")],
                         ids=[f"{m} {p}" for m, p, _, _ in REQUESTS if m not in ("GET", "HEAD")])
async def test_a_read_only_token_gets_403_for_writes(
        http: httpx.AsyncClient, token: Tokens, problem: ProblemCheck, method: str, path: str,
        headers: dict[str, str], body: bytes) -> None:
    await seed(http, token)
    response = await http.request(method, path, headers={**headers, **bearer(token.reader)},
                                  content=body)
    body_json = problem(response, 403, "PERMISSION_DENIED")
    assert "write scope" in body_json["detail"]
    assert "www-authenticate" not in response.headers
    assert (await http.get("/v1/documents/d1", headers=bearer(token.reader))).json() == {"n": 1}


@pytest.mark.parametrize(("method", "path", "headers", "body"), [
    ("GET", "/v1/secrets/s1", {}, b""),
    ("GET", "/v1/secrets", {}, b""),
    ("GET", "/v1/secrets/s1:history", {}, b""),
    ("GET", "/v1/secrets:watch", {}, b""),
    ("GET", "/v1:watch", {}, b""),
    ("PUT", "/v1/secrets/s2", {"If-None-Match": "*"}, b"{}"),
    ("PUT", "/v1/secrets/s1", {"If-Match": "*"}, b"{}"),
    ("DELETE", "/v1/secrets/s1", {"If-Match": "*"}, b""),
    ("POST", "/v1/secrets", {}, b"{}"),
])
async def test_a_prefix_limited_token_gets_403_outside(
        http: httpx.AsyncClient, token: Tokens, problem: ProblemCheck, method: str, path: str,
        headers: dict[str, str], body: bytes) -> None:
    created = await http.put("/v1/secrets/s1", content=b'{"s":1}',
                             headers={"If-None-Match": "*", **bearer(token.admin)})
    assert created.status_code == 201
    response = await http.request(method, path, headers={**headers, **bearer(token.docs)},
                                  content=body)
    body_json = problem(response, 403, "PERMISSION_DENIED")
    assert "limited to documents" in body_json["detail"]
    history = await http.get("/v1/secrets/s1:history", headers=bearer(token.admin))
    assert [v["version"] for v in history.json()["versions"]] == [1]


async def test_the_principal_is_the_actor_in_history(http: httpx.AsyncClient,
                                                     token: Tokens) -> None:
    etag = await seed(http, token)
    updated = await http.put("/v1/documents/d1", content=b'{"n":2}',
                             headers={"If-Match": etag, **bearer(token.docs)})
    assert updated.status_code == 200, updated.text
    history = await http.get("/v1/documents/d1:history", headers=bearer(token.reader))
    assert [(v["version"], v["actor"]) for v in history.json()["versions"]] == [
        (1, "root"), (2, "docs")]


async def test_a_token_may_watch_within_its_prefix(
        http: httpx.AsyncClient, token: Tokens, auth_server: RunningServer,
        http_server: HTTPServerFactory) -> None:
    await seed(http, token)
    app = create_app(BridgeSettings(target=auth_server.target))
    # A real socket: ASGITransport would wait for the endless stream to end.
    async with http_server(app) as url, httpx.AsyncClient(base_url=url, timeout=5) as live:
        async with live.stream("GET", "/v1/documents:watch?start_revision=1",
                               headers=bearer(token.docs)) as response:
            assert response.status_code == 200
            async with asyncio.timeout(10):
                async for line in response.aiter_lines():
                    if line.startswith("data:"):
                        assert json.loads(line[5:])["name"] == "documents/d1"
                        break
        refused = await live.get("/v1/secrets:watch", headers=bearer(token.docs))
        assert refused.status_code == 403


async def test_health_openapi_and_readiness_need_no_token(http: httpx.AsyncClient) -> None:
    assert (await http.get("/healthz")).status_code == 200
    assert (await http.get("/readyz")).status_code == 200
    assert (await http.get("/openapi.json")).status_code == 200


# --- the middleware on its own -----------------------------------------------------------------


@pytest.mark.parametrize(("raw", "forwarded"), [
    (b"Bearer abc", "Bearer abc"),
    (b"  Bearer abc  ", "Bearer abc"),
    (b"", None),
    (b"Bearer caf\xc3\xa9", None),
    (b"Bearer a\x7fb", None),
    (b"Bearer " + b"x" * 5000, None),
])
def test_forwardable(raw: bytes, forwarded: str | None) -> None:
    assert forwardable(raw) == forwarded


async def test_the_middleware_keeps_earlier_metadata_and_restores_it() -> None:
    seen: list[tuple[tuple[str, str], ...]] = []

    async def inner(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(call_metadata.get())

    app = ForwardAuthorization(inner)

    async def receive() -> dict[str, object]:
        raise AssertionError("not read")

    async def send(message: dict[str, object]) -> None:
        raise AssertionError("not sent")

    outer = call_metadata.set((("x-request-id", "r1"),))
    try:
        def scope(headers: list[tuple[bytes, bytes]]) -> Scope:
            return {"type": "http", "headers": headers}

        await app(scope([(b"authorization", b"Bearer t1"), (b"accept", b"*/*")]), receive, send)
        await app(scope([(b"accept", b"*/*")]), receive, send)
        await app({"type": "lifespan"}, receive, send)
        assert call_metadata.get() == (("x-request-id", "r1"),)
    finally:
        call_metadata.reset(outer)
    assert seen == [(("x-request-id", "r1"), ("authorization", "Bearer t1")),
                    (("x-request-id", "r1"),), (("x-request-id", "r1"),)]


async def test_without_access_control_the_bridge_ignores_tokens(
        bridge: httpx.AsyncClient, server: RunningServer) -> None:
    created = await bridge.put("/v1/documents/x", content=b"{}",
                               headers={"If-None-Match": "*", **bearer("cl_anything")})
    assert created.status_code == 201
    history = await bridge.get("/v1/documents/x:history")
    assert [v["actor"] for v in history.json()["versions"]] == ["anonymous"]
