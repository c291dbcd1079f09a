"""The bridge's `/openapi.json`: a valid OpenAPI 3.1 document that describes the app as it is, every
route and method the router serves, every request header the bridge reads, every problem status
the error table can produce (as RFC 9457 problem+json) and every response header it exposes.

Validity is checked against the OpenAPI 3.1 meta-schema (the copy schemathesis ships, run by
jsonschema-rs, which schemathesis also brings), and every Schema Object in it against the JSON
Schema 2020-12 meta-schema, since the OpenAPI meta-schema does not look inside schemas.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import jsonschema_rs
import pytest
from asgi_lifespan import LifespanManager
from schemathesis.specs.openapi.definitions import OPENAPI_31_VALIDATOR
from starlette.routing import Match, Route

from casledger.http_bridge import app as bridge_app
from casledger.http_bridge import errors
from casledger.http_bridge.app import BridgeSettings, create_app
from casledger.http_bridge.openapi import openapi_document
from casledger.service.server import RunningServer

OPERATIONS = ("get", "head", "put", "patch", "delete", "options", "post")
# A concrete request path for every documented path template.
EXAMPLE_PATHS = {
    "/v1/{collection}/{id}": "/v1/documents/a",
    "/v1/{collection}": "/v1/documents",
    "/v1/{collection}/{id}:history": "/v1/documents/a:history",
    "/v1/{collection}:watch": "/v1/documents:watch",
    "/v1:watch": "/v1:watch",
    "/healthz": "/healthz",
    "/readyz": "/readyz",
    "/openapi.json": "/openapi.json",
    "/metrics": "/metrics",
}
# Headers the bridge reads (Content-Type is the request body's media type in OpenAPI).
REQUEST_HEADERS = {*bridge_app.CONDITIONAL_HEADERS, bridge_app.REASON_HEADER, "Idempotency-Key",
                   "Prefer", "Last-Event-ID"}
Doc = dict[str, Any]


@asynccontextmanager
async def open_bridge(settings: BridgeSettings) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings)
    async with LifespanManager(app) as manager, httpx.AsyncClient(
        transport=httpx.ASGITransport(app=manager.app), base_url="http://bridge.test"
    ) as http:
        yield http


@pytest.fixture
async def bridge(server: RunningServer) -> AsyncIterator[httpx.AsyncClient]:
    async with open_bridge(BridgeSettings(target=server.target)) as http:
        yield http


@pytest.fixture
async def served(bridge: httpx.AsyncClient) -> Doc:
    response = await bridge.get("/openapi.json")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    document: Doc = response.json()
    return document


def deref(doc: Doc, node: Any) -> Any:
    """`node`, following `$ref`s to local components."""
    while isinstance(node, dict) and "$ref" in node:
        target = doc
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        node = target
    return node


def operations(doc: Doc) -> Iterator[tuple[str, str, Doc]]:
    for path, item in doc["paths"].items():
        for method in OPERATIONS:
            if method in item:
                yield path, method, item[method]


def responses(doc: Doc) -> Iterator[tuple[str, str, int, Doc]]:
    for path, method, operation in operations(doc):
        for status, response in operation["responses"].items():
            yield path, method, int(status), deref(doc, response)


def walk(node: Any) -> Iterator[Any]:
    yield node
    children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
    for child in children:
        yield from walk(child)


def schema_objects(doc: Doc) -> Iterator[Doc]:
    yield from doc["components"]["schemas"].values()
    for node in walk(doc["paths"]):
        if isinstance(node, dict) and isinstance(node.get("schema"), dict):
            yield node["schema"]
    for parameter in doc["components"]["parameters"].values():
        yield parameter["schema"]
    for response in doc["components"]["responses"].values():
        for header in response.get("headers", {}).values():
            yield header["schema"]
        for media in response.get("content", {}).values():
            yield media["schema"]


# --- the document ------------------------------------------------------------------------------


async def test_the_served_document_is_the_built_one(served: Doc) -> None:
    assert served == openapi_document()
    assert openapi_document() is openapi_document()  # built once


def test_it_is_valid_openapi_3_1() -> None:
    doc = openapi_document()

    assert doc["openapi"].startswith("3.1.")
    errors_found = [str(error) for error in OPENAPI_31_VALIDATOR.iter_errors(doc)]
    assert not errors_found
    for schema in schema_objects(doc):
        jsonschema_rs.meta.validate(schema)


def test_every_reference_resolves_and_operation_ids_are_unique() -> None:
    doc = openapi_document()

    for node in walk(doc):
        if isinstance(node, dict) and isinstance(node.get("$ref"), str):
            assert node["$ref"].startswith("#/components/")
            deref(doc, node)  # raises KeyError when dangling
    ids = [operation["operationId"] for _, _, operation in operations(doc)]
    assert len(ids) == len(set(ids))
    for node in walk(doc["paths"]):
        if isinstance(node, dict) and "links" in node:
            assert {link["operationId"] for link in node["links"].values()} <= set(ids)


# --- the document against the app --------------------------------------------------------------


def test_every_route_of_the_router_is_documented() -> None:
    doc = openapi_document()
    routes = [route for route in create_app().routes if isinstance(route, Route)]
    assert routes

    for route in routes:
        documented = [path for path in doc["paths"]
                      if route.matches({"type": "http", "path": EXAMPLE_PATHS[path],
                                        "method": "GET"})[0] is Match.FULL]
        assert documented, f"{route.path} is not documented"
        if "{path" not in route.path and route.path != "/v1:watch":
            # A fixed route: exactly the methods the router serves. The /v1 routes route every
            # method and answer 405 to some; the next test holds them to their Allow header.
            (path,) = documented
            methods = {m.upper() for m in OPERATIONS if m in doc["paths"][path]}
            assert methods == set(route.methods or ())


@pytest.mark.parametrize("template", [path for path in EXAMPLE_PATHS if path.startswith("/v1")])
async def test_every_v1_path_documents_exactly_its_allowed_methods(
        bridge: httpx.AsyncClient, template: str) -> None:
    response = await bridge.options(EXAMPLE_PATHS[template])

    assert response.status_code == 204
    allowed = {method.strip() for method in response.headers["allow"].split(",")}
    item = openapi_document()["paths"][template]
    assert {method.upper() for method in OPERATIONS if method in item} == allowed
    if "PATCH" in allowed:
        assert response.headers["accept-patch"] == bridge_app.ACCEPT_PATCH
        content = item["patch"]["requestBody"]["content"]
        assert set(content) == {bridge_app.MERGE_PATCH, bridge_app.JSON_PATCH}


def test_every_request_header_the_bridge_reads_is_documented() -> None:
    doc = openapi_document()
    documented = {deref(doc, p)["name"] for _, _, operation in operations(doc)
                  for p in operation.get("parameters", []) if deref(doc, p)["in"] == "header"}
    for item in doc["paths"].values():
        documented |= {deref(doc, p)["name"] for p in item.get("parameters", [])
                       if deref(doc, p)["in"] == "header"}

    assert documented >= REQUEST_HEADERS
    put = doc["paths"]["/v1/{collection}/{id}"]["put"]
    assert "application/json" in put["requestBody"]["content"]
    assert "application/octet-stream" in put["requestBody"]["content"]


def test_every_problem_status_of_the_error_table_is_documented_as_problem_json() -> None:
    doc = openapi_document()
    by_status: dict[int, list[Doc]] = {}
    for _, _, status, response in responses(doc):
        by_status.setdefault(status, []).append(response)
    table = {status for status, _ in errors.HTTP_STATUS.values()}
    table |= {status for status, _ in errors.CODE_STATUS.values()}
    table.add(errors.UPSTREAM_FAILURE[0])

    assert table <= set(by_status), sorted(table - set(by_status))
    problem = {"$ref": "#/components/schemas/Problem"}
    for status in (s for s in by_status if s >= 400):
        for response in by_status[status]:
            assert set(response["content"]) == {errors.PROBLEM_JSON}
            schema = response["content"][errors.PROBLEM_JSON]["schema"]
            assert schema["allOf"] == [problem, {"properties": {"status": {"const": status}}}]
    for status in errors.RETRYABLE:
        for response in by_status[status]:
            assert response["headers"]["Retry-After"]["required"]


def test_the_412_and_428_semantics_are_documented() -> None:
    doc = openapi_document()
    responses_ = doc["components"]["responses"]
    required = responses_["PreconditionRequired"]
    failed = responses_["PreconditionFailed"]

    assert "If-Match" in required["description"]
    assert "If-None-Match: *" in required["description"]
    assert required["headers"]["Cache-Control"]["required"]
    assert not required["headers"]["ETag"]["required"]
    assert "current" in failed["description"]
    assert set(failed["headers"]) == {"ETag", "X-Request-Id"}
    problem = doc["components"]["schemas"]["Problem"]["properties"]
    assert {"current_etag", "current_version", "required_header", "reason"} <= set(problem)
    for name in ("putResource", "patchResource", "deleteResource"):
        (operation,) = (op for _, _, op in operations(doc) if op["operationId"] == name)
        assert {"412", "428"} <= set(operation["responses"])
        assert "428" in operation["description"]
        assert "412" in operation["description"]


def test_the_bearer_token_is_documented_optional_with_its_401_and_403() -> None:
    doc = openapi_document()

    assert doc["components"]["securitySchemes"]["bearerAuth"] == {
        "type": "http", "scheme": "bearer",
        "description": doc["components"]["securitySchemes"]["bearerAuth"]["description"]}
    # Optional: only a service with access control asks for it.
    assert doc["security"] == [{}, {"bearerAuth": []}]
    for path, method, operation in operations(doc):
        # OPTIONS is answered by the bridge alone (Allow); everything else asks the service.
        if path.startswith("/v1") and method != "options":
            assert {"401", "403"} <= set(operation["responses"]), (path, operation["operationId"])


def test_every_exposed_response_header_is_documented() -> None:
    doc = openapi_document()
    documented = {name for _, _, _, response in responses(doc)
                  for name in response.get("headers", {})}

    assert documented >= set(bridge_app.EXPOSED_HEADERS)
    assert documented >= {"Allow", "Cache-Control"}
