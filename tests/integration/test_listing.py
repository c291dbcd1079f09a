"""ListResources (direct children, current, live, by name, paged) and ListVersions (oldest first,
tombstones included, paged, content only on request)."""

from __future__ import annotations

import grpc
import pytest

from casledger.service.api.casledger.v1 import ledger_pb2 as pb
from casledger.service.client import LedgerCallError, LedgerClient, precondition


async def all_pages(client: LedgerClient, parent: str, page_size: int
                    ) -> list[pb.ListResourcesResponse]:
    pages = [await client.list(parent, page_size=page_size)]
    while pages[-1].next_page_token:
        assert len(pages) < 100, "the tokens do not come to an end"
        pages.append(await client.list(parent, page_size=page_size,
                                       page_token=pages[-1].next_page_token))
    return pages


async def test_list_returns_direct_children_current_and_live_by_name(
    client: LedgerClient,
) -> None:
    # Created out of order; ids that sort differently as text and as numbers.
    for resource_id in ("b", "a10", "a2", "C", "a-1"):
        await client.create("documents", b'{"v": 1}', resource_id=resource_id)
    updated = await client.replace("documents/a2", b'{"v": 2}',
                                   precondition=precondition(version=1))
    gone = await client.create("documents", b"{}", resource_id="gone")
    await client.delete("documents/gone", precondition=precondition(etag=gone.etag))
    back = await client.create("documents", b"{}", resource_id="back")
    await client.delete("documents/back", precondition=precondition(etag=back.etag))
    back = await client.create("documents", b'{"v": 3}', resource_id="back")
    # Not direct children of `documents`, or not in it at all.
    await client.create("documents/b/notes", b"{}", resource_id="n1")
    await client.create("documentsX", b"{}", resource_id="a")
    await client.create("docs", b"{}", resource_id="a")

    listed = await client.list("documents")

    assert [r.name for r in listed.resources] == [
        "documents/C", "documents/a-1", "documents/a10", "documents/a2", "documents/b",
        "documents/back",
    ]
    assert listed.next_page_token == ""
    current = {r.name: r for r in listed.resources}
    assert current["documents/a2"] == updated
    assert current["documents/back"] == back
    assert back.version == 3
    assert all(not r.deleted for r in listed.resources)


async def test_list_pages_chain_to_an_empty_token(client: LedgerClient) -> None:
    names = [f"documents/d{i}" for i in range(5)]
    for name in reversed(names):
        await client.create("documents", b"{}", resource_id=name.split("/")[1])

    pages = await all_pages(client, "documents", page_size=2)

    assert [[r.name for r in page.resources] for page in pages] == [
        names[0:2], names[2:4], names[4:5]
    ]
    assert all(page.next_page_token for page in pages[:-1])
    assert pages[-1].next_page_token == ""
    # Exactly a page's worth: no empty trailing page, however the last page is found.
    four = await all_pages(client, "documents", page_size=5)
    assert [len(page.resources) for page in four] == [5]
    assert [len(p.resources) for p in await all_pages(client, "documents", page_size=1)] == [1] * 5


async def test_list_pages_stay_consistent_across_writes(client: LedgerClient) -> None:
    for i in range(4):
        await client.create("documents", b"{}", resource_id=f"d{i}")
    first = await client.list("documents", page_size=2)
    # A resource created before the cursor, one after it, one deleted after it.
    await client.create("documents", b"{}", resource_id="a")
    await client.create("documents", b"{}", resource_id="e")
    await client.delete("documents/d3", precondition=precondition(version=1))

    second = await client.list("documents", page_size=10, page_token=first.next_page_token)

    assert [r.name for r in first.resources] == ["documents/d0", "documents/d1"]
    assert [r.name for r in second.resources] == ["documents/d2", "documents/e"]
    assert second.next_page_token == ""


