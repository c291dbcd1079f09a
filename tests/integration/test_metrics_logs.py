"""Structured access logs: one JSON line per HTTP request (bridge) and per RPC (service), and the
request id the client sent on X-Request-Id in both — the bridge passes it to the service as
``x-request-id`` metadata. Bridge and service run in this process, so one handler hears both."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from casledger.service import logs
from casledger.service.client import call_metadata
from casledger.service.server import RunningServer

JSON = {"Content-Type": "application/json"}


class Lines:
    """The JSON lines the access loggers wrote."""

    def __init__(self, stream: io.StringIO) -> None:
        self.stream = stream

    def all(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.stream.getvalue().splitlines()]

    def http(self, **match: Any) -> list[dict[str, Any]]:
        return self._where(logs.HTTP_ACCESS, match)

    def grpc(self, **match: Any) -> list[dict[str, Any]]:
        return self._where(logs.GRPC_ACCESS, match)

    def _where(self, logger: str, match: dict[str, Any]) -> list[dict[str, Any]]:
        return [line for line in self.all() if line["logger"] == logger
                and all(line.get(key) == value for key, value in match.items())]


@pytest.fixture
def access_lines() -> Iterator[Lines]:
    """Captures what `casledger.access.*` logs, formatted as the JSON lines the CLI writes."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.JSONFormatter())
    logger = logging.getLogger("casledger.access")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield Lines(stream)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


async def test_the_clients_request_id_is_in_the_bridge_and_service_lines(
    bridge: httpx.AsyncClient, access_lines: Lines,
) -> None:
    response = await bridge.put("/v1/documents/a", content=b"{}", headers={
        "If-None-Match": "*", "X-Request-Id": "req-create-1", **JSON})

    assert response.status_code == 201
    assert response.headers["x-request-id"] == "req-create-1"
    [http] = access_lines.http(request_id="req-create-1")
    [service] = access_lines.grpc(request_id="req-create-1")
    assert service["rpc"] == "casledger.v1.Ledger/CreateResource"
    assert service["code"] == "OK"
    assert service["message"] == "casledger.v1.Ledger/CreateResource OK"
    assert http["method"] == "PUT"
    assert http["route"] == "/v1/{name}"
    assert http["path"] == "/v1/documents/a"
    assert http["status"] == 201
    assert http["level"] == "info"
    assert http["message"] == "PUT /v1/documents/a 201"
    for line in (http, service):
        assert isinstance(line["duration_ms"], float | int)
        assert line["time"].endswith("Z")
    assert service["peer"].startswith("ipv4:127.0.0.1:")


async def test_refusals_carry_their_reason(bridge: httpx.AsyncClient,
                                           access_lines: Lines) -> None:
    await bridge.put("/v1/documents/a", content=b"{}", headers={"If-None-Match": "*", **JSON})
    stale = await bridge.put("/v1/documents/a", content=b"{}", headers={
        "If-Match": '"1-0000000000000000"', "X-Request-Id": "stale", **JSON})
    required = await bridge.put("/v1/documents/a", content=b"{}", headers={
        "X-Request-Id": "required", **JSON})

    assert (stale.status_code, required.status_code) == (412, 428)
    [stale_http] = access_lines.http(request_id="stale")
    [stale_rpc] = access_lines.grpc(request_id="stale")
    [required_http] = access_lines.http(request_id="required")
    [required_rpc] = access_lines.grpc(request_id="required")
    assert (stale_http["status"], stale_http["reason"]) == (412, "VERSION_MISMATCH")
    assert (stale_rpc["code"], stale_rpc["reason"]) == ("ABORTED", "VERSION_MISMATCH")
    assert (required_http["status"], required_http["reason"]) == (428, "PRECONDITION_REQUIRED")
    assert (required_rpc["code"], required_rpc["reason"]) == ("FAILED_PRECONDITION",
                                                              "PRECONDITION_REQUIRED")


@pytest.mark.parametrize("sent", [None, "has space", "x" * 129, "caf\u00e9"])
async def test_without_a_usable_request_id_the_bridge_makes_one(
    bridge: httpx.AsyncClient, access_lines: Lines, sent: str | None,
) -> None:
    headers = {} if sent is None else {"X-Request-Id": sent.encode()}

    response = await bridge.get("/v1/documents/a", headers=headers)

    made = response.headers["x-request-id"]
    assert made != sent
    assert logs.valid_request_id(made)
    [http] = access_lines.http(request_id=made)
    [rpc] = access_lines.grpc(request_id=made)
    assert http["status"] == 404
    assert rpc["code"] == "NOT_FOUND"


async def test_the_request_id_joins_the_metadata_already_set(
    server: RunningServer, access_lines: Lines, bridge: httpx.AsyncClient,
) -> None:
    # Metadata set around the request (as the Authorization forwarding does) is kept.
    token = call_metadata.set((("x-other", "kept"),))
    try:
        response = await bridge.get("/v1/documents/a", headers={"X-Request-Id": "joined"})
        after = call_metadata.get()
    finally:
        call_metadata.reset(token)

    assert response.status_code == 404
    assert after == (("x-other", "kept"),)  # the request's id left with the request
    assert len(access_lines.grpc(request_id="joined")) == 1


async def test_a_grpc_caller_without_a_request_id_gets_one_in_the_log(
    client: Any, access_lines: Lines,
) -> None:
    await client.create("documents", b"{}", resource_id="a")
    token = call_metadata.set(((logs.REQUEST_ID_KEY, "from-grpc"),))
    try:
        await client.get("documents/a")
    finally:
        call_metadata.reset(token)

    created, read = access_lines.grpc()
    assert logs.valid_request_id(created["request_id"])
    assert len(created["request_id"]) == 32
    assert read["request_id"] == "from-grpc"


async def test_every_line_is_one_json_object(bridge: httpx.AsyncClient,
                                             access_lines: Lines) -> None:
    await bridge.get("/healthz")
    await bridge.get("/v1/documents/a\u00e9")
    await bridge.get("/metrics")

    raw = access_lines.stream.getvalue().splitlines()
    assert len(raw) >= 3
    assert all(line.isascii() for line in raw)
    parsed = access_lines.all()
    assert all(set(line) >= {"time", "level", "logger", "message", "request_id"}
               for line in parsed)

