"""The bridge's reads against a real service: GET/HEAD of a resource and of its past versions,
conditional reads (RFC 9110 §13.2.2: 304, 412, malformed entity-tags), tombstones, collection
listings and history, all with exact status codes, headers and problem bodies."""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from typing import Any

import httpx

from casledger.http_bridge.conditional import format_http_date, parse_http_date

STRONG_ETAG = re.compile(r'"[0-9]+-[0-9a-f]{16}"')
IMF_FIXDATE = re.compile(
    r"(Mon|Tue|Wed|Thu|Fri|Sat|Sun), [0-9]{2} [A-Z][a-z]{2} [0-9]{4} [0-9]{2}:[0-9]{2}:[0-9]{2} GMT"
)
RFC3339 = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?Z")
# Odd spacing and key order: the bridge must hand back exactly these bytes.
CONTENT = b'{"b": 1,   "a": [1, 2, {"z": null}]}\n'
MUTABLE = "no-cache"
IMMUTABLE = "public, max-age=31536000, immutable"


async def create(bridge: httpx.AsyncClient, name: str, content: bytes = CONTENT,
                 content_type: str = "application/json") -> httpx.Response:
    response = await bridge.put(f"/v1/{name}", content=content,
                                headers={"If-None-Match": "*", "Content-Type": content_type})
    assert response.status_code == 201, response.text
    return response


async def replace(bridge: httpx.AsyncClient, name: str, content: bytes, etag: str,
                  **headers: str) -> httpx.Response:
    response = await bridge.put(f"/v1/{name}", content=content, headers={
        "If-Match": etag, "Content-Type": "application/json", **headers})
    assert response.status_code == 200, response.text
    return response


async def delete(bridge: httpx.AsyncClient, name: str, etag: str) -> None:
    response = await bridge.delete(f"/v1/{name}", headers={"If-Match": etag})
    assert response.status_code == 204, response.text


# --- GET / HEAD --------------------------------------------------------------------------------


async def test_get_returns_the_stored_bytes_with_validators(bridge: httpx.AsyncClient) -> None:
    created = await create(bridge, "documents/a")

    response = await bridge.get("/v1/documents/a")

    assert response.status_code == 200
    assert response.content == CONTENT
    assert response.headers["content-type"] == "application/json"
    assert response.headers["content-length"] == str(len(CONTENT))
    assert STRONG_ETAG.fullmatch(response.headers["etag"])
    assert response.headers["etag"] == created.headers["etag"]
    assert IMF_FIXDATE.fullmatch(response.headers["last-modified"])
    assert response.headers["last-modified"] == created.headers["last-modified"]
    assert response.headers["cache-control"] == MUTABLE


async def test_get_keeps_any_media_type_and_bytes(bridge: httpx.AsyncClient) -> None:
    blob = bytes(range(256))
    await create(bridge, "blobs/b", blob, "application/octet-stream")

    response = await bridge.get("/v1/blobs/b")

    assert response.status_code == 200
    assert response.content == blob
    assert response.headers["content-type"] == "application/octet-stream"


async def test_head_has_the_headers_of_get_and_no_body(bridge: httpx.AsyncClient) -> None:
    await create(bridge, "documents/a")
    get = await bridge.get("/v1/documents/a")

    head = await bridge.head("/v1/documents/a")

    assert head.status_code == 200
    assert head.content == b""
    assert head.headers["content-length"] == str(len(CONTENT))
    for header in ("etag", "last-modified", "content-type", "cache-control"):
        assert head.headers[header] == get.headers[header], header


async def test_get_of_an_absent_resource_is_404(bridge: httpx.AsyncClient, problem: Any) -> None:
    response = await bridge.get("/v1/documents/nope")

    body = problem(response, 404, "NOT_FOUND")
    assert "deleted_at_version" not in body
    assert "current_etag" not in body
    assert "etag" not in response.headers


async def test_head_of_an_absent_resource_is_404(bridge: httpx.AsyncClient) -> None:
    response = await bridge.head("/v1/documents/nope")

    assert response.status_code == 404
    assert "etag" not in response.headers


