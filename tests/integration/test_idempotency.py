"""Request ids: a retry returns the first outcome and writes nothing; the same id for a different
request is refused; the replay is checked before the precondition; failures are not recorded."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest

from casledger.service.api.casledger.v1 import ledger_pb2 as pb
from casledger.service.client import LedgerCallError, LedgerClient, precondition

MERGE = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"


async def refused(call: Awaitable[Any], code: grpc.StatusCode, reason: str) -> LedgerCallError:
    with pytest.raises(LedgerCallError) as info:
        await call
    assert (info.value.code, info.value.reason) == (code, reason), info.value
    return info.value


async def key_reused(call: Awaitable[Any]) -> None:
    error = await refused(call, grpc.StatusCode.INVALID_ARGUMENT, "IDEMPOTENCY_KEY_REUSED")
    assert error.metadata["field"] == "request_id"


def outcome(resource: pb.Resource) -> tuple[str, int, str, int, bytes, bool]:
    return (resource.name, resource.version, resource.etag, resource.revision, resource.content,
            resource.deleted)


async def test_create_retry_returns_the_first_outcome(
    client: LedgerClient, ledger_revision: Callable[[], int]
) -> None:
    first = await client.create("documents", b'{"a": 1}', resource_id="d", request_id="create-1")
    retry = await client.create("documents", b'{"a": 1}', resource_id="d", request_id="create-1")

    assert retry == first
    assert ledger_revision() == 1
    # Without the request id, the same request is just a create of an existing resource.
    await refused(client.create("documents", b'{"a": 1}', resource_id="d"),
                  grpc.StatusCode.ALREADY_EXISTS, "ALREADY_EXISTS")
    await key_reused(client.create("documents", b'{"a": 2}', resource_id="d",
                                   request_id="create-1"))
    await key_reused(client.create("documents", b'{"a": 1}', resource_id="d",
                                   request_id="create-1", content_type="application/vnd.x+json"))
    assert ledger_revision() == 1


async def test_create_with_a_generated_id_retries_to_the_same_name(
    client: LedgerClient, ledger_revision: Callable[[], int]
) -> None:
    first = await client.create("documents", b"{}", request_id="gen-1")
    retry = await client.create("documents", b"{}", request_id="gen-1")

    assert retry == first
    assert ledger_revision() == 1
    assert [r.name for r in (await client.list("documents")).resources] == [first.name]
    await key_reused(client.create("documents", b"[]", request_id="gen-1"))
    # The key is scoped to the collection: elsewhere it is a new request.
    other = await client.create("notes", b"{}", request_id="gen-1")
    assert other.name.startswith("notes/")
    assert ledger_revision() == 2


async def test_create_retry_after_later_writes_still_returns_the_first_outcome(
    client: LedgerClient, ledger_revision: Callable[[], int]
) -> None:
    first = await client.create("documents", b"{}", resource_id="d", request_id="create-1")
    await client.replace("documents/d", b"[]", precondition=precondition(etag=first.etag))

    retry = await client.create("documents", b"{}", resource_id="d", request_id="create-1")
    assert outcome(retry) == outcome(first)
    assert ledger_revision() == 2


@pytest.mark.parametrize(
    "change",
    [
        {"content": b'{"a": 2}'},
        {"patch": (MERGE, b'{"b": 2}')},
        {"patch": (JSON_PATCH, b'[{"op": "add", "path": "/b", "value": 2}]')},
    ],
    ids=["content", "merge patch", "json patch"],
)
async def test_update_retry_returns_the_first_outcome_even_once_its_etag_is_stale(
    client: LedgerClient, ledger_revision: Callable[[], int], change: dict[str, Any]
) -> None:
    created = await client.create("documents", b'{"a": 1}', resource_id="d")
    pre = precondition(etag=created.etag)

    def update(request_id: str = "update-1", **other: Any) -> Awaitable[pb.Resource]:
        spec = other or change
        if "content" in spec:
            return client.replace("documents/d", spec["content"], precondition=pre,
                                  request_id=request_id)
        media_type, document = spec["patch"]
        return client.patch("documents/d", document, media_type=media_type, precondition=pre,
                            request_id=request_id)

    first = await update()
    assert first.version == 2
    # The etag in the retry is now stale: the replay is found before the precondition is checked.
    retry = await update()
    assert retry == first
    assert ledger_revision() == 2

    # Still so after somebody else wrote.
    v3 = await client.replace("documents/d", b"{}", precondition=precondition(etag=first.etag))
    assert outcome(await update()) == outcome(first)
    assert ledger_revision() == 3
    # The same request without the id is a stale write.
    error = await refused(update(request_id=""), grpc.StatusCode.ABORTED, "VERSION_MISMATCH")
    assert error.current_etag == v3.etag
    # The same id with a different body is refused, whatever the body.
    for other in ({"content": b'{"a": 3}'}, {"patch": (MERGE, b'{"c": 3}')},
                  {"patch": (JSON_PATCH, b'[{"op": "add", "path": "/b", "value": 3}]')}):
        await key_reused(update(**other))
    await key_reused(client.replace("documents/d", b'{"a": 2}', precondition=precondition(
        version=1), request_id="update-1"))
    await key_reused(client.replace("documents/d", b'{"a": 2}', precondition=pre,
                                    request_id="update-1", reason="another reason"))
    assert ledger_revision() == 3


async def test_delete_retry_returns_the_tombstone(
    client: LedgerClient, ledger_revision: Callable[[], int]
) -> None:
    created = await client.create("documents", b"{}", resource_id="d")
    tombstone = await client.delete("documents/d", precondition=precondition(etag=created.etag),
                                    request_id="delete-1")
    retry = await client.delete("documents/d", precondition=precondition(etag=created.etag),
                                request_id="delete-1")

    assert retry == tombstone
    assert retry.deleted
    assert ledger_revision() == 2
    # Without the id, the resource is simply gone.
    await refused(client.delete("documents/d", precondition=precondition(etag=created.etag)),
                  grpc.StatusCode.NOT_FOUND, "NOT_FOUND")
    await key_reused(client.delete("documents/d", precondition=precondition(version=1),
                                   request_id="delete-1"))
    # Recreated, the name is live again; the retry still answers with the tombstone.
    again = await client.create("documents", b"{}", resource_id="d")
    assert outcome(await client.delete("documents/d", precondition=precondition(
        etag=created.etag), request_id="delete-1")) == outcome(tombstone)
    assert (await client.get("documents/d")) == again
    assert ledger_revision() == 3


async def test_request_ids_are_scoped_to_the_resource_and_the_rpc(
    client: LedgerClient, ledger_revision: Callable[[], int]
) -> None:
    a = await client.create("documents", b"{}", resource_id="a", request_id="same")
    b = await client.create("documents", b"{}", resource_id="b", request_id="same")
    assert (a.version, b.version) == (1, 1)
    # On documents/a, "same" already names its create: an update with it is another request.
    await key_reused(client.replace("documents/a", b"[]", precondition=precondition(etag=a.etag),
                                    request_id="same"))
    assert ledger_revision() == 2


async def test_a_failed_write_does_not_record_its_request_id(
    client: LedgerClient, ledger_revision: Callable[[], int]
) -> None:
    created = await client.create("documents", b'{"a": 1}', resource_id="d")
    v2 = await client.replace("documents/d", b'{"a": 2}', precondition=precondition(version=1))

    # First attempt fails: stale etag.
    error = await refused(client.replace("documents/d", b'{"a": 3}',
                                         precondition=precondition(etag=created.etag),
                                         request_id="retry-me"),
                          grpc.StatusCode.ABORTED, "VERSION_MISMATCH")
    assert error.current_etag == v2.etag
    # Other failures do not record it either.
    await refused(client.replace("documents/d", b'{"a": 3}', precondition=None,
                                 request_id="retry-me"),
                  grpc.StatusCode.FAILED_PRECONDITION, "PRECONDITION_REQUIRED")
    await refused(client.patch("documents/d", b'[{"op": "test", "path": "/a", "value": 9}]',
                               media_type=JSON_PATCH, precondition=precondition(etag=v2.etag),
                               request_id="retry-me"),
                  grpc.StatusCode.FAILED_PRECONDITION, "PATCH_CONFLICT")
    assert ledger_revision() == 2

    # The corrected request may reuse the id, and is then itself replayed.
    fixed = await client.replace("documents/d", b'{"a": 3}',
                                 precondition=precondition(etag=v2.etag), request_id="retry-me")
    assert fixed.version == 3
    again = await client.replace("documents/d", b'{"a": 3}',
                                 precondition=precondition(etag=v2.etag), request_id="retry-me")
    assert again == fixed
    assert ledger_revision() == 3


async def test_a_failed_create_does_not_record_its_request_id(
    client: LedgerClient, ledger_revision: Callable[[], int]
) -> None:
    existing = await client.create("documents", b"{}", resource_id="d")
    await refused(client.create("documents", b"[]", resource_id="d", request_id="c-1"),
                  grpc.StatusCode.ALREADY_EXISTS, "ALREADY_EXISTS")
    await client.delete("documents/d", precondition=precondition(etag=existing.etag))

    recreated = await client.create("documents", b"[]", resource_id="d", request_id="c-1")
    assert recreated.version == 3
    assert await client.create("documents", b"[]", resource_id="d", request_id="c-1") == recreated
    assert ledger_revision() == 3
