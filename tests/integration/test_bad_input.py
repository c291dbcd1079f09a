"""Bad input is refused as INVALID_ARGUMENT with the reason and field, and writes nothing: the
ledger's latest revision, read from its SQLite file, is the same before and after."""

from __future__ import annotations

import base64
import json
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from casledger.service.api.casledger.v1 import ledger_pb2 as pb
from casledger.service.client import LedgerCallError, LedgerClient, precondition
from casledger.service.server import RunningServer

RawCall = Callable[[str, bytes], Awaitable[bytes]]

# Field 111, varint 1: a field no casledger message has.
UNKNOWN_FIELD = b"\xf8\x06\x01"


async def refused(call: Awaitable[Any], reason: str, field: str) -> LedgerCallError:
    with pytest.raises(LedgerCallError) as info:
        await call
    error = info.value
    assert (error.code, error.reason) == (grpc.StatusCode.INVALID_ARGUMENT, reason), error
    assert error.metadata.get("field") == field, error
    return error


@pytest.fixture
async def existing(client: LedgerClient) -> pb.Resource:
    """documents/d at version 1, revision 1: the target of the refused writes."""
    return await client.create("documents", b'{"n": 1}', resource_id="d")


# --- names ------------------------------------------------------------------------------------

BAD_NAMES = {
    "empty": "",
    "collection": "documents",
    "odd segments": "documents/d/notes",
    "dot-dot": "documents/..",
    "dot": "documents/.",
    "empty segment": "a//b",
    "empty segment, even count": "projects//notes/n",
    "leading slash": "/documents/d",
    "trailing slash": "documents/d/",
    "percent-encoded slash": "documents/a%2Fb",
    "unicode": "documents/café",
    "fullwidth digit": "documents/\uff11",
    "space": "documents/a b",
    "newline": "documents/d\n",
    "nul": "documents/d\x00",
    "17 segments": "/".join(["a"] * 17),
    "18 segments": "/".join(["a"] * 18),
    "515 characters": "/".join(["a" * 85] * 6),
    "129-character segment": "documents/" + "x" * 129,
    "leading dash": "documents/-d",
    "leading dot": "documents/.d",
    "leading underscore": "documents/_d",
}


@pytest.mark.parametrize("name", BAD_NAMES.values(), ids=BAD_NAMES.keys())
async def test_bad_resource_names_are_invalid_name(
    client: LedgerClient, existing: pb.Resource, ledger_revision: Callable[[], int], name: str
) -> None:
    pre = precondition(etag=existing.etag)
    for call in (
        client.get(name),
        client.replace(name, b"{}", precondition=pre),
        client.patch(name, b"{}", media_type="application/merge-patch+json", precondition=pre),
        client.delete(name, precondition=pre),
        client.versions(name),
    ):
        await refused(call, "INVALID_NAME", "name")
    assert ledger_revision() == 1


BAD_COLLECTIONS = {
    "empty": "",
    "resource name": "documents/d",
    "empty segment": "a//b",
    "dot-dot": "..",
    "percent-encoded slash": "a%2Fb",
    "unicode": "café",
    "17 segments": "/".join(["a"] * 17),
    "525 characters": "/".join(["c" * 75] * 7),
    "129-character segment": "c" * 129,
    "leading dash": "-documents",
    "trailing slash": "documents/",
}


@pytest.mark.parametrize("parent", BAD_COLLECTIONS.values(), ids=BAD_COLLECTIONS.keys())
async def test_bad_collections_are_invalid_name(
    client: LedgerClient, existing: pb.Resource, ledger_revision: Callable[[], int], parent: str
) -> None:
    await refused(client.create(parent, b"{}", resource_id="x"), "INVALID_NAME", "parent")
    await refused(client.create(parent, b"{}"), "INVALID_NAME", "parent")
    await refused(client.list(parent), "INVALID_NAME", "parent")
    assert ledger_revision() == 1


