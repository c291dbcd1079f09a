"""Prometheus metrics: the bridge's GET /metrics and the service's metrics port move with the
traffic, by status, route template, RPC and code; 412 and 428 are counted by reason, CAS
conflicts by reason, latency in histograms, watchers in gauges. Registries are per app and per
server, and labels never carry a raw path."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from casledger.http_bridge.app import BridgeSettings
from casledger.service.client import LedgerCallError, connect, precondition
from casledger.service.config import Settings
from casledger.service.server import RunningServer, serve
from tests.support.metrics import scraped as metric

JSON = {"Content-Type": "application/json"}


async def until(predicate: Callable[[], Awaitable[bool]]) -> None:
    async with asyncio.timeout(10):
        while not await predicate():  # noqa: ASYNC110 (a scrape has no event)
            await asyncio.sleep(0.005)


# --- the bridge --------------------------------------------------------------------------------


async def conditional_traffic(bridge: httpx.AsyncClient) -> None:
    """201, 200, 304, 412 (a stale If-Match), 428 (no precondition), 404, 200 (an update)."""
    created = await bridge.put("/v1/documents/a", content=b'{"v": 1}',
                               headers={"If-None-Match": "*", **JSON})
    assert created.status_code == 201
    etag = created.headers["etag"]
    assert (await bridge.get("/v1/documents/a")).status_code == 200
    assert (await bridge.get("/v1/documents/a",
                             headers={"If-None-Match": etag})).status_code == 304
    stale = '"1-0000000000000000"'
    assert (await bridge.put("/v1/documents/a", content=b"{}",
                             headers={"If-Match": stale, **JSON})).status_code == 412
    assert (await bridge.put("/v1/documents/a", content=b"{}", headers=JSON)).status_code == 428
    assert (await bridge.get("/v1/documents/zz")).status_code == 404
    assert (await bridge.put("/v1/documents/a", content=b'{"v": 2}',
                             headers={"If-Match": etag, **JSON})).status_code == 200


async def test_bridge_counts_requests_by_method_route_and_status(
    bridge: httpx.AsyncClient,
) -> None:
    await conditional_traffic(bridge)
    response = await bridge.get("/metrics")
    text = response.text

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")

    def requests(method: str, route: str, status: int) -> float:
        return metric(text, "casledger_http_requests_total", method=method, route=route,
                      status=str(status))

    assert requests("PUT", "/v1/{name}", 201) == 1
    assert requests("PUT", "/v1/{name}", 412) == 1
    assert requests("PUT", "/v1/{name}", 428) == 1
    assert requests("PUT", "/v1/{name}", 200) == 1
    assert requests("GET", "/v1/{name}", 200) == 1
    assert requests("GET", "/v1/{name}", 304) == 1
    assert requests("GET", "/v1/{name}", 404) == 1
    # Route templates only: no resource name is ever a label value.
    assert "documents" not in text


async def test_bridge_counts_412_and_428_by_reason(bridge: httpx.AsyncClient) -> None:
    await conditional_traffic(bridge)
    created = await bridge.put("/v1/documents/a", content=b"{}",
                               headers={"If-None-Match": "*", **JSON})  # exists: 412
    text = (await bridge.get("/metrics")).text

    def outcomes(status: int, reason: str) -> float:
        return metric(text, "casledger_http_precondition_outcomes_total", status=str(status),
                      reason=reason)

    assert created.status_code == 412
    assert outcomes(412, "VERSION_MISMATCH") == 1
    assert outcomes(412, "ALREADY_EXISTS") == 1
    assert outcomes(428, "PRECONDITION_REQUIRED") == 1
    assert outcomes(304, "NOT_MODIFIED") == 1


async def test_bridge_latency_histograms(bridge: httpx.AsyncClient) -> None:
    await conditional_traffic(bridge)
    text = (await bridge.get("/metrics")).text

    name = "casledger_http_request_duration_seconds"
    get = {"method": "GET", "route": "/v1/{name}"}
    assert metric(text, f"{name}_count", **get) == 3
    assert metric(text, f"{name}_bucket", **get, le="+Inf") == 3
    assert metric(text, f"{name}_sum", **get) > 0
    assert metric(text, f"{name}_count", method="PUT", route="/v1/{name}") == 4


async def test_bridge_counts_other_routes_by_template(bridge: httpx.AsyncClient) -> None:
    await bridge.post("/v1/documents", content=b"{}", headers=JSON)
    await bridge.get("/v1/documents")
    history = await bridge.get("/v1/documents/x:history")
    await bridge.get("/v1/documents/x:frobnicate")
    await bridge.get("/nothing/here")
    await bridge.request("BREW", "/v1/documents")
    text = (await bridge.get("/metrics")).text

    def requests(method: str, route: str, status: int) -> float:
        return metric(text, "casledger_http_requests_total", method=method, route=route,
                      status=str(status))

    assert requests("POST", "/v1/{collection}", 201) == 1
    assert requests("GET", "/v1/{collection}", 200) == 1
    assert requests("GET", "/v1/{name}:history", history.status_code) == 1
    assert requests("GET", "unmatched", 404) == 2
    assert requests("OTHER", "/v1/{collection}", 405) == 1


async def test_each_bridge_app_has_its_own_registry(
    make_bridge: Any, bridge_settings: BridgeSettings,
    bridge: httpx.AsyncClient,
) -> None:
    async with make_bridge(bridge_settings) as other:
        await bridge.get("/v1/documents/a")
        mine = (await bridge.get("/metrics")).text
        theirs = (await other.get("/metrics")).text

    get = {"method": "GET", "route": "/v1/{name}", "status": "404"}
    assert metric(mine, "casledger_http_requests_total", **get) == 1
    assert metric(theirs, "casledger_http_requests_total", **get) == 0


# --- the service -------------------------------------------------------------------------------


@pytest.fixture
async def measured(settings: Settings) -> AsyncIterator[RunningServer]:
    """A server whose metrics are served on a free loopback port."""
    async with serve(settings.replace(metrics_listen="127.0.0.1:0")) as running:
        yield running


async def scrape(server: RunningServer) -> str:
    assert server.metrics_port is not None
    async with httpx.AsyncClient() as http:
        response = await http.get(f"http://127.0.0.1:{server.metrics_port}/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return response.text


async def refused(call: Awaitable[object]) -> str:
    with pytest.raises(LedgerCallError) as info:
        await call
    return info.value.reason


async def test_service_metrics_port_counts_rpcs_by_code_and_cas_conflicts_by_reason(
    measured: RunningServer,
) -> None:
    async with connect(measured.target) as client:
        created = await client.create("documents", b"{}", resource_id="a")
        await client.get("documents/a")
        assert await refused(client.replace("documents/a", b"{}", precondition=precondition(
            version=9))) == "VERSION_MISMATCH"
        assert await refused(client.replace("documents/a", b"{}", precondition=None)
                             ) == "PRECONDITION_REQUIRED"
        assert await refused(client.create("documents", b"{}", resource_id="a")
                             ) == "ALREADY_EXISTS"
        assert await refused(client.get("documents/zz")) == "NOT_FOUND"
        await client.replace("documents/a", b"[]", precondition=precondition(etag=created.etag))
        await health_pb2_grpc.HealthStub(client.channel).Check(
            health_pb2.HealthCheckRequest(), timeout=5)
    text = await scrape(measured)

    def rpcs(method: str, code: grpc.StatusCode) -> float:
        return metric(text, "casledger_grpc_requests_total",
                      rpc=f"casledger.v1.Ledger/{method}", code=code.name)

    assert rpcs("CreateResource", grpc.StatusCode.OK) == 1
    assert rpcs("CreateResource", grpc.StatusCode.ALREADY_EXISTS) == 1
    assert rpcs("UpdateResource", grpc.StatusCode.ABORTED) == 1
    assert rpcs("UpdateResource", grpc.StatusCode.FAILED_PRECONDITION) == 1
    assert rpcs("UpdateResource", grpc.StatusCode.OK) == 1
    assert rpcs("GetResource", grpc.StatusCode.OK) == 1
    assert rpcs("GetResource", grpc.StatusCode.NOT_FOUND) == 1
    assert metric(text, "casledger_grpc_requests_total", rpc="grpc.health.v1.Health/Check",
                  code="OK") == 1
    for reason in ("VERSION_MISMATCH", "PRECONDITION_REQUIRED", "ALREADY_EXISTS"):
        assert metric(text, "casledger_cas_conflicts_total", reason=reason) == 1
    assert metric(text, "casledger_cas_conflicts_total", reason="NOT_FOUND") == 0
    assert metric(text, "casledger_grpc_request_duration_seconds_count",
                  rpc="casledger.v1.Ledger/UpdateResource") == 3
    assert metric(text, "casledger_grpc_in_flight") == 0


async def test_service_counts_modified_since_conflicts(measured: RunningServer) -> None:
    async with connect(measured.target) as client:
        created = await client.create("documents", b"{}", resource_id="a")
        since = created.update_time.seconds - 1
        request_precondition = precondition(version=1)
        assert request_precondition is not None
        request_precondition.ClearField("version")
        request_precondition.unmodified_since.seconds = since
        assert await refused(client.replace("documents/a", b"{}",
                                            precondition=request_precondition)
                             ) == "MODIFIED_SINCE"

    assert metric(await scrape(measured), "casledger_cas_conflicts_total",
                  reason="MODIFIED_SINCE") == 1


async def test_service_gauges_open_watchers(measured: RunningServer) -> None:
    async with connect(measured.target) as client:
        stream = await client.open_watch("documents")
        await until(lambda: _scraped_equals(measured, "casledger_watchers", 1))
        text = await scrape(measured)
        stream.close()
        await until(lambda: _scraped_equals(measured, "casledger_watchers", 0))

    assert metric(text, "casledger_grpc_watch_streams") == 1
    assert metric(text, "casledger_watchers_too_slow") == 0
    final = await scrape(measured)
    assert metric(final, "casledger_grpc_requests_total", rpc="casledger.v1.Ledger/Watch",
                  code="CANCELLED") == 1
    assert metric(final, "casledger_grpc_watch_streams") == 0


async def _scraped_equals(server: RunningServer, name: str, value: float) -> bool:
    return metric(await scrape(server), name) == value


async def test_service_metrics_are_off_by_default(server: RunningServer) -> None:
    assert server.metrics_port is None
    assert server.metrics is not None  # kept in process all the same


async def test_two_servers_have_their_own_registries(
    measured: RunningServer, settings: Settings, new_ledger: Callable[[str], str],
) -> None:
    other_settings = settings.replace(db=new_ledger("other"), metrics_listen="127.0.0.1:0")
    async with serve(other_settings) as other, connect(other.target) as client:
        await client.create("documents", b"{}", resource_id="a")
        theirs = await scrape(other)
    mine = await scrape(measured)

    created = {"rpc": "casledger.v1.Ledger/CreateResource", "code": "OK"}
    assert metric(theirs, "casledger_grpc_requests_total", **created) == 1
    assert metric(mine, "casledger_grpc_requests_total", **created) == 0
    assert other.metrics_port != measured.metrics_port
