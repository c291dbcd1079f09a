"""Every RPC against a real server: versions, tombstones, recreation, exact content, revisions and
the hash chain."""

from __future__ import annotations

import itertools
import re
from collections.abc import Awaitable, Callable

import pytest

from casledger.service.api.casledger.v1 import ledger_pb2 as pb
from casledger.service.client import LedgerCallError, LedgerClient, precondition
from casledger.service.model import Version, compute_hash

STRONG_ETAG = re.compile(r'"[\x21\x23-\x7e]+"')
SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def us(resource: pb.Resource, field: str) -> int:
    stamp = getattr(resource, field)
    return int(stamp.seconds) * 1_000_000 + int(stamp.nanos) // 1000


async def test_create_starts_at_version_1(client: LedgerClient) -> None:
    created = await client.create("documents", b'{"title": "a"}', resource_id="a",
                                  reason="first draft")

    assert created.name == "documents/a"
    assert (created.version, created.revision) == (1, 1)
    assert created.content == b'{"title": "a"}'
    assert created.content_type == "application/json"
    assert created.size_bytes == len(b'{"title": "a"}')
    assert not created.deleted
    assert STRONG_ETAG.fullmatch(created.etag)
    assert created.actor == "anonymous"
    assert created.reason == "first draft"
    assert us(created, "create_time") == us(created, "update_time") > 0
    assert SHA256_HEX.fullmatch(created.hash)
    assert created.previous_hash == ""
    assert created.ledger_previous_hash == ""
    assert await client.get("documents/a") == created


async def test_content_type_defaults_to_json(client: LedgerClient) -> None:
    created = await client.create("documents", b"[1]", resource_id="a", content_type="")
    updated = await client.replace("documents/a", b"[2]", content_type="",
                                   precondition=precondition(etag=created.etag))

    assert created.content_type == updated.content_type == "application/json"
    assert (await client.get("documents/a")).content_type == "application/json"


async def test_json_content_comes_back_byte_for_byte(client: LedgerClient) -> None:
    # Odd whitespace, key order, escapes and a raw non-ASCII character: never re-serialized.
    odd = b'{ "z" :1 ,\n\t"a" : [ 1,2.50 , {"\\u00e9":null} ] , "m":"caf\xc3\xa9" }\r\n'
    created = await client.create("documents", odd, resource_id="odd")
    updated = await client.replace("documents/odd", odd + b" ",
                                   precondition=precondition(version=1))

    assert created.content == odd
    assert (await client.get("documents/odd", version=1)).content == odd
    assert updated.content == odd + b" "
    assert (await client.get("documents/odd")).content == odd + b" "


@pytest.mark.parametrize(
    ("content_type", "stored_type", "content"),
    [
        ("text/plain", "text/plain", b"not { json\n\x00 \xff\xfe at all"),
        ("Text/Plain; charset=UTF-8", "text/plain;charset=UTF-8", "héllo\r\n".encode()),
        ("application/octet-stream", "application/octet-stream", bytes(range(256)) * 4),
        ("application/octet-stream", "application/octet-stream", b""),
    ],
)
async def test_other_media_types_come_back_byte_for_byte(
    client: LedgerClient, content_type: str, stored_type: str, content: bytes
) -> None:
    created = await client.create("blobs", content, resource_id="b", content_type=content_type)
    fetched = await client.get("blobs/b")

    assert created.content == fetched.content == content
    assert created.content_type == fetched.content_type == stored_type
    assert fetched.size_bytes == len(content)