BAD_RESOURCE_IDS = {
    "dot-dot": "..",
    "dot": ".",
    "slash": "a/b",
    "percent-encoded slash": "a%2Fb",
    "unicode": "é",
    "leading dash": "-x",
    "129 characters": "x" * 129,
    "space": " ",
    "newline": "d\n",
}


@pytest.mark.parametrize("resource_id", BAD_RESOURCE_IDS.values(), ids=BAD_RESOURCE_IDS.keys())
async def test_bad_resource_ids_are_invalid_name(
    client: LedgerClient, existing: pb.Resource, ledger_revision: Callable[[], int],
    resource_id: str,
) -> None:
    await refused(client.create("documents", b"{}", resource_id=resource_id),
                  "INVALID_NAME", "resource_id")
    assert ledger_revision() == 1


async def test_resource_id_that_makes_the_name_too_long_is_invalid_name(
    client: LedgerClient, ledger_revision: Callable[[], int]
) -> None:
    parent = "/".join(["p" * 28] * 15)  # 15 segments, 434 characters
    await refused(client.create(parent, b"{}", resource_id="x" * 78),
                  "INVALID_NAME", "resource_id")
    assert ledger_revision() == 0
    created = await client.create(parent, b"{}", resource_id="x" * 77)
    assert len(created.name) == 512


async def test_names_at_the_limits_are_accepted(client: LedgerClient) -> None:
    # 16 segments, exactly 512 characters; a 128-character segment; every allowed character.
    segments = ["s" * 31] * 15 + ["r" * 32]
    longest = "/".join(segments)
    assert len(longest) == 512
    for parent, resource_id in (
        ("/".join(segments[:-1]), segments[-1]),
        ("documents", "x" * 128),
        ("Az09._~-", "a-b.c_d~E9"),
    ):
        created = await client.create(parent, b"{}", resource_id=resource_id)
        assert created.name == f"{parent}/{resource_id}"
        assert (await client.get(created.name)).version == 1
    assert (await client.list("/".join(segments[:-1]))).resources[0].name == longest


# --- content ----------------------------------------------------------------------------------

BAD_JSON = {
    "empty": b"",
    "unterminated": b"{",
    "missing value": b'{"a":}',
    "trailing comma": b"[1,]",
    "single quotes": b"{'a': 1}",
    "trailing garbage": b'{"a": 1} x',
    "two values": b"{} {}",
    "byte order mark": b"\xef\xbb\xbf{}",
    "invalid utf-8": b'"\xff"',
    "overlong utf-8": b'"\xc0\xaf"',
    "nan": b'{"a": NaN}',
    "infinity": b"[Infinity]",
    "out of range number": b"1e999",
    "leading zero": b'{"a": 01}',
    "duplicate keys": b'{"a": 1, "a": 2}',
    "lone surrogate": b'"\\ud800"',
    "nested 10000 deep (arrays)": b"[" * 10_000 + b"]" * 10_000,
    "nested 10000 deep (objects)": b'{"a":' * 10_000 + b"1" + b"}" * 10_000,
    "unbalanced deep": b"[" * 10_000,
}

JSON_MEDIA_TYPES = ("application/json", "application/vnd.x+json",
                    "application/json; charset=utf-8", "")


@pytest.mark.parametrize("content", BAD_JSON.values(), ids=BAD_JSON.keys())
async def test_malformed_json_is_invalid_content(
    client: LedgerClient, existing: pb.Resource, ledger_revision: Callable[[], int],
    content: bytes,
) -> None:
    for content_type in JSON_MEDIA_TYPES:
        await refused(client.create("documents", content, resource_id="x",
                                    content_type=content_type),
                      "INVALID_CONTENT", "content")
        await refused(client.create("documents", content, content_type=content_type),
                      "INVALID_CONTENT", "content")
        await refused(client.replace("documents/d", content, content_type=content_type,
                                     precondition=precondition(etag=existing.etag)),
                      "INVALID_CONTENT", "content")
    assert ledger_revision() == 1
    assert await client.get("documents/d") == existing