async def test_list_nested_collections(client: LedgerClient) -> None:
    await client.create("projects", b"{}", resource_id="p1")
    await client.create("projects/p1/notes", b"[1]", resource_id="n2")
    await client.create("projects/p1/notes", b"[2]", resource_id="n1")
    await client.create("projects/p1/notes/n1/comments", b"{}", resource_id="c1")
    await client.create("projects/p2/notes", b"{}", resource_id="n1")

    notes = await client.list("projects/p1/notes")
    comments = await client.list("projects/p1/notes/n1/comments")
    projects = await client.list("projects")

    assert [r.name for r in notes.resources] == ["projects/p1/notes/n1", "projects/p1/notes/n2"]
    assert [r.name for r in comments.resources] == ["projects/p1/notes/n1/comments/c1"]
    # p2 was never created itself: only its notes were.
    assert [r.name for r in projects.resources] == ["projects/p1"]
    assert (await client.list("projects/p3/notes")).resources == []


async def test_list_of_an_empty_collection_is_empty(client: LedgerClient) -> None:
    listed = await client.list("nothing")
    assert list(listed.resources) == []
    assert listed.next_page_token == ""


async def test_list_page_size_is_capped(client: LedgerClient) -> None:
    for i in range(3):
        await client.create("documents", b"{}", resource_id=f"d{i}")
    huge = await client.list("documents", page_size=2**31 - 1)
    assert len(huge.resources) == 3
    assert huge.next_page_token == ""


# --- ListVersions -----------------------------------------------------------------------------


async def write_history(client: LedgerClient) -> list[pb.Resource]:
    """documents/d: create, update, delete, recreate, update: five versions, one a tombstone."""
    v1 = await client.create("documents", b'{"n": 1}', resource_id="d", reason="one")
    v2 = await client.replace("documents/d", b'{"n": 2}', precondition=precondition(etag=v1.etag))
    await client.create("documents", b"{}", resource_id="other")  # interleaved
    v3 = await client.delete("documents/d", precondition=precondition(etag=v2.etag))
    v4 = await client.create("documents", b'{"n": 4}', resource_id="d")
    v5 = await client.replace("documents/d", b"plain", content_type="text/plain",
                              precondition=precondition(etag=v4.etag))
    return [v1, v2, v3, v4, v5]


def without_content(resource: pb.Resource) -> pb.Resource:
    copy = pb.Resource()
    copy.CopyFrom(resource)
    copy.content = b""
    return copy


async def test_list_versions_oldest_first_with_tombstones(client: LedgerClient) -> None:
    history = await write_history(client)

    listed = await client.versions("documents/d", include_content=True)

    assert list(listed.versions) == history
    assert [v.version for v in listed.versions] == [1, 2, 3, 4, 5]
    assert [v.revision for v in listed.versions] == [1, 2, 4, 5, 6]
    assert [v.deleted for v in listed.versions] == [False, False, True, False, False]
    assert listed.next_page_token == ""


async def test_list_versions_without_content_keeps_sizes(client: LedgerClient) -> None:
    history = await write_history(client)

    listed = await client.versions("documents/d")

    assert [v.content for v in listed.versions] == [b""] * 5
    assert [v.size_bytes for v in listed.versions] == [8, 8, 0, 8, 5]
    assert list(listed.versions) == [without_content(v) for v in history]


async def test_list_versions_pages(client: LedgerClient) -> None:
    history = await write_history(client)

    pages = [await client.versions("documents/d", page_size=2, include_content=True)]
    while pages[-1].next_page_token:
        assert len(pages) < 10
        pages.append(await client.versions("documents/d", page_size=2, include_content=True,
                                           page_token=pages[-1].next_page_token))

    assert [[v.version for v in page.versions] for page in pages] == [[1, 2], [3, 4], [5]]
    assert [v for page in pages for v in page.versions] == history
    assert pages[-1].next_page_token == ""
    assert [v async for v in client.history("documents/d", include_content=True)] == history


async def test_list_versions_of_a_deleted_resource_still_works(client: LedgerClient) -> None:
    created = await client.create("documents", b"{}", resource_id="d")
    tombstone = await client.delete("documents/d", precondition=precondition(etag=created.etag))

    listed = await client.versions("documents/d", include_content=True)
    assert list(listed.versions) == [created, tombstone]


async def test_list_versions_of_a_name_never_written_is_not_found(client: LedgerClient) -> None:
    await client.create("documents", b"{}", resource_id="d")
    for name in ("documents/nope", "documents/d/notes/n"):
        with pytest.raises(LedgerCallError) as info:
            await client.versions(name)
        assert (info.value.code, info.value.reason) == (grpc.StatusCode.NOT_FOUND, "NOT_FOUND")
