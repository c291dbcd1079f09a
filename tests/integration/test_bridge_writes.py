"""The bridge's writes against a real service: create, the 428 gate, 412 with the current state,
If-Match lists / weak tags / `*`, If-Unmodified-Since, PATCH in both media types, DELETE, POST,
Idempotency-Key and the Casledger-Reason header. Every refused write is shown to write nothing
(the ledger's revision, read from its SQLite file, does not move)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import httpx
import pytest

from casledger.http_bridge.conditional import format_http_date, parse_http_date

STRONG_ETAG = re.compile(r'"[0-9]+-[0-9a-f]{16}"')
JSON = {"Content-Type": "application/json"}
MERGE = {"Content-Type": "application/merge-patch+json"}
JSON_PATCH = {"Content-Type": "application/json-patch+json"}
ACCEPT_PATCH = "application/merge-patch+json, application/json-patch+json"
DOC = b'{"title": "draft", "tags": ["a"], "n": 1}'

Revision = Callable[[], int]


async def create(bridge: httpx.AsyncClient, name: str = "documents/a",
                 content: bytes = DOC) -> str:
    response = await bridge.put(f"/v1/{name}", content=content,
                                headers={"If-None-Match": "*", **JSON})
    assert response.status_code == 201, response.text
    etag: str = response.headers["etag"]
    return etag


async def put(bridge: httpx.AsyncClient, content: bytes = b'{"n": 2}',
              name: str = "documents/a", **headers: str) -> httpx.Response:
    return await bridge.put(f"/v1/{name}", content=content, headers={**JSON, **headers})


async def versions(bridge: httpx.AsyncClient, name: str = "documents/a") -> list[dict[str, Any]]:
    response = await bridge.get(f"/v1/{name}:history")
    assert response.status_code == 200
    found: list[dict[str, Any]] = response.json()["versions"]
    return found


def assert_current(body: dict[str, Any], response: httpx.Response, etag: str,
                   version: int) -> None:
    assert body["current_etag"] == etag
    assert body["current_version"] == version
    assert response.headers["etag"] == etag


# --- create ------------------------------------------------------------------------------------


async def test_create_with_if_none_match_star(bridge: httpx.AsyncClient) -> None:
    response = await bridge.put("/v1/documents/a", content=DOC,
                                headers={"If-None-Match": "*", **JSON})

    assert response.status_code == 201
    assert response.headers["location"] == "/v1/documents/a"
    assert STRONG_ETAG.fullmatch(response.headers["etag"])
    assert response.headers["etag"].startswith('"1-')
    assert response.headers["content-type"] == "application/json"
    assert "last-modified" in response.headers
    assert response.content == DOC
    got = await bridge.get("/v1/documents/a")
    assert got.content == DOC
    assert got.headers["etag"] == response.headers["etag"]


async def test_create_when_it_exists_is_412_with_the_current_state(
    bridge: httpx.AsyncClient, problem: Any, ledger_revision: Revision
) -> None:
    etag = await create(bridge)
    before = ledger_revision()

    response = await bridge.put("/v1/documents/a", content=b"{}",
                                headers={"If-None-Match": "*", **JSON})

    body = problem(response, 412, "ALREADY_EXISTS")
    assert_current(body, response, etag, 1)
    assert ledger_revision() == before


async def test_create_nested_resource(bridge: httpx.AsyncClient) -> None:
    etag = await create(bridge, "projects/p1/notes/n7")

    response = await bridge.get("/v1/projects/p1/notes/n7")
    assert response.headers["etag"] == etag
    listed = (await bridge.get("/v1/projects/p1/notes")).json()["resources"]
    assert [r["name"] for r in listed] == ["projects/p1/notes/n7"]


async def test_recreate_after_delete_continues_the_numbering(
    bridge: httpx.AsyncClient, problem: Any
) -> None:
    old = await create(bridge)
    assert (await bridge.delete("/v1/documents/a", headers={"If-Match": old})).status_code == 204

    new = await create(bridge, content=b"[]")

    assert new.startswith('"3-')
    # An ETag from before the delete never matches the recreated resource (no ABA).
    problem(await put(bridge, **{"If-Match": old}), 412, "VERSION_MISMATCH")


# --- the 428 gate ------------------------------------------------------------------------------


async def test_put_without_precondition_is_428_teaching_if_match(
    bridge: httpx.AsyncClient, problem: Any, ledger_revision: Revision
) -> None:
    etag = await create(bridge)
    before = ledger_revision()

    response = await put(bridge)

    body = problem(response, 428, "PRECONDITION_REQUIRED")
    assert body["required_header"] == "If-Match"
    assert_current(body, response, etag, 1)
    assert response.headers["cache-control"] == "no-store"
    assert "GET /v1/documents/a" in body["detail"]
    assert f"If-Match: {etag}" in body["detail"]
    assert "If-None-Match" not in body["detail"]
    assert ledger_revision() == before


async def test_put_to_an_absent_resource_without_precondition_is_428_teaching_create(
    bridge: httpx.AsyncClient, problem: Any, ledger_revision: Revision
) -> None:
    before = ledger_revision()

    response = await put(bridge)

    body = problem(response, 428, "PRECONDITION_REQUIRED")
    assert body["required_header"] == "If-None-Match: *"
    assert "If-None-Match: *" in body["detail"]
    assert "current_etag" not in body
    assert "current_version" not in body
    assert "etag" not in response.headers
    assert response.headers["cache-control"] == "no-store"
    assert ledger_revision() == before
    assert (await bridge.get("/v1/documents/a")).status_code == 404


async def test_etag_sent_on_if_none_match_is_428_saying_so(
    bridge: httpx.AsyncClient, problem: Any, ledger_revision: Revision
) -> None:
    etag = await create(bridge)
    before = ledger_revision()

    response = await put(bridge, **{"If-None-Match": etag})

    body = problem(response, 428, "PRECONDITION_REQUIRED")
    assert body["required_header"] == "If-Match"
    assert body["detail"].startswith("You sent an entity-tag in If-None-Match")
    assert "send the ETag you read in If-Match instead" in body["detail"]
    assert_current(body, response, etag, 1)
    assert response.headers["cache-control"] == "no-store"
    assert ledger_revision() == before


@pytest.mark.parametrize("method", ["PUT", "PATCH", "DELETE"])
async def test_every_write_without_precondition_is_428(
    bridge: httpx.AsyncClient, problem: Any, ledger_revision: Revision, method: str
) -> None:
    etag = await create(bridge)
    before = ledger_revision()
    headers = MERGE if method == "PATCH" else JSON
    content = None if method == "DELETE" else b"{}"

    for extra in ({}, {"If-Unmodified-Since": "not a date"},
                  {"If-Unmodified-Since": "Sun, 06 Nov 1994 08:49:37 GMT, later"},
                  {"If-None-Match": '"unrelated"'}, {"If-Match": ""}):
        response = await bridge.request(method, "/v1/documents/a", content=content,
                                        headers={**headers, **extra})
        # Never a 412 to a request that carried no usable precondition.
        body = problem(response, 428, "PRECONDITION_REQUIRED")
        assert body["required_header"] == "If-Match", extra
        assert_current(body, response, etag, 1)
        assert response.headers["cache-control"] == "no-store"
    assert ledger_revision() == before


# --- If-Match ----------------------------------------------------------------------------------


async def test_stale_if_match_is_412_with_the_current_state(
    bridge: httpx.AsyncClient, problem: Any, ledger_revision: Revision
) -> None:
    v1 = await create(bridge)
    v2 = (await put(bridge, **{"If-Match": v1})).headers["etag"]
    before = ledger_revision()

    response = await put(bridge, b'{"n": 3}', **{"If-Match": v1})

    body = problem(response, 412, "VERSION_MISMATCH")
    assert_current(body, response, v2, 2)
    assert ledger_revision() == before


async def test_good_if_match_writes(bridge: httpx.AsyncClient) -> None:
    v1 = await create(bridge)

    response = await put(bridge, b'{"n":  2}', **{"If-Match": v1})

    assert response.status_code == 200
    assert response.content == b'{"n":  2}'
    assert response.headers["content-type"] == "application/json"
    assert STRONG_ETAG.fullmatch(response.headers["etag"])
    assert response.headers["etag"].startswith('"2-')
    assert "last-modified" in response.headers
    got = await bridge.get("/v1/documents/a")
    assert got.content == b'{"n":  2}'
    assert got.headers["etag"] == response.headers["etag"]


async def test_prefer_return_minimal_is_204_with_etag(bridge: httpx.AsyncClient) -> None:
    v1 = await create(bridge)

    response = await put(bridge, **{"If-Match": v1, "Prefer": "return=minimal"})

    assert response.status_code == 204
    assert response.content == b""
    assert response.headers["etag"].startswith('"2-')
    assert response.headers["preference-applied"] == "return=minimal"
    assert (await bridge.get("/v1/documents/a")).headers["etag"] == response.headers["etag"]


async def test_if_match_list_with_the_current_tag_second(bridge: httpx.AsyncClient) -> None:
    v1 = await create(bridge)
    v2 = (await put(bridge, **{"If-Match": v1})).headers["etag"]

    one_line = await put(bridge, b"[3]", **{"If-Match": f"{v1}, {v2}"})
    assert one_line.status_code == 200, one_line.text
    v3 = one_line.headers["etag"]
    two_lines = await bridge.put("/v1/documents/a", content=b"[4]",
                                 headers=[("If-Match", v1), ("If-Match", v3), *JSON.items()])

    assert two_lines.status_code == 200, two_lines.text
    assert (await bridge.get("/v1/documents/a")).content == b"[4]"


async def test_if_match_list_without_the_current_tag_is_412(
    bridge: httpx.AsyncClient, problem: Any, ledger_revision: Revision
) -> None:
    v1 = await create(bridge)
    v2 = (await put(bridge, **{"If-Match": v1})).headers["etag"]
    before = ledger_revision()

    response = await put(bridge, **{"If-Match": f'{v1}, "9-0000000000000000"'})

    assert_current(problem(response, 412, "VERSION_MISMATCH"), response, v2, 2)
    assert ledger_revision() == before


async def test_weak_tag_in_if_match_never_matches(
    bridge: httpx.AsyncClient, problem: Any, ledger_revision: Revision
) -> None:
    v1 = await create(bridge)
    before = ledger_revision()

    response = await put(bridge, **{"If-Match": f"W/{v1}"})

    assert_current(problem(response, 412, "VERSION_MISMATCH"), response, v1, 1)
    assert ledger_revision() == before


async def test_if_match_star(bridge: httpx.AsyncClient, problem: Any,
                             ledger_revision: Revision) -> None:
    absent = await put(bridge, **{"If-Match": "*"})
    body = problem(absent, 412, "VERSION_MISMATCH")
    assert "current_etag" not in body
    assert ledger_revision() == 0

    await create(bridge)
    present = await put(bridge, **{"If-Match": "*"})
    assert present.status_code == 200
    assert present.headers["etag"].startswith('"2-')


async def test_if_match_with_if_none_match_star_is_412(
    bridge: httpx.AsyncClient, problem: Any, ledger_revision: Revision
) -> None:
    v1 = await create(bridge)
    before = ledger_revision()

    response = await put(bridge, **{"If-Match": v1, "If-None-Match": "*"})

    assert_current(problem(response, 412, "VERSION_MISMATCH"), response, v1, 1)
    assert ledger_revision() == before


async def test_malformed_if_match_on_a_write_is_400(
    bridge: httpx.AsyncClient, problem: Any, ledger_revision: Revision
) -> None:
    v1 = await create(bridge)
    before = ledger_revision()

    for value in (v1.strip('"'), f"{v1} {v1}", f'"{v1}'):
        response = await put(bridge, **{"If-Match": value})
        assert problem(response, 400, "MALFORMED_HEADER")["header"] == "If-Match"
    assert ledger_revision() == before


# --- If-Unmodified-Since -----------------------------------------------------------------------


async def test_if_unmodified_since(bridge: httpx.AsyncClient, problem: Any,
                                   ledger_revision: Revision) -> None:
    await create(bridge)
    modified = parse_http_date((await bridge.get("/v1/documents/a")).headers["last-modified"])
    assert modified is not None
    earlier = format_http_date(modified - timedelta(days=1))
    later = format_http_date(modified + timedelta(days=1))
    before = ledger_revision()

    refused = await put(bridge, **{"If-Unmodified-Since": earlier})
    body = problem(refused, 412, "MODIFIED_SINCE")
    etag = (await bridge.get("/v1/documents/a")).headers["etag"]
    assert_current(body, refused, etag, 1)
    assert ledger_revision() == before

    accepted = await put(bridge, **{"If-Unmodified-Since": later})
    assert accepted.status_code == 200, accepted.text
    assert accepted.headers["etag"].startswith('"2-')


async def test_if_match_wins_over_if_unmodified_since(bridge: httpx.AsyncClient) -> None:
    v1 = await create(bridge)

    response = await put(bridge, **{"If-Match": v1,
                                    "If-Unmodified-Since": "Sun, 06 Nov 1994 08:49:37 GMT"})

    assert response.status_code == 200


# --- PATCH -------------------------------------------------------------------------------------


async def test_merge_patch(bridge: httpx.AsyncClient) -> None:
    v1 = await create(bridge)

    response = await bridge.patch("/v1/documents/a", content=b'{"title": "final", "n": null}',
                                  headers={"If-Match": v1, **MERGE})

    assert response.status_code == 200, response.text
    assert json.loads(response.content) == {"title": "final", "tags": ["a"]}
    assert response.headers["content-type"] == "application/json"
    assert response.headers["etag"].startswith('"2-')
    got = await bridge.get("/v1/documents/a")
    assert got.content == response.content
    assert got.headers["etag"] == response.headers["etag"]


async def test_json_patch(bridge: httpx.AsyncClient) -> None:
    v1 = await create(bridge)
    ops = [{"op": "test", "path": "/n", "value": 1}, {"op": "add", "path": "/tags/-",
                                                       "value": "b"},
           {"op": "replace", "path": "/n", "value": 2}]

    response = await bridge.patch("/v1/documents/a", content=json.dumps(ops).encode(),
                                  headers={"If-Match": v1, **JSON_PATCH})

    assert response.status_code == 200, response.text
    assert json.loads(response.content) == {"title": "draft", "tags": ["a", "b"], "n": 2}
    assert response.headers["etag"].startswith('"2-')


async def test_failing_json_patch_test_is_409_and_writes_nothing(
    bridge: httpx.AsyncClient, problem: Any, ledger_revision: Revision
) -> None:
    v1 = await create(bridge)
    before = ledger_revision()
    ops = [{"op": "add", "path": "/x", "value": 1}, {"op": "test", "path": "/n", "value": 9}]

    response = await bridge.patch("/v1/documents/a", content=json.dumps(ops).encode(),
                                  headers={"If-Match": v1, **JSON_PATCH})

    problem(response, 409, "PATCH_CONFLICT")
    assert ledger_revision() == before
    assert [v["version"] for v in await versions(bridge)] == [1]
    got = await bridge.get("/v1/documents/a")
    assert (got.content, got.headers["etag"]) == (DOC, v1)


async def test_json_patch_on_a_missing_path_is_409(
    bridge: httpx.AsyncClient, problem: Any, ledger_revision: Revision
) -> None:
    v1 = await create(bridge)
    before = ledger_revision()

    response = await bridge.patch("/v1/documents/a",
                                  content=b'[{"op": "remove", "path": "/nope"}]',
                                  headers={"If-Match": v1, **JSON_PATCH})

    problem(response, 409, "PATCH_CONFLICT")
    assert ledger_revision() == before


@pytest.mark.parametrize(("headers", "document"), [
    (MERGE, b"{not json"),
    (JSON_PATCH, b'{"op": "add"}'),
    (JSON_PATCH, b'[{"op": "frobnicate", "path": "/n"}]'),
    (JSON_PATCH, b'[{"op": "add", "path": "n", "value": 1}]'),
])
async def test_malformed_patch_is_400(
    bridge: httpx.AsyncClient, problem: Any, ledger_revision: Revision,
    headers: dict[str, str], document: bytes,
) -> None:
    v1 = await create(bridge)
    before = ledger_revision()

    response = await bridge.patch("/v1/documents/a", content=document,
                                  headers={"If-Match": v1, **headers})

    problem(response, 400, "INVALID_PATCH")
    assert ledger_revision() == before


@pytest.mark.parametrize("media_type", ["application/json", "text/plain", None])
async def test_other_patch_media_types_are_415_with_accept_patch(
    bridge: httpx.AsyncClient, problem: Any, ledger_revision: Revision, media_type: str | None
) -> None:
    v1 = await create(bridge)
    before = ledger_revision()
    headers = {"If-Match": v1} | ({"Content-Type": media_type} if media_type else {})

    response = await bridge.patch("/v1/documents/a", content=b"{}", headers=headers)

    problem(response, 415, "UNSUPPORTED_PATCH_TYPE")
    assert response.headers["accept-patch"] == ACCEPT_PATCH
    assert ledger_revision() == before


async def test_patch_media_type_parameters_are_accepted(bridge: httpx.AsyncClient) -> None:
    v1 = await create(bridge)

    response = await bridge.patch(
        "/v1/documents/a", content=b'{"n": 5}',
        headers={"If-Match": v1, "Content-Type": "Application/Merge-Patch+JSON; charset=utf-8"})

    assert response.status_code == 200, response.text
    assert json.loads(response.content)["n"] == 5


async def test_stale_patch_is_412(bridge: httpx.AsyncClient, problem: Any,
                                  ledger_revision: Revision) -> None:
    v1 = await create(bridge)
    v2 = (await put(bridge, **{"If-Match": v1})).headers["etag"]
    before = ledger_revision()

    response = await bridge.patch("/v1/documents/a", content=b'{"n": 9}',
                                  headers={"If-Match": v1, **MERGE})

    assert_current(problem(response, 412, "VERSION_MISMATCH"), response, v2, 2)
    assert ledger_revision() == before


async def test_patch_of_an_absent_resource(bridge: httpx.AsyncClient, problem: Any) -> None:
    required = await bridge.patch("/v1/documents/a", content=b"{}", headers=MERGE)
    body = problem(required, 428, "PRECONDITION_REQUIRED")
    assert body["required_header"] == "If-None-Match: *"

    failed = await bridge.patch("/v1/documents/a", content=b"{}",
                                headers={"If-Match": '"1-0000000000000000"', **MERGE})
    problem(failed, 412, "VERSION_MISMATCH")


# --- DELETE ------------------------------------------------------------------------------------


async def test_delete_with_if_match(bridge: httpx.AsyncClient, problem: Any) -> None:
    v1 = await create(bridge)

    response = await bridge.delete("/v1/documents/a", headers={"If-Match": v1})

    assert response.status_code == 204
    assert response.content == b""
    gone = await bridge.get("/v1/documents/a")
    assert problem(gone, 404, "NOT_FOUND")["deleted_at_version"] == 2
    assert [v["deleted"] for v in await versions(bridge)] == [False, True]


async def test_stale_delete_is_412(bridge: httpx.AsyncClient, problem: Any,
                                   ledger_revision: Revision) -> None:
    v1 = await create(bridge)
    v2 = (await put(bridge, **{"If-Match": v1})).headers["etag"]
    before = ledger_revision()

    response = await bridge.delete("/v1/documents/a", headers={"If-Match": v1})

    assert_current(problem(response, 412, "VERSION_MISMATCH"), response, v2, 2)
    assert ledger_revision() == before


async def test_delete_of_an_absent_resource_is_404(
    bridge: httpx.AsyncClient, problem: Any, ledger_revision: Revision
) -> None:
    problem(await bridge.delete("/v1/documents/a"), 404, "NOT_FOUND")
    problem(await bridge.delete("/v1/documents/a", headers={"If-Match": '"1-0000000000000000"'}),
            404, "NOT_FOUND")
    v1 = await create(bridge)
    assert (await bridge.delete("/v1/documents/a", headers={"If-Match": v1})).status_code == 204
    before = ledger_revision()

    again = await bridge.delete("/v1/documents/a", headers={"If-Match": v1})

    assert problem(again, 404, "NOT_FOUND")["deleted_at_version"] == 2
    assert ledger_revision() == before


# --- POST --------------------------------------------------------------------------------------


async def test_post_creates_with_a_server_generated_id(bridge: httpx.AsyncClient) -> None:
    first = await bridge.post("/v1/documents", content=b'{"k": 1}', headers=JSON)
    second = await bridge.post("/v1/documents", content=b'{"k": 2}', headers=JSON)

    for response, content in ((first, b'{"k": 1}'), (second, b'{"k": 2}')):
        assert response.status_code == 201, response.text
        location = response.headers["location"]
        assert re.fullmatch(r"/v1/documents/[A-Za-z0-9][A-Za-z0-9._~-]*", location)
        assert response.headers["etag"].startswith('"1-')
        assert response.content == content
        got = await bridge.get(location)
        assert got.content == content
        assert got.headers["etag"] == response.headers["etag"]
    assert first.headers["location"] != second.headers["location"]


async def test_post_of_invalid_json_is_400(bridge: httpx.AsyncClient, problem: Any,
                                           ledger_revision: Revision) -> None:
    response = await bridge.post("/v1/documents", content=b"{nope", headers=JSON)

    problem(response, 400, "INVALID_CONTENT")
    assert ledger_revision() == 0


# --- Idempotency-Key ---------------------------------------------------------------------------


async def test_idempotent_retry_of_an_update_returns_the_first_outcome(
    bridge: httpx.AsyncClient, problem: Any, ledger_revision: Revision
) -> None:
    v1 = await create(bridge)
    headers = {"If-Match": v1, "Idempotency-Key": "k-1"}

    first = await put(bridge, **headers)
    after_first = ledger_revision()
    retry = await put(bridge, **headers)

    assert first.status_code == retry.status_code == 200
    assert retry.headers["etag"] == first.headers["etag"]
    assert retry.content == first.content
    assert ledger_revision() == after_first
    assert [v["version"] for v in await versions(bridge)] == [1, 2]

    reused = await put(bridge, b'{"n": "other"}', **headers)
    problem(reused, 422, "IDEMPOTENCY_KEY_REUSED")
    assert ledger_revision() == after_first


async def test_idempotent_retry_of_a_create_and_a_post(
    bridge: httpx.AsyncClient, ledger_revision: Revision
) -> None:
    create_headers = {"If-None-Match": "*", "Idempotency-Key": "c-1", **JSON}
    created = await bridge.put("/v1/documents/a", content=DOC, headers=create_headers)
    recreated = await bridge.put("/v1/documents/a", content=DOC, headers=create_headers)
    post_headers = {"Idempotency-Key": "p-1", **JSON}
    posted = await bridge.post("/v1/documents", content=DOC, headers=post_headers)
    reposted = await bridge.post("/v1/documents", content=DOC, headers=post_headers)

    assert created.status_code == recreated.status_code == 201
    assert created.headers["etag"] == recreated.headers["etag"]
    assert posted.status_code == reposted.status_code == 201
    assert posted.headers["location"] == reposted.headers["location"]
    assert posted.headers["etag"] == reposted.headers["etag"]
    assert ledger_revision() == 2
    assert len((await bridge.get("/v1/documents")).json()["resources"]) == 2


async def test_idempotent_retry_of_a_patch_and_a_delete(
    bridge: httpx.AsyncClient, problem: Any, ledger_revision: Revision
) -> None:
    v1 = await create(bridge)
    patch_headers = {"If-Match": v1, "Idempotency-Key": "m-1", **MERGE}
    patched = await bridge.patch("/v1/documents/a", content=b'{"n": 7}', headers=patch_headers)
    repatched = await bridge.patch("/v1/documents/a", content=b'{"n": 7}', headers=patch_headers)
    assert patched.status_code == repatched.status_code == 200
    assert patched.headers["etag"] == repatched.headers["etag"]
    v2 = patched.headers["etag"]

    delete_headers = {"If-Match": v2, "Idempotency-Key": "d-1"}
    assert (await bridge.delete("/v1/documents/a", headers=delete_headers)).status_code == 204
    after = ledger_revision()
    assert (await bridge.delete("/v1/documents/a", headers=delete_headers)).status_code == 204
    assert ledger_revision() == after == 3

    other = await bridge.patch("/v1/documents/a", content=b'{"n": 8}', headers=patch_headers)
    problem(other, 422, "IDEMPOTENCY_KEY_REUSED")


# --- Casledger-Reason --------------------------------------------------------------------------


async def test_reason_header_lands_in_the_history(bridge: httpx.AsyncClient) -> None:
    created = await bridge.put("/v1/documents/a", content=DOC, headers={
        "If-None-Match": "*", "Casledger-Reason": "first draft", **JSON})
    v2 = await put(bridge, **{"If-Match": created.headers["etag"],
                              "Casledger-Reason": "r%C3%A9vision %E2%9C%93 100%25"})
    v3 = await bridge.patch("/v1/documents/a", content=b"{}", headers=[
        ("If-Match", v2.headers["etag"]), ("Casledger-Reason", "naïve".encode()),
        *MERGE.items()])
    await bridge.delete("/v1/documents/a", headers={"If-Match": v3.headers["etag"],
                                                    "Casledger-Reason": "cleanup"})

    reasons = [v["reason"] for v in await versions(bridge)]

    assert reasons == ["first draft", "révision ✓ 100%", "naïve", "cleanup"]


async def test_reason_that_is_not_utf8_is_400(bridge: httpx.AsyncClient, problem: Any,
                                              ledger_revision: Revision) -> None:
    v1 = await create(bridge)
    before = ledger_revision()

    for raw in (b"\xff", b"%FF"):
        response = await bridge.put("/v1/documents/a", content=b"{}", headers=[
            ("If-Match", v1), ("Casledger-Reason", raw), *JSON.items()])
        problem(response, 400, "INVALID_HEADER")
    assert ledger_revision() == before