async def test_every_write_adds_one_version(client: LedgerClient) -> None:
    v1 = await client.create("documents", b'{"a": 1}', resource_id="d")
    v2 = await client.replace("documents/d", b'{"a": 2}', precondition=precondition(etag=v1.etag),
                              reason="replace")
    v3 = await client.patch("documents/d", b'{"b": true}',
                            media_type="application/merge-patch+json",
                            precondition=precondition(version=2))
    v4 = await client.patch("documents/d", b'[{"op": "replace", "path": "/a", "value": 4}]',
                            media_type="application/json-patch+json",
                            precondition=precondition(exists=True))

    versions = [v1, v2, v3, v4]
    assert [v.version for v in versions] == [1, 2, 3, 4]
    assert [v.revision for v in versions] == [1, 2, 3, 4]
    assert len({v.etag for v in versions}) == 4
    assert {us(v, "create_time") for v in versions} == {us(v1, "create_time")}
    times = [us(v, "update_time") for v in versions]
    assert times == sorted(set(times))
    assert v2.reason == "replace"
    assert v3.content == b'{"a":2,"b":true}'
    assert v4.content == b'{"a":4,"b":true}'
    assert v4.content_type == "application/json"
    for v in versions:
        assert await client.get("documents/d", version=v.version) == v
    assert await client.get("documents/d") == v4


async def test_a_patch_keeps_the_media_type_of_the_content(client: LedgerClient) -> None:
    created = await client.create("documents", b'{"a": [1]}', resource_id="d",
                                  content_type="application/vnd.x+json; v=2")
    patched = await client.patch("documents/d", b'[{"op": "add", "path": "/a/-", "value": 2}]',
                                 media_type="application/json-patch+json",
                                 precondition=precondition(etag=created.etag))

    assert created.content_type == patched.content_type == "application/vnd.x+json;v=2"
    assert patched.content == b'{"a":[1,2]}'


async def test_delete_writes_a_tombstone(client: LedgerClient) -> None:
    v1 = await client.create("documents", b"{}", resource_id="d")
    v2 = await client.replace("documents/d", b'{"x": 1}', precondition=precondition(version=1))
    tombstone = await client.delete("documents/d", precondition=precondition(etag=v2.etag),
                                    reason="obsolete")

    assert tombstone.name == "documents/d"
    assert tombstone.deleted
    assert (tombstone.version, tombstone.revision) == (3, 3)
    assert tombstone.content == b""
    assert tombstone.size_bytes == 0
    assert tombstone.reason == "obsolete"
    assert tombstone.previous_hash == v2.hash
    assert us(tombstone, "create_time") == us(v1, "create_time")
    assert STRONG_ETAG.fullmatch(tombstone.etag)

    with pytest.raises(LedgerCallError) as info:
        await client.get("documents/d")
    assert info.value.reason == "NOT_FOUND"
    assert info.value.metadata["deleted_at_version"] == "3"
    # Read explicitly, the tombstone is a version like any other; the past stays readable.
    assert await client.get("documents/d", version=3) == tombstone
    assert (await client.get("documents/d", version=2)).content == b'{"x": 1}'


async def test_recreate_continues_the_numbering_and_old_etags_never_match(
    client: LedgerClient, ledger_revision: Callable[[], int]
) -> None:
    v1 = await client.create("documents", b'{"same": true}', resource_id="d")
    v2 = await client.replace("documents/d", b'{"same": false}',
                              precondition=precondition(etag=v1.etag))
    await client.delete("documents/d", precondition=precondition(etag=v2.etag))
    again = await client.create("documents", b'{"same": true}', resource_id="d")

    assert (again.version, again.revision) == (4, 4)
    assert not again.deleted
    assert again.content == v1.content
    assert us(again, "create_time") == us(again, "update_time") > us(v1, "create_time")
    assert again.etag not in {v1.etag, v2.etag}
    assert (await client.get("documents/d")).version == 4

    # No ABA: ETags read before the delete are refused by the new incarnation, even v1's, whose
    # content is the same.
    for stale in (v1.etag, v2.etag):
        for attempt in (
            client.replace("documents/d", b"{}", precondition=precondition(etag=stale)),
            client.delete("documents/d", precondition=precondition(etag=stale)),
        ):
            with pytest.raises(LedgerCallError) as info:
                await attempt
            assert info.value.reason == "VERSION_MISMATCH"
            assert info.value.current_version == 4
            assert info.value.current_etag == again.etag
    assert ledger_revision() == 4

    v5 = await client.replace("documents/d", b"[]", precondition=precondition(etag=again.etag))
    assert v5.version == 5
    assert us(v5, "create_time") == us(again, "create_time")