async def test_json_checks_apply_only_to_json_media_types(client: LedgerClient) -> None:
    for content in BAD_JSON.values():
        created = await client.create("blobs", content, content_type="application/octet-stream")
        assert (await client.get(created.name)).content == content


@pytest.mark.parametrize("content_type", ["json", "*/*", "text/*", "text/plain; x",
                                          "text/plain;a=b c", "tëxt/plain", "a" * 300 + "/b"])
async def test_malformed_media_type_is_invalid_content(
    client: LedgerClient, existing: pb.Resource, ledger_revision: Callable[[], int],
    content_type: str,
) -> None:
    await refused(client.create("documents", b"{}", resource_id="x", content_type=content_type),
                  "INVALID_CONTENT", "content_type")
    await refused(client.replace("documents/d", b"{}", content_type=content_type,
                                 precondition=precondition(etag=existing.etag)),
                  "INVALID_CONTENT", "content_type")
    assert ledger_revision() == 1


async def test_content_over_the_default_limit_is_content_too_large(
    client: LedgerClient, existing: pb.Resource, ledger_revision: Callable[[], int]
) -> None:
    big = b"x" * ((1 << 20) + 1)
    for call in (
        client.create("blobs", big, resource_id="b", content_type="text/plain"),
        client.replace("documents/d", big, content_type="text/plain",
                       precondition=precondition(etag=existing.etag)),
    ):
        error = await refused(call, "CONTENT_TOO_LARGE", "content")
        assert error.metadata["limit"] == str(1 << 20)
    assert ledger_revision() == 1
    exactly = await client.create("blobs", big[:-1], resource_id="b", content_type="text/plain")
    assert exactly.size_bytes == 1 << 20


async def test_content_over_a_configured_limit_is_content_too_large(
    small_client: LedgerClient,
) -> None:
    created = await small_client.create("documents", b'{"a": ""}', resource_id="d")
    limit = "1024"
    for call, field in (
        (small_client.create("blobs", b"x" * 1025, content_type="text/plain"), "content"),
        (small_client.create("documents", b'"' + b"x" * 1023 + b'"', resource_id="big"),
         "content"),
        (small_client.replace("documents/d", b"x" * 2000, content_type="text/plain",
                              precondition=precondition(etag=created.etag)), "content"),
        (small_client.patch("documents/d", b'{"a": "' + b"x" * 1100 + b'"}',
                            media_type="application/merge-patch+json",
                            precondition=precondition(etag=created.etag)), "patch.document"),
    ):
        error = await refused(call, "CONTENT_TOO_LARGE", field)
        assert error.metadata["limit"] == limit

    # Each patch is small; its result is not.
    v2 = await small_client.patch("documents/d", b'{"a": "' + b"x" * 700 + b'"}',
                                  media_type="application/merge-patch+json",
                                  precondition=precondition(etag=created.etag))
    error = await refused(small_client.patch("documents/d", b'{"b": "' + b"y" * 700 + b'"}',
                                             media_type="application/merge-patch+json",
                                             precondition=precondition(etag=v2.etag)),
                          "CONTENT_TOO_LARGE", "patch")
    assert error.metadata["limit"] == limit
    history = await small_client.versions("documents/d")
    assert [v.version for v in history.versions] == [1, 2]
    assert (await small_client.list("blobs")).resources == []
    # At the limit exactly is fine.
    at_limit = await small_client.create("blobs", b"x" * 1024, content_type="text/plain")
    assert at_limit.size_bytes == 1024


# --- page tokens and sizes --------------------------------------------------------------------


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


GARBAGE_TOKENS = {
    "word": "garbage",
    "punctuation": "!!!!",
    "not json": b64(b"\x00\xff\xfe"),
    "json, not an object": b64(b"[1, 2]"),
    "object without a position": b64(json.dumps({"s": "resources:documents"}).encode()),
    "position of the wrong type": b64(json.dumps({"s": "resources:documents", "a": 3}).encode()),
    "nested 100000 deep": b64(b"[" * 100_000 + b"]" * 100_000),
    "huge integer": b64(b'{"s": "resources:documents", "a": ' + b"9" * 5000 + b"}"),
}