# --- past versions -----------------------------------------------------------------------------


async def test_version_query_reads_a_past_version_immutably(bridge: httpx.AsyncClient) -> None:
    v1 = await create(bridge, "documents/a")
    v2 = await replace(bridge, "documents/a", b"[2]", v1.headers["etag"])

    old = await bridge.get("/v1/documents/a", params={"version": 1})
    new = await bridge.get("/v1/documents/a", params={"version": 2})
    current = await bridge.get("/v1/documents/a")

    assert old.status_code == new.status_code == current.status_code == 200
    assert old.content == CONTENT
    assert old.headers["etag"] == v1.headers["etag"]
    assert old.headers["cache-control"] == IMMUTABLE
    assert new.content == current.content == b"[2]"
    assert new.headers["etag"] == current.headers["etag"] == v2.headers["etag"]
    assert new.headers["cache-control"] == IMMUTABLE
    assert current.headers["cache-control"] == MUTABLE


async def test_bad_version_query_is_400(bridge: httpx.AsyncClient, problem: Any) -> None:
    await create(bridge, "documents/a")

    # Unicode digits too: "\uff11" (fullwidth one) and "\u00b2" (superscript two) pass
    # str.isdigit() yet are no HTTP integer.
    # And numbers past int64 (protobuf would refuse them) or past int()'s digit limit.
    for value in ("0", "-1", "abc", "1.5", "", " 1", "+1", "\uff11", "\u00b2",
                  str(2**63), "9" * 5000):
        response = await bridge.get("/v1/documents/a", params={"version": value})
        body = problem(response, 400, "INVALID_ARGUMENT")
        assert body["field"] == "version", value


async def test_absent_version_is_404(bridge: httpx.AsyncClient, problem: Any) -> None:
    await create(bridge, "documents/a")

    problem(await bridge.get("/v1/documents/a", params={"version": 2}), 404, "NOT_FOUND")


async def test_tombstone_version_is_410_and_current_is_404(
    bridge: httpx.AsyncClient, problem: Any
) -> None:
    v1 = await create(bridge, "documents/a")
    await delete(bridge, "documents/a", v1.headers["etag"])

    gone = await bridge.get("/v1/documents/a", params={"version": 2})
    absent = await bridge.get("/v1/documents/a")
    still = await bridge.get("/v1/documents/a", params={"version": 1})

    assert problem(gone, 410, "DELETED")["deleted_at_version"] == 2
    assert problem(absent, 404, "NOT_FOUND")["deleted_at_version"] == 2
    assert still.status_code == 200
    assert still.content == CONTENT


# --- conditional reads -------------------------------------------------------------------------


async def test_if_none_match_with_the_current_etag_is_304(bridge: httpx.AsyncClient) -> None:
    created = await create(bridge, "documents/a")
    etag = created.headers["etag"]

    for value in (etag, f'"other", {etag}', f"W/{etag}", "*"):
        response = await bridge.get("/v1/documents/a", headers={"If-None-Match": value})
        assert response.status_code == 304, value
        assert response.content == b""
        assert response.headers["etag"] == etag
        assert response.headers["last-modified"] == created.headers["last-modified"]
        assert "content-type" not in response.headers


async def test_head_if_none_match_is_304(bridge: httpx.AsyncClient) -> None:
    created = await create(bridge, "documents/a")

    response = await bridge.head("/v1/documents/a",
                                 headers={"If-None-Match": created.headers["etag"]})

    assert response.status_code == 304
    assert response.headers["etag"] == created.headers["etag"]
    assert "content-type" not in response.headers


async def test_if_none_match_with_another_etag_is_200(bridge: httpx.AsyncClient) -> None:
    v1 = await create(bridge, "documents/a")
    await replace(bridge, "documents/a", b"[2]", v1.headers["etag"])

    response = await bridge.get("/v1/documents/a", headers={"If-None-Match": v1.headers["etag"]})

    assert response.status_code == 200
    assert response.content == b"[2]"


