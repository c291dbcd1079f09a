"""CORS: off by default; with `cors_allow_origins` an allowed origin may send the conditional
headers (preflight) and may read the ETag, Location and Accept-Patch of every response, errors
included: a browser app that cannot read the ETag can never send If-Match."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest
from asgi_lifespan import LifespanManager

from casledger.http_bridge.app import BridgeSettings, create_app
from casledger.service.server import RunningServer

ORIGIN = "https://app.example"
FOREIGN = "https://evil.example"
CONDITIONAL = {"if-match", "if-none-match", "if-unmodified-since", "if-modified-since"}
CREATE = {"If-None-Match": "*", "Content-Type": "application/json"}


@asynccontextmanager
async def open_bridge(settings: BridgeSettings) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings)
    async with LifespanManager(app) as manager, httpx.AsyncClient(
        transport=httpx.ASGITransport(app=manager.app), base_url="http://bridge.test"
    ) as http:
        yield http


@pytest.fixture
async def cors(server: RunningServer) -> AsyncIterator[httpx.AsyncClient]:
    """A bridge that allows ORIGIN."""
    settings = BridgeSettings(target=server.target, cors_allow_origins=(ORIGIN,))
    async with open_bridge(settings) as http:
        yield http


@pytest.fixture
async def plain(server: RunningServer) -> AsyncIterator[httpx.AsyncClient]:
    """A bridge with the default settings: no CORS."""
    async with open_bridge(BridgeSettings(target=server.target)) as http:
        yield http


def listed(response: httpx.Response, header: str) -> set[str]:
    return {item.strip().lower() for item in response.headers.get(header, "").split(",")
            if item.strip()}


def preflight(method: str, headers: str, origin: str = ORIGIN) -> dict[str, str]:
    return {"Origin": origin, "Access-Control-Request-Method": method,
            "Access-Control-Request-Headers": headers}


def cors_headers(response: httpx.Response) -> set[str]:
    return {name for name in response.headers if name.lower().startswith("access-control-")}


async def test_a_preflight_for_a_conditional_put_is_allowed(cors: httpx.AsyncClient) -> None:
    response = await cors.options("/v1/documents/a",
                                  headers=preflight("PUT", "if-match, content-type"))

    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == ORIGIN
    assert "PUT" in {m.upper() for m in listed(response, "access-control-allow-methods")}
    allowed = listed(response, "access-control-allow-headers")
    assert allowed >= CONDITIONAL
    assert {"content-type", "idempotency-key", "prefer", "casledger-reason"} <= allowed
    assert int(response.headers["access-control-max-age"]) > 0
    assert "origin" in listed(response, "vary")


@pytest.mark.parametrize(("method", "headers"), [
    ("PATCH", "if-match, content-type"),
    ("PUT", "if-none-match, content-type, idempotency-key"),
    ("PUT", "if-unmodified-since, prefer, casledger-reason"),
    ("DELETE", "if-match"),
    ("POST", "content-type, idempotency-key"),
    ("GET", "if-none-match, if-modified-since"),
])
async def test_every_write_and_its_headers_pass_a_preflight(
        cors: httpx.AsyncClient, method: str, headers: str) -> None:
    response = await cors.options("/v1/documents/a", headers=preflight(method, headers))

    assert response.status_code == 200, response.text
    assert response.headers["access-control-allow-origin"] == ORIGIN


async def test_an_allowed_origin_can_read_the_validators(cors: httpx.AsyncClient) -> None:
    created = await cors.put("/v1/documents/a", content=b"{}", headers={**CREATE, "Origin": ORIGIN})
    response = await cors.get("/v1/documents/a", headers={"Origin": ORIGIN})

    for answer in (created, response):
        assert answer.headers["access-control-allow-origin"] == ORIGIN
        assert {"etag", "location", "accept-patch"} <= listed(
            answer, "access-control-expose-headers")
        assert "origin" in listed(answer, "vary")
    assert response.status_code == 200
    assert response.headers["etag"] == created.headers["etag"]


async def test_an_allowed_origin_can_read_the_current_etag_of_a_412(
        cors: httpx.AsyncClient) -> None:
    created = await cors.put("/v1/documents/a", content=b"{}", headers=CREATE)
    stale = '"1-0000000000000000"'

    response = await cors.put("/v1/documents/a", content=b"{}", headers={
        "Origin": ORIGIN, "If-Match": stale, "Content-Type": "application/json"})

    assert response.status_code == 412
    assert response.headers["etag"] == created.headers["etag"]
    assert response.headers["access-control-allow-origin"] == ORIGIN
    assert "etag" in listed(response, "access-control-expose-headers")


async def test_without_the_setting_no_cors_headers_appear(plain: httpx.AsyncClient) -> None:
    created = await plain.put("/v1/documents/a", content=b"{}",
                              headers={**CREATE, "Origin": ORIGIN})
    read = await plain.get("/v1/documents/a", headers={"Origin": ORIGIN})
    options = await plain.options("/v1/documents/a",
                                  headers=preflight("PUT", "if-match, content-type"))

    assert (created.status_code, read.status_code) == (201, 200)
    # The preflight is an ordinary OPTIONS: the bridge's own answer, without any CORS grant.
    assert options.status_code == 204
    assert "PUT" in options.headers["allow"]
    for response in (created, read, options):
        assert not cors_headers(response), response.headers


async def test_a_foreign_origin_is_not_allowed(cors: httpx.AsyncClient) -> None:
    await cors.put("/v1/documents/a", content=b"{}", headers=CREATE)

    read = await cors.get("/v1/documents/a", headers={"Origin": FOREIGN})
    flight = await cors.options("/v1/documents/a",
                                headers=preflight("PUT", "if-match", origin=FOREIGN))

    assert read.status_code == 200  # the server answers; the browser withholds it from the page
    assert "access-control-allow-origin" not in read.headers
    assert "origin" in listed(read, "vary")
    assert flight.status_code == 400
    assert "access-control-allow-origin" not in flight.headers


async def test_a_header_outside_the_list_fails_the_preflight(cors: httpx.AsyncClient) -> None:
    response = await cors.options("/v1/documents/a", headers=preflight("PUT", "x-unknown"))

    assert response.status_code == 400