@pytest.mark.parametrize("token", GARBAGE_TOKENS.values(), ids=GARBAGE_TOKENS.keys())
async def test_garbage_page_tokens_are_invalid_page_token(
    client: LedgerClient, existing: pb.Resource, token: str
) -> None:
    await refused(client.list("documents", page_token=token), "INVALID_PAGE_TOKEN", "page_token")
    await refused(client.versions("documents/d", page_token=token),
                  "INVALID_PAGE_TOKEN", "page_token")


@pytest.mark.parametrize("position", [-1, 1 << 63, 10**30, 1.5, "1", None, True])
async def test_forged_version_positions_are_invalid_page_token(
    client: LedgerClient, existing: pb.Resource, position: object
) -> None:
    # Well-formed, for the right listing, but no position this server would ever issue.
    token = b64(json.dumps({"s": "versions:documents/d", "a": position}).encode())
    await refused(client.versions("documents/d", page_token=token),
                  "INVALID_PAGE_TOKEN", "page_token")
    # The largest position that could be real is an empty page, not an error.
    last = b64(json.dumps({"s": "versions:documents/d", "a": (1 << 63) - 1}).encode())
    assert list((await client.versions("documents/d", page_token=last)).versions) == []


async def test_page_tokens_only_work_for_the_listing_they_came_from(
    client: LedgerClient,
) -> None:
    for name in ("a", "b"):
        for collection in ("documents", "notes"):
            created = await client.create(collection, b"{}", resource_id=name)
            await client.replace(created.name, b"[]", precondition=precondition(version=1))
    documents = (await client.list("documents", page_size=1)).next_page_token
    notes = (await client.list("notes", page_size=1)).next_page_token
    versions_a = (await client.versions("documents/a", page_size=1)).next_page_token
    versions_b = (await client.versions("documents/b", page_size=1)).next_page_token
    assert all((documents, notes, versions_a, versions_b))

    for call in (
        client.list("documents", page_token=notes),
        client.list("notes", page_token=documents),
        client.list("documents", page_token=versions_a),
        client.versions("documents/a", page_token=documents),
        client.versions("documents/a", page_token=versions_b),
        client.versions("notes/a", page_token=versions_a),
    ):
        await refused(call, "INVALID_PAGE_TOKEN", "page_token")
    # Each still works where it belongs.
    assert [r.name for r in (await client.list("notes", page_token=notes)).resources] == [
        "notes/b"]
    assert [v.version for v in (await client.versions("documents/b",
                                                      page_token=versions_b)).versions] == [2]


async def test_negative_page_size_is_invalid_argument(
    client: LedgerClient, existing: pb.Resource
) -> None:
    await refused(client.list("documents", page_size=-1), "INVALID_ARGUMENT", "page_size")
    await refused(client.versions("documents/d", page_size=-5), "INVALID_ARGUMENT", "page_size")


# --- preconditions and other fields -----------------------------------------------------------

BAD_PRECONDITIONS = {
    "version 0": (precondition(version=0), "precondition.version"),
    "version -1": (precondition(version=-1), "precondition.version"),
    "exists false": (precondition(exists=False), "precondition.exists"),
    "unquoted etag": (precondition(etag="1-abc"), "precondition.etag"),
    "weak etag": (precondition(etag='W/"1-abc"'), "precondition.etag"),
    "empty etag": (precondition(etag=""), "precondition.etag"),
    "unterminated etag": (precondition(etag='"1-abc'), "precondition.etag"),
    "etag with a space": (precondition(etag='"1 abc"'), "precondition.etag"),
    "etag list": (precondition(etag='"1-abc", "2-def"'), "precondition.etag"),
    "negative nanos": (pb.Precondition(unmodified_since=Timestamp(seconds=1, nanos=-1)),
                       "precondition.unmodified_since"),
    "nanos over a second": (
        pb.Precondition(unmodified_since=Timestamp(seconds=1, nanos=1_000_000_000)),
        "precondition.unmodified_since"),
    "after year 9999": (pb.Precondition(unmodified_since=Timestamp(seconds=253402300800)),
                        "precondition.unmodified_since"),
}