async def test_if_modified_since_is_304_when_unchanged(bridge: httpx.AsyncClient) -> None:
    created = await create(bridge, "documents/a")
    modified = created.headers["last-modified"]
    earlier = format_http_date(_date(modified) - timedelta(seconds=1))

    same = await bridge.get("/v1/documents/a", headers={"If-Modified-Since": modified})
    before = await bridge.get("/v1/documents/a", headers={"If-Modified-Since": earlier})
    invalid = await bridge.get("/v1/documents/a", headers={"If-Modified-Since": "yesterday"})

    assert same.status_code == 304
    assert same.headers["etag"] == created.headers["etag"]
    assert "content-type" not in same.headers
    assert before.status_code == 200
    assert before.content == CONTENT
    assert invalid.status_code == 200


async def test_if_modified_since_is_ignored_beside_if_none_match(
    bridge: httpx.AsyncClient,
) -> None:
    created = await create(bridge, "documents/a")

    response = await bridge.get("/v1/documents/a", headers={
        "If-None-Match": '"not-it"', "If-Modified-Since": created.headers["last-modified"]})

    assert response.status_code == 200
    assert response.content == CONTENT


async def test_if_match_on_get(bridge: httpx.AsyncClient, problem: Any) -> None:
    v1 = await create(bridge, "documents/a")
    v2 = await replace(bridge, "documents/a", b"[2]", v1.headers["etag"])

    ok = await bridge.get("/v1/documents/a", headers={"If-Match": v2.headers["etag"]})
    stale = await bridge.get("/v1/documents/a", headers={"If-Match": v1.headers["etag"]})

    assert ok.status_code == 200
    assert ok.content == b"[2]"
    body = problem(stale, 412, "VERSION_MISMATCH")
    assert body["current_etag"] == v2.headers["etag"]
    assert body["current_version"] == 2
    assert stale.headers["etag"] == v2.headers["etag"]


async def test_malformed_entity_tags_are_400_never_ignored(
    bridge: httpx.AsyncClient, problem: Any
) -> None:
    created = await create(bridge, "documents/a")
    etag = created.headers["etag"]

    for header, value in (
        ("If-None-Match", etag.strip('"')),  # unquoted
        ("If-None-Match", f'{etag} "x'),  # unterminated
        ("If-None-Match", f"w/{etag}"),  # W/ is case-sensitive
        ("If-Match", "*, " + etag),  # * must stand alone
        ("If-Match", f"{etag} {etag}"),  # no comma
    ):
        response = await bridge.get("/v1/documents/a", headers={header: value})
        body = problem(response, 400, "MALFORMED_HEADER")
        assert body["header"] == header, value


# --- collections and history -------------------------------------------------------------------


async def test_collection_listing_pages(bridge: httpx.AsyncClient) -> None:
    etags = {}
    for index in range(5):
        etags[f"documents/d{index}"] = (
            await create(bridge, f"documents/d{index}", f'{{"n": {index}}}'.encode())
        ).headers["etag"]
    await create(bridge, "other/x")
    doomed = await create(bridge, "documents/d9")
    await delete(bridge, "documents/d9", doomed.headers["etag"])

    seen: list[dict[str, Any]] = []
    pages = 0
    params: dict[str, Any] = {"page_size": 2}
    while True:
        response = await bridge.get("/v1/documents", params=params)
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/json"
        page = response.json()
        assert set(page) == {"resources", "next_page_token"}
        assert len(page["resources"]) <= 2
        seen.extend(page["resources"])
        pages += 1
        if not page["next_page_token"]:
            break
        params["page_token"] = page["next_page_token"]

    assert pages == 3
    assert {r["name"]: r["etag"] for r in seen} == etags
    for resource in seen:
        index = int(resource["name"].removeprefix("documents/d"))
        assert resource["content"] == {"n": index}
        assert resource["version"] == 1
        assert resource["deleted"] is False
        assert resource["content_type"] == "application/json"


async def test_collection_listing_rejects_bad_paging(
    bridge: httpx.AsyncClient, problem: Any
) -> None:
    problem(await bridge.get("/v1/documents", params={"page_size": "x"}), 400,
            "INVALID_ARGUMENT")
    problem(await bridge.get("/v1/documents", params={"page_size": "1001"}), 400,
            "INVALID_ARGUMENT")
    problem(await bridge.get("/v1/documents", params={"page_token": "garbage"}), 400,
            "INVALID_PAGE_TOKEN")