async def test_server_generates_ids_when_none_is_given(client: LedgerClient) -> None:
    created = [await client.create("documents", str(i).encode()) for i in range(20)]

    assert len({c.name for c in created}) == 20
    for resource in created:
        collection, resource_id = resource.name.split("/")
        assert collection == "documents"
        assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._~-]{0,127}", resource_id)
        assert resource.version == 1
        assert await client.get(resource.name) == resource
    # Generated ids list in creation order.
    listed = await client.list("documents")
    assert [r.name for r in listed.resources] == [c.name for c in created]
    nested = await client.create("projects/p1/notes", b"{}")
    assert nested.name.startswith("projects/p1/notes/")
    assert len(nested.name.split("/")) == 4


async def test_revisions_are_ledger_wide_and_gap_free(client: LedgerClient) -> None:
    writes: list[pb.Resource] = []
    for name in ("a", "b", "c"):
        writes.append(await client.create("documents", b"0", resource_id=name))
    writes.append(await client.replace("documents/b", b"1", precondition=precondition(version=1)))
    with pytest.raises(LedgerCallError):  # a refused write takes no revision
        await client.replace("documents/a", b"1", precondition=precondition(version=9))
    writes.append(await client.delete("documents/a", precondition=precondition(version=1)))
    writes.append(await client.create("projects/p1/notes", b"0", resource_id="n"))
    writes.append(await client.create("documents", b"2", resource_id="a"))

    assert [w.revision for w in writes] == list(range(1, 8))
    assert [w.version for w in writes] == [1, 1, 1, 2, 2, 1, 3]


async def test_hash_chains_link_versions_and_revisions(
    client: LedgerClient, collect: Callable[..., Awaitable[list[pb.WatchEvent]]]
) -> None:
    a1 = await client.create("documents", b"1", resource_id="a")
    b1 = await client.create("documents", b"1", resource_id="b")
    a2 = await client.replace("documents/a", b"2", precondition=precondition(etag=a1.etag))
    b2 = await client.delete("documents/b", precondition=precondition(etag=b1.etag))
    a3 = await client.patch("documents/a", b"3", media_type="application/merge-patch+json",
                            precondition=precondition(etag=a2.etag))
    b3 = await client.create("documents", b"1", resource_id="b")
    ledger = [a1, b1, a2, b2, a3, b3]

    assert len({v.hash for v in ledger}) == len(ledger)
    for v in ledger:
        assert SHA256_HEX.fullmatch(v.hash)
    # Each resource's chain: previous_hash is the hash of its previous version.
    for chain in ([a1, a2, a3], [b1, b2, b3]):
        assert chain[0].previous_hash == ""
        for before, after in itertools.pairwise(chain):
            assert after.previous_hash == before.hash
    # The ledger's chain: ledger_previous_hash is the hash of the previous revision.
    assert ledger[0].ledger_previous_hash == ""
    for before, after in itertools.pairwise(ledger):
        assert after.ledger_previous_hash == before.hash
    # Every read path reports the same chain.
    history = [v async for v in client.history("documents/a")]
    assert [(v.hash, v.previous_hash) for v in history] == [
        (v.hash, v.previous_hash) for v in (a1, a2, a3)
    ]
    assert [await client.get(v.name, version=v.version) for v in ledger] == ledger
    assert [event.resource for event in await collect(client, until=6)] == ledger
    # What an auditor does: recompute each hash from the fields the API returns.
    for v in await collect(client, until=6):
        assert compute_hash(as_version(v.resource)).hex() == v.resource.hash


def as_version(resource: pb.Resource) -> Version:
    return Version(
        name=resource.name, version=resource.version, revision=resource.revision,
        content=resource.content, content_type=resource.content_type,
        create_time_us=us(resource, "create_time"), update_time_us=us(resource, "update_time"),
        actor=resource.actor, reason=resource.reason, deleted=resource.deleted,
        previous_hash=bytes.fromhex(resource.previous_hash),
        ledger_previous_hash=bytes.fromhex(resource.ledger_previous_hash), hash=b"",
        size=resource.size_bytes,
    )