@pytest.mark.parametrize(("pre", "field"), BAD_PRECONDITIONS.values(),
                         ids=BAD_PRECONDITIONS.keys())
async def test_bad_preconditions_are_invalid_precondition(
    client: LedgerClient, existing: pb.Resource, ledger_revision: Callable[[], int],
    pre: pb.Precondition, field: str,
) -> None:
    for call in (
        client.replace("documents/d", b"{}", precondition=pre),
        client.patch("documents/d", b"{}", media_type="application/merge-patch+json",
                     precondition=pre),
        client.delete("documents/d", precondition=pre),
        # Arguments are checked before existence.
        client.replace("documents/nope", b"{}", precondition=pre),
    ):
        await refused(call, "INVALID_PRECONDITION", field)
    assert ledger_revision() == 1


async def test_other_bad_fields_are_invalid_argument(
    client: LedgerClient, existing: pb.Resource, ledger_revision: Callable[[], int],
    raw_call: RawCall,
) -> None:
    pre = precondition(etag=existing.etag)
    cases: list[tuple[Awaitable[Any], str]] = [
        (client.get("documents/d", version=-1), "version"),
        (client.replace("documents/d", b"{}", precondition=pre, request_id="has space"),
         "request_id"),
        (client.replace("documents/d", b"{}", precondition=pre, request_id="é"), "request_id"),
        (client.create("documents", b"{}", request_id="r" * 257), "request_id"),
        (client.delete("documents/d", precondition=pre, reason="bell\x07"), "reason"),
        (client.create("documents", b"{}", reason="r" * 1025), "reason"),
    ]
    for call, field in cases:
        await refused(call, "INVALID_ARGUMENT", field)
    # An update that changes nothing: neither content nor patch.
    no_change = pb.UpdateResourceRequest(name="documents/d", precondition=pre)
    await refused(raw_call("UpdateResource", no_change.SerializeToString()),
                  "INVALID_ARGUMENT", "change")
    assert ledger_revision() == 1


async def test_arguments_are_checked_before_existence(
    client: LedgerClient, existing: pb.Resource, ledger_revision: Callable[[], int]
) -> None:
    # The resource exists (ALREADY_EXISTS otherwise), the precondition is stale
    # (VERSION_MISMATCH otherwise): the bad argument is what is reported.
    await refused(client.create("documents", b"{", resource_id="d"), "INVALID_CONTENT", "content")
    await refused(client.replace("documents/d", b"{", precondition=precondition(version=9)),
                  "INVALID_CONTENT", "content")
    await refused(client.patch("documents/d", b"{", media_type="application/merge-patch+json",
                               precondition=precondition(version=9)),
                  "INVALID_PATCH", "patch.document")
    assert ledger_revision() == 1


# --- unknown fields ---------------------------------------------------------------------------


def length_delimited(number: int, payload: bytes) -> bytes:
    """A length-delimited field (wire type 2) with a small number and payload."""
    assert number < 16
    assert len(payload) < 128
    return bytes([number << 3 | 2, len(payload)]) + payload


async def test_unknown_fields_are_refused_by_every_unary_rpc(
    existing: pb.Resource, ledger_revision: Callable[[], int], raw_call: RawCall
) -> None:
    pre = pb.Precondition(etag=existing.etag)
    requests: dict[str, Any] = {
        "GetResource": pb.GetResourceRequest(name="documents/d"),
        "ListResources": pb.ListResourcesRequest(parent="documents"),
        "CreateResource": pb.CreateResourceRequest(parent="documents", resource_id="x",
                                                   content=b"{}"),
        "UpdateResource": pb.UpdateResourceRequest(
            name="documents/d", content=pb.ResourceContent(data=b"{}"), precondition=pre),
        "DeleteResource": pb.DeleteResourceRequest(name="documents/d", precondition=pre),
        "ListVersions": pb.ListVersionsRequest(name="documents/d"),
    }
    for method, request in requests.items():
        data = request.SerializeToString()
        # The same bytes without the unknown field are a fine request...
        if method in ("GetResource", "ListResources", "ListVersions"):
            assert await raw_call(method, data)
        # ...with it, they are refused.
        error = await refused(raw_call(method, data + UNKNOWN_FIELD), "UNKNOWN_FIELD", "request")
        assert "111" in error.message
    assert ledger_revision() == 1


