"""Every row of the error table (ARCHITECTURE.md, "Errors"): the gRPC code, the ErrorInfo reason
and its metadata, and that a refused write writes nothing."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import error_details_pb2, status_pb2

from casledger.service.api.casledger.v1 import ledger_pb2 as pb
from casledger.service.api.casledger.v1 import ledger_pb2_grpc as pb_grpc
from casledger.service.client import LedgerCallError, LedgerClient, precondition

MERGE = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"
# Well-formed, but no version of any resource in these tests has it.
ABSENT_ETAG = '"1-0000000000000000"'

Code = grpc.StatusCode


async def refused(call: Awaitable[Any], code: grpc.StatusCode, reason: str) -> LedgerCallError:
    with pytest.raises(LedgerCallError) as info:
        await call
    assert (info.value.code, info.value.reason) == (code, reason), info.value
    return info.value


def assert_current(error: LedgerCallError, current: pb.Resource) -> None:
    assert error.current_version == current.version
    assert error.current_etag == current.etag


def assert_no_current(error: LedgerCallError) -> None:
    assert "current_version" not in error.metadata
    assert "current_etag" not in error.metadata


# --- PRECONDITION_REQUIRED --------------------------------------------------------------------


async def test_blind_update_and_delete_are_refused_with_the_current_state(
    client: LedgerClient, ledger_revision: Callable[[], int]
) -> None:
    created = await client.create("documents", b"{}", resource_id="d")
    v2 = await client.replace("documents/d", b"[]", precondition=precondition(version=1))

    for call in (
        client.replace("documents/d", b"{}", precondition=None),
        client.patch("documents/d", b"{}", media_type=MERGE, precondition=None),
        # A Precondition message with none of its conditions set proves nothing either.
        client.replace("documents/d", b"{}", precondition=pb.Precondition()),
        client.delete("documents/d", precondition=None),
        client.delete("documents/d", precondition=pb.Precondition()),
    ):
        error = await refused(call, Code.FAILED_PRECONDITION, "PRECONDITION_REQUIRED")
        assert_current(error, v2)
        assert error.metadata["name"] == "documents/d"
    assert ledger_revision() == 2
    assert created.version == 1


async def test_update_of_an_absent_resource_without_precondition_is_precondition_required(
    client: LedgerClient, ledger_revision: Callable[[], int]
) -> None:
    error = await refused(client.replace("documents/nope", b"{}", precondition=None),
                          Code.FAILED_PRECONDITION, "PRECONDITION_REQUIRED")
    assert_no_current(error)

    created = await client.create("documents", b"{}", resource_id="gone")
    await client.delete("documents/gone", precondition=precondition(etag=created.etag))
    error = await refused(client.replace("documents/gone", b"{}", precondition=None),
                          Code.FAILED_PRECONDITION, "PRECONDITION_REQUIRED")
    assert_no_current(error)
    assert ledger_revision() == 2


# --- VERSION_MISMATCH -------------------------------------------------------------------------


async def test_stale_etag_or_version_is_version_mismatch(
    client: LedgerClient, ledger_revision: Callable[[], int]
) -> None:
    v1 = await client.create("documents", b'{"n": 1}', resource_id="d")
    v2 = await client.replace("documents/d", b'{"n": 2}', precondition=precondition(etag=v1.etag))

    for call in (
        client.replace("documents/d", b"{}", precondition=precondition(etag=v1.etag)),
        client.replace("documents/d", b"{}", precondition=precondition(version=1)),
        client.replace("documents/d", b"{}", precondition=precondition(version=3)),
        client.replace("documents/d", b"{}", precondition=precondition(etag=ABSENT_ETAG)),
        # Right version number, wrong hash: the ETag is more than the number.
        client.replace("documents/d", b"{}",
                       precondition=precondition(etag=v2.etag.replace("2-", "2-f", 1))),
        client.patch("documents/d", b"{}", media_type=MERGE,
                     precondition=precondition(etag=v1.etag)),
        client.delete("documents/d", precondition=precondition(etag=v1.etag)),
        client.delete("documents/d", precondition=precondition(version=1)),
    ):
        error = await refused(call, Code.ABORTED, "VERSION_MISMATCH")
        assert_current(error, v2)
    assert ledger_revision() == 2
    assert (await client.get("documents/d")).content == b'{"n": 2}'


async def test_the_etag_of_another_resource_at_the_same_version_never_matches(
    client: LedgerClient, ledger_revision: Callable[[], int]
) -> None:
    a = await client.create("documents", b"{}", resource_id="a")
    b = await client.create("documents", b"{}", resource_id="b")

    for call in (
        client.replace("documents/b", b"[]", precondition=precondition(etag=a.etag)),
        client.delete("documents/b", precondition=precondition(etag=a.etag)),
    ):
        error = await refused(call, Code.ABORTED, "VERSION_MISMATCH")
        assert_current(error, b)
    assert ledger_revision() == 2


async def test_a_tombstone_cannot_be_written_over_by_update_or_delete(
    client: LedgerClient, ledger_revision: Callable[[], int]
) -> None:
    created = await client.create("documents", b"{}", resource_id="d")
    tombstone = await client.delete("documents/d", precondition=precondition(etag=created.etag))

    # The tombstone's own ETag and version prove nothing: it is not a live resource.
    for pre in (precondition(etag=tombstone.etag), precondition(version=tombstone.version),
                precondition(exists=True)):
        error = await refused(client.replace("documents/d", b"[]", precondition=pre),
                              Code.ABORTED, "VERSION_MISMATCH")
        assert_no_current(error)
        error = await refused(client.delete("documents/d", precondition=pre),
                              Code.NOT_FOUND, "NOT_FOUND")
        assert error.metadata["deleted_at_version"] == "2"
    assert ledger_revision() == 2


async def test_update_of_an_absent_resource_with_a_precondition_is_version_mismatch(
    client: LedgerClient, ledger_revision: Callable[[], int]
) -> None:
    for pre in (
        precondition(etag=ABSENT_ETAG),
        precondition(version=1),
        precondition(exists=True),
        pb.Precondition(unmodified_since=Timestamp(seconds=4_000_000_000)),
    ):
        error = await refused(client.replace("documents/nope", b"{}", precondition=pre),
                              Code.ABORTED, "VERSION_MISMATCH")
        assert_no_current(error)
        error = await refused(
            client.patch("documents/nope", b"{}", media_type=MERGE, precondition=pre),
            Code.ABORTED, "VERSION_MISMATCH",
        )
        assert_no_current(error)
    assert ledger_revision() == 0


# --- MODIFIED_SINCE ---------------------------------------------------------------------------


def since(seconds: int, nanos: int = 0) -> pb.Precondition:
    return pb.Precondition(unmodified_since=Timestamp(seconds=seconds, nanos=nanos))


async def test_unmodified_since_before_the_last_write_is_modified_since(
    client: LedgerClient, ledger_revision: Callable[[], int]
) -> None:
    created = await client.create("documents", b"{}", resource_id="d")
    written = created.update_time.seconds

    for pre in (since(written - 1), since(written - 1, 999_999_999), since(0)):
        error = await refused(client.replace("documents/d", b"[]", precondition=pre),
                              Code.ABORTED, "MODIFIED_SINCE")
        assert_current(error, created)
        error = await refused(client.delete("documents/d", precondition=pre),
                              Code.ABORTED, "MODIFIED_SINCE")
        assert_current(error, created)
    assert ledger_revision() == 1


async def two_writes_in_one_second(client: LedgerClient, name: str) -> pb.Resource:
    """Write `name` until its last two versions share a second; return the last one. Two writes
    straddle a second boundary only rarely, twenty in a row never."""
    parent, resource_id = name.split("/")
    current = await client.create(parent, b"0", resource_id=resource_id)
    for attempt in range(1, 21):
        previous = current
        current = await client.replace(name, str(attempt).encode(),
                                       precondition=precondition(etag=current.etag))
        if current.update_time.seconds == previous.update_time.seconds:
            return current
    pytest.fail("twenty consecutive writes each straddled a second boundary")


async def test_unmodified_since_a_second_with_two_writes_is_modified_since(
    client: LedgerClient, ledger_revision: Callable[[], int]
) -> None:
    last = await two_writes_in_one_second(client, "documents/d")
    revision = ledger_revision()
    second = last.update_time.seconds

    # The client's second holds two versions: it cannot prove which one it saw.
    for pre in (since(second), since(second, 999_999_999)):
        error = await refused(client.replace("documents/d", b"[]", precondition=pre),
                              Code.ABORTED, "MODIFIED_SINCE")
        assert_current(error, last)
        error = await refused(client.delete("documents/d", precondition=pre),
                              Code.ABORTED, "MODIFIED_SINCE")
        assert_current(error, last)
    assert ledger_revision() == revision
    # A later instant is after both writes: it holds.
    updated = await client.replace("documents/d", b"[]", precondition=since(second + 1))
    assert updated.version == last.version + 1


async def test_unmodified_since_at_or_after_a_single_write_holds(client: LedgerClient) -> None:
    created = await client.create("documents", b"{}", resource_id="d")
    # Only one version was written in that second: the instant proves the client saw it.
    updated = await client.replace("documents/d", b"[1]",
                                   precondition=since(created.update_time.seconds))
    assert updated.version == 2

    later = await client.replace("documents/d", b"[2]",
                                 precondition=since(updated.update_time.seconds + 3600))
    assert later.version == 3
    tombstone = await client.delete("documents/d",
                                    precondition=since(later.update_time.seconds + 1))
    assert (tombstone.version, tombstone.deleted) == (4, True)


# --- ALREADY_EXISTS ---------------------------------------------------------------------------


async def test_create_of_an_existing_resource_is_already_exists(
    client: LedgerClient, ledger_revision: Callable[[], int]
) -> None:
    created = await client.create("documents", b"{}", resource_id="d")
    v2 = await client.replace("documents/d", b"[]", precondition=precondition(etag=created.etag))

    for call in (
        client.create("documents", b"{}", resource_id="d"),
        client.create("documents", b"[]", resource_id="d", request_id="another-try"),
    ):
        error = await refused(call, Code.ALREADY_EXISTS, "ALREADY_EXISTS")
        assert_current(error, v2)
    assert ledger_revision() == 2


# --- NOT_FOUND --------------------------------------------------------------------------------


async def test_get_of_an_absent_resource_is_not_found(client: LedgerClient) -> None:
    error = await refused(client.get("documents/nope"), Code.NOT_FOUND, "NOT_FOUND")
    assert error.metadata == {"name": "documents/nope"}
    error = await refused(client.get("documents/nope", version=1), Code.NOT_FOUND, "NOT_FOUND")
    assert "deleted_at_version" not in error.metadata


async def test_get_of_a_deleted_resource_is_not_found_with_deleted_at_version(
    client: LedgerClient,
) -> None:
    created = await client.create("documents", b"{}", resource_id="d")
    await client.replace("documents/d", b"[]", precondition=precondition(etag=created.etag))
    await client.delete("documents/d", precondition=precondition(version=2))

    error = await refused(client.get("documents/d"), Code.NOT_FOUND, "NOT_FOUND")
    assert error.metadata["deleted_at_version"] == "3"
    assert_no_current(error)


async def test_get_of_a_version_that_does_not_exist_is_not_found(client: LedgerClient) -> None:
    await client.create("documents", b"{}", resource_id="d")

    for version in (2, 99):
        error = await refused(client.get("documents/d", version=version),
                              Code.NOT_FOUND, "NOT_FOUND")
        assert "deleted_at_version" not in error.metadata
    assert (await client.get("documents/d", version=1)).version == 1


@pytest.mark.parametrize(
    "pre",
    [
        None,
        precondition(etag=ABSENT_ETAG),
        precondition(version=1),
        precondition(exists=True),
        since(4_000_000_000),
    ],
    ids=["none", "etag", "version", "exists", "unmodified_since"],
)
async def test_delete_of_an_absent_resource_is_not_found_whatever_it_carries(
    client: LedgerClient, ledger_revision: Callable[[], int], pre: pb.Precondition | None
) -> None:
    error = await refused(client.delete("documents/nope", precondition=pre),
                          Code.NOT_FOUND, "NOT_FOUND")
    assert "deleted_at_version" not in error.metadata
    assert_no_current(error)

    created = await client.create("documents", b"{}", resource_id="gone")
    await client.delete("documents/gone", precondition=precondition(etag=created.etag))
    error = await refused(client.delete("documents/gone", precondition=pre),
                          Code.NOT_FOUND, "NOT_FOUND")
    assert error.metadata["deleted_at_version"] == "2"
    assert ledger_revision() == 2


async def test_list_versions_of_a_name_never_written_is_not_found(client: LedgerClient) -> None:
    await client.create("documents", b"{}", resource_id="d")
    await refused(client.versions("documents/nope"), Code.NOT_FOUND, "NOT_FOUND")


# --- patches ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("media_type", "document"),
    [
        (MERGE, b'{"a": '),
        (MERGE, b'{"a": NaN}'),
        (JSON_PATCH, b"[{]"),
        (JSON_PATCH, b'{"op": "add", "path": "/a", "value": 1}'),  # not an array
        (JSON_PATCH, b'[{"op": "frobnicate", "path": "/a"}]'),
        (JSON_PATCH, b'[{"op": "add", "path": "/a"}]'),  # no value
        (JSON_PATCH, b'[{"op": "add", "path": "a", "value": 1}]'),  # not a JSON Pointer
        (JSON_PATCH, b'[{"op": "remove", "path": "/a~2"}]'),  # bad escape
    ],
)
async def test_malformed_patch_is_invalid_patch(
    client: LedgerClient, ledger_revision: Callable[[], int], media_type: str, document: bytes
) -> None:
    created = await client.create("documents", b'{"a": 1}', resource_id="d")

    error = await refused(
        client.patch("documents/d", document, media_type=media_type,
                     precondition=precondition(etag=created.etag)),
        Code.INVALID_ARGUMENT, "INVALID_PATCH",
    )
    assert error.metadata["field"] == "patch.document"
    assert ledger_revision() == 1


@pytest.mark.parametrize(
    "document",
    [
        b'[{"op": "test", "path": "/a", "value": 2}]',
        b'[{"op": "add", "path": "/b", "value": 1}, {"op": "test", "path": "/a", "value": "1"}]',
        b'[{"op": "remove", "path": "/missing"}]',
        b'[{"op": "replace", "path": "/a/b/c", "value": 1}]',
        b'[{"op": "add", "path": "/nowhere/x", "value": 1}]',
        b'[{"op": "move", "from": "/missing", "path": "/b"}]',
    ],
)
async def test_patch_that_does_not_apply_is_patch_conflict_and_writes_nothing(
    client: LedgerClient, ledger_revision: Callable[[], int], document: bytes
) -> None:
    created = await client.create("documents", b'{"a": 1}', resource_id="d")

    await refused(
        client.patch("documents/d", document, media_type=JSON_PATCH,
                     precondition=precondition(etag=created.etag)),
        Code.FAILED_PRECONDITION, "PATCH_CONFLICT",
    )
    assert ledger_revision() == 1
    assert await client.get("documents/d") == created


@pytest.mark.parametrize(("media_type", "document"),
                         [(MERGE, b'{"a": 1}'), (JSON_PATCH, b'[{"op": "test", "path": "", '
                                                             b'"value": "x"}]')])
async def test_patch_of_non_json_content_is_patch_conflict(
    client: LedgerClient, ledger_revision: Callable[[], int], media_type: str, document: bytes
) -> None:
    created = await client.create("notes", b"plain text", resource_id="n",
                                  content_type="text/plain")

    await refused(
        client.patch("notes/n", document, media_type=media_type,
                     precondition=precondition(etag=created.etag)),
        Code.FAILED_PRECONDITION, "PATCH_CONFLICT",
    )
    assert ledger_revision() == 1
    assert (await client.get("notes/n")).content == b"plain text"


@pytest.mark.parametrize("media_type",
                         ["application/json", "text/plain", "", "application/patch+json"])
async def test_unknown_patch_media_type_is_unsupported_patch_type(
    client: LedgerClient, ledger_revision: Callable[[], int], media_type: str
) -> None:
    created = await client.create("documents", b'{"a": 1}', resource_id="d")

    error = await refused(
        client.patch("documents/d", b'{"a": 2}', media_type=media_type,
                     precondition=precondition(etag=created.etag)),
        Code.INVALID_ARGUMENT, "UNSUPPORTED_PATCH_TYPE",
    )
    assert error.metadata["field"] == "patch.media_type"
    assert ledger_revision() == 1


async def test_patch_media_type_parameters_and_case_are_ignored(client: LedgerClient) -> None:
    created = await client.create("documents", b'{"a": 1}', resource_id="d")
    patched = await client.patch("documents/d", b'{"b": 2}',
                                 media_type="Application/Merge-Patch+JSON; charset=utf-8",
                                 precondition=precondition(etag=created.etag))
    assert patched.content == b'{"a":1,"b":2}'


# --- argument errors (one of each; the full catalogue is in test_bad_input.py) -----------------


async def test_each_argument_error_names_its_field(
    client: LedgerClient, ledger_revision: Callable[[], int]
) -> None:
    created = await client.create("documents", b"{}", resource_id="d")
    cases: list[tuple[Awaitable[Any], str, str]] = [
        (client.get("documents"), "INVALID_NAME", "name"),
        (client.create("documents", b"{", resource_id="x"), "INVALID_CONTENT", "content"),
        (client.create("documents", b"{}", resource_id="x", content_type="json"),
         "INVALID_CONTENT", "content_type"),
        (client.list("documents", page_token="garbage"), "INVALID_PAGE_TOKEN", "page_token"),
        (client.replace("documents/d", b"{}", precondition=precondition(version=0)),
         "INVALID_PRECONDITION", "precondition.version"),
        (client.delete("documents/d", precondition=precondition(etag="1-abc")),
         "INVALID_PRECONDITION", "precondition.etag"),
        (client.get("documents/d", version=-1), "INVALID_ARGUMENT", "version"),
    ]
    for call, reason, field in cases:
        error = await refused(call, Code.INVALID_ARGUMENT, reason)
        assert error.metadata["field"] == field
    assert ledger_revision() == 1
    assert await client.get("documents/d") == created


async def test_unknown_field_is_refused(
    client: LedgerClient, raw_call: Callable[[str, bytes], Awaitable[bytes]]
) -> None:
    request = pb.GetResourceRequest(name="documents/d").SerializeToString() + b"\xf8\x06\x01"
    await refused(raw_call("GetResource", request), Code.INVALID_ARGUMENT, "UNKNOWN_FIELD")


async def test_content_too_large_carries_the_limit(small_client: LedgerClient) -> None:
    error = await refused(small_client.create("blobs", b"x" * 1025, resource_id="b",
                                              content_type="text/plain"),
                          Code.INVALID_ARGUMENT, "CONTENT_TOO_LARGE")
    assert error.metadata == {"field": "content", "limit": "1024"}
    with pytest.raises(LedgerCallError):
        await small_client.get("blobs/b")


# --- ErrorInfo --------------------------------------------------------------------------------


def error_details(error: grpc.aio.AioRpcError) -> tuple[status_pb2.Status, list[Any]]:
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            status = status_pb2.Status.FromString(value)
            return status, list(status.details)
    raise AssertionError("no grpc-status-details-bin trailer")


async def test_every_error_carries_error_info_in_the_casledger_domain(
    client: LedgerClient,
) -> None:
    created = await client.create("documents", b"{}", resource_id="d")
    calls: list[tuple[str, Any, grpc.StatusCode, str]] = [
        ("GetResource", pb.GetResourceRequest(name="documents/nope"),
         Code.NOT_FOUND, "NOT_FOUND"),
        ("GetResource", pb.GetResourceRequest(name="bad name"),
         Code.INVALID_ARGUMENT, "INVALID_NAME"),
        ("CreateResource", pb.CreateResourceRequest(parent="documents", resource_id="d",
                                                    content=b"{}"),
         Code.ALREADY_EXISTS, "ALREADY_EXISTS"),
        ("UpdateResource", pb.UpdateResourceRequest(
            name="documents/d", content=pb.ResourceContent(data=b"{}")),
         Code.FAILED_PRECONDITION, "PRECONDITION_REQUIRED"),
        ("UpdateResource", pb.UpdateResourceRequest(
            name="documents/d", content=pb.ResourceContent(data=b"{}"),
            precondition=pb.Precondition(version=7)),
         Code.ABORTED, "VERSION_MISMATCH"),
        ("DeleteResource", pb.DeleteResourceRequest(name="documents/nope"),
         Code.NOT_FOUND, "NOT_FOUND"),
        ("ListResources", pb.ListResourcesRequest(parent="documents", page_token="x"),
         Code.INVALID_ARGUMENT, "INVALID_PAGE_TOKEN"),
    ]
    stub = pb_grpc.LedgerStub(client.channel)
    for method, request, code, reason in calls:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await getattr(stub, method)(request, timeout=10)
        status, details = error_details(info.value)
        assert info.value.code() == code
        assert status.code == code.value[0]
        assert status.message == info.value.details() != ""
        assert len(details) == 1
        error_info = error_details_pb2.ErrorInfo()
        assert details[0].Unpack(error_info)
        assert (error_info.domain, error_info.reason) == ("casledger.dev", reason)

    # A streaming call carries the same details.
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in stub.Watch(pb.WatchRequest(prefix="a//b")):
            pass
    _, details = error_details(info.value)
    error_info = error_details_pb2.ErrorInfo()
    assert details[0].Unpack(error_info)
    assert (error_info.domain, error_info.reason) == ("casledger.dev", "INVALID_NAME")
    assert error_info.metadata["field"] == "prefix"
    assert created.version == 1