async def test_empty_collection_lists_nothing(bridge: httpx.AsyncClient) -> None:
    response = await bridge.get("/v1/documents")

    assert response.status_code == 200
    assert response.json() == {"resources": [], "next_page_token": ""}


async def test_history_pages_every_version(bridge: httpx.AsyncClient) -> None:
    v1 = await create(bridge, "documents/a")
    v2 = await replace(bridge, "documents/a", b"[2]", v1.headers["etag"],
                       **{"Casledger-Reason": "second"})
    await delete(bridge, "documents/a", v2.headers["etag"])
    v4 = await create(bridge, "documents/a", b"[4]")

    versions: list[dict[str, Any]] = []
    params: dict[str, Any] = {"page_size": 3}
    pages = 0
    while True:
        response = await bridge.get("/v1/documents/a:history", params=params)
        assert response.status_code == 200
        page = response.json()
        versions.extend(page["versions"])
        pages += 1
        if not page["next_page_token"]:
            break
        params["page_token"] = page["next_page_token"]

    assert pages == 2
    assert [v["version"] for v in versions] == [1, 2, 3, 4]
    assert [v["deleted"] for v in versions] == [False, False, True, False]
    assert [v["reason"] for v in versions] == ["", "second", "", ""]
    assert versions[0]["etag"] == v1.headers["etag"]
    assert versions[1]["etag"] == v2.headers["etag"]
    assert versions[3]["etag"] == v4.headers["etag"]
    assert len({v["etag"] for v in versions}) == 4
    revisions = [v["revision"] for v in versions]
    assert revisions == sorted(revisions)
    assert len(set(revisions)) == 4
    for version in versions:
        assert version["actor"] == "anonymous"
        assert version["name"] == "documents/a"
        assert RFC3339.fullmatch(version["update_time"])
        assert "content" not in version


async def test_history_with_content(bridge: httpx.AsyncClient) -> None:
    v1 = await create(bridge, "documents/a")
    await replace(bridge, "documents/a", b"[2]", v1.headers["etag"])

    response = await bridge.get("/v1/documents/a:history", params={"include_content": "true"})

    assert response.status_code == 200
    contents = [v["content"] for v in response.json()["versions"]]
    assert contents == [{"b": 1, "a": [1, 2, {"z": None}]}, [2]]


async def test_history_of_an_absent_resource_is_404(
    bridge: httpx.AsyncClient, problem: Any
) -> None:
    problem(await bridge.get("/v1/documents/nope:history"), 404, "NOT_FOUND")


async def test_unknown_verb_is_404(bridge: httpx.AsyncClient, problem: Any) -> None:
    await create(bridge, "documents/a")

    problem(await bridge.get("/v1/documents/a:frobnicate"), 404, "NO_ROUTE")


def _date(value: str) -> datetime:
    parsed = parse_http_date(value)
    assert parsed is not None
    return parsed


async def test_media_type_goes_back_exactly_as_stored(bridge: httpx.AsyncClient) -> None:
    # Starlette's media_type= would append "; charset=utf-8" to text types.
    await create(bridge, "documents/t", b"plain words", "text/plain")

    response = await bridge.get("/v1/documents/t")

    assert response.headers["content-type"] == "text/plain"
    assert response.content == b"plain words"


async def test_bare_plus_json_subtype_is_listed_as_bytes(bridge: httpx.AsyncClient) -> None:
    # The service validates only real +json types; `application/+json` is stored as bytes, so
    # the listing must not try to parse it (it answered 500 once).
    await create(bridge, "documents/p", b"{not json", "application/+json")

    listing = await bridge.get("/v1/documents")
    history = await bridge.get("/v1/documents/p:history", params={"include_content": "true"})

    assert listing.status_code == 200
    [item] = listing.json()["resources"]
    assert item["content_base64"] == "e25vdCBqc29u"
    assert history.json()["versions"][0]["content_base64"] == "e25vdCBqc29u"