async def test_unknown_fields_nested_in_a_message_are_refused(
    client: LedgerClient, existing: pb.Resource, ledger_revision: Callable[[], int],
    raw_call: RawCall,
) -> None:
    pre = pb.Precondition(etag=existing.etag).SerializeToString()
    content = pb.ResourceContent(data=b"{}").SerializeToString()
    patch = pb.Patch(media_type="application/merge-patch+json", document=b"{}").SerializeToString()
    update = pb.UpdateResourceRequest(name="documents/d").SerializeToString()
    delete = pb.DeleteResourceRequest(name="documents/d").SerializeToString()
    cases = [
        ("UpdateResource", update + length_delimited(2, content)
         + length_delimited(4, pre + UNKNOWN_FIELD), "precondition"),
        ("UpdateResource", update + length_delimited(3, patch)
         + length_delimited(4, pre + UNKNOWN_FIELD), "precondition"),
        ("UpdateResource", update + length_delimited(2, content + UNKNOWN_FIELD)
         + length_delimited(4, pre), "content"),
        ("UpdateResource", update + length_delimited(3, patch + UNKNOWN_FIELD)
         + length_delimited(4, pre), "patch"),
        ("DeleteResource", delete + length_delimited(2, pre + UNKNOWN_FIELD), "precondition"),
        # Only the unknown field inside: the precondition is present but says nothing known.
        ("DeleteResource", delete + length_delimited(2, UNKNOWN_FIELD), "precondition"),
    ]
    for method, data, field in cases:
        await refused(raw_call(method, data), "UNKNOWN_FIELD", field)
    assert ledger_revision() == 1

    # The hand-built bytes are otherwise right: without the unknown field they are accepted.
    updated = pb.Resource.FromString(await raw_call(
        "UpdateResource", update + length_delimited(2, content) + length_delimited(4, pre)))
    assert (updated.version, updated.content) == (2, b"{}")
    assert (await client.get("documents/d")).version == 2


@pytest.mark.parametrize(
    "request_bytes",
    [b"\x0a\x03a/\xff", b"\x0a\x10abc", b"\xff\xff\xff"],
    ids=["invalid utf-8 in a string", "truncated", "corrupt"],
)
async def test_request_bytes_that_do_not_parse_are_invalid_argument(
    existing: pb.Resource, ledger_revision: Callable[[], int], raw_call: RawCall,
    request_bytes: bytes,
) -> None:
    with pytest.raises(LedgerCallError) as info:
        await raw_call("GetResource", request_bytes)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.reason == "INVALID_ARGUMENT"
    assert info.value.metadata["field"] == "request"
    assert ledger_revision() == 1


async def test_unknown_field_in_a_watch_request_is_refused(
    server: RunningServer, existing: pb.Resource
) -> None:
    request = pb.WatchRequest(start_revision=1).SerializeToString()
    async with grpc.aio.insecure_channel(server.target) as channel:
        watch = channel.unary_stream("/casledger.v1.Ledger/Watch",
                                     request_serializer=lambda data: data,
                                     response_deserializer=pb.WatchEvent.FromString)
        accepted = watch(request)
        assert (await anext(aiter(accepted))).resource == existing
        accepted.cancel()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in watch(request + UNKNOWN_FIELD):
                pass
    error = LedgerCallError.from_rpc_error(info.value)
    assert (error.code, error.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "UNKNOWN_FIELD")
    assert error.metadata["field"] == "request"
