"""Unit tests for service/model.py: names, plan_write, hashes, ETags, preconditions, tokens."""

from __future__ import annotations

import base64
import dataclasses
import itertools
import json
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from casledger.service import errors, model
from casledger.service.model import (
    EMPTY_TAIL,
    MAX_NAME_LENGTH,
    MAX_SEGMENTS,
    US_PER_SECOND,
    Head,
    PatchSpec,
    Precondition,
    PreconditionKind,
    Tail,
    Version,
    Write,
    WriteKind,
    compute_hash,
    decode_page_token,
    encode_page_token,
    etag_for,
    matches_prefix,
    new_resource_id,
    page_size,
    plan_write,
    validate_collection,
    validate_name,
    validate_prefix,
)
from casledger.service.patch import JSON_PATCH, MERGE_PATCH

# No example database: it would write .hypothesis/ into the working tree.
FAST = settings(max_examples=200, deadline=None, database=None)

LIMIT = 1 << 20
S = 1_700_000_000  # a whole second, well after the epoch
T0 = S * US_PER_SECOND
SEGMENT_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._~-"


# --- a tiny in-memory ledger: plans writes exactly as a store does -------------------------------


class Ledger:
    """Appends what plan_write decides; head and tail read back as a store would."""

    def __init__(self) -> None:
        self.versions: list[Version] = []

    def head(self, name: str) -> Head | None:
        mine = [v for v in self.versions if v.name == name]
        if not mine:
            return None
        return Head(latest=mine[-1],
                    previous_update_time_us=mine[-2].update_time_us if len(mine) > 1 else None)

    def tail(self) -> Tail:
        if not self.versions:
            return EMPTY_TAIL
        last = self.versions[-1]
        return Tail(revision=last.revision, hash=last.hash, update_time_us=last.update_time_us)

    def plan(self, write: Write, now_us: int, *, limit: int = LIMIT) -> Version:
        return plan_write(write, self.head(write.name), self.tail(), now_us, limit=limit)

    def apply(self, write: Write, now_us: int, *, limit: int = LIMIT) -> Version:
        version = self.plan(write, now_us, limit=limit)
        self.versions.append(version)
        return version


def create(name: str, content: bytes = b'{"a":1}', content_type: str = "application/json",
           **kw: Any) -> Write:
    return Write(kind=WriteKind.CREATE, name=name, content=content, content_type=content_type,
                 **kw)


def update(name: str, content: bytes = b'{"a":2}', *, pre: Precondition | None,
           content_type: str = "application/json", **kw: Any) -> Write:
    return Write(kind=WriteKind.UPDATE, name=name, content=content, content_type=content_type,
                 precondition=pre, **kw)


def patch(name: str, media_type: str, document: bytes, *, pre: Precondition | None) -> Write:
    return Write(kind=WriteKind.UPDATE, name=name, patch=PatchSpec(media_type, document),
                 precondition=pre)


def delete(name: str, *, pre: Precondition | None) -> Write:
    return Write(kind=WriteKind.DELETE, name=name, precondition=pre)


def version_of(v: Version) -> Precondition:
    return Precondition.of_version(v.version)


# --- names -------------------------------------------------------------------------------------

segments = st.builds(lambda first, rest: first + rest, st.sampled_from(SEGMENT_CHARS[:62]),
                     st.text(alphabet=SEGMENT_CHARS, max_size=20))
resource_names = st.lists(st.tuples(segments, segments), min_size=1, max_size=MAX_SEGMENTS // 2
                          ).map(lambda pairs: "/".join(f"{c}/{r}" for c, r in pairs))
collection_paths = st.tuples(resource_names | st.just(""), segments).map(
    lambda t: f"{t[0]}/{t[1]}" if t[0] and t[0].count("/") + 2 <= MAX_SEGMENTS else t[1]
)
bad_chars = st.characters().filter(lambda c: c not in SEGMENT_CHARS and c != "/")


@pytest.mark.parametrize("name", [
    "documents/123",
    "projects/p1/notes/n7",
    "a/b",
    "A.b~c-d_e/0",
    "0/0",
    "documents/" + "x" * 128,
    "/".join(["s"] * MAX_SEGMENTS),
])
def test_valid_names(name: str) -> None:
    assert validate_name(name) == name


@pytest.mark.parametrize("name", [
    "",
    "documents",
    "documents/",
    "/documents/1",
    "documents//1",
    "documents/1/",
    "documents/-1",
    "documents/.hidden",
    "documents/_x",
    "documents/~x",
    "documents/a b",
    "documents/a\nb",
    "documents/é",
    "documents/a%2Fb",
    "documents/a:b",
    "projects/p1/notes",
    "documents/" + "x" * 129,
    "/".join(["s"] * (MAX_SEGMENTS + 2)),
])
def test_invalid_names(name: str) -> None:
    with pytest.raises(errors.InvalidName) as caught:
        validate_name(name)
    assert caught.value.field == "name"


@pytest.mark.parametrize("parent", ["documents", "projects/p1/notes", "x" * 128,
                                    "/".join(["s"] * (MAX_SEGMENTS - 1))])
def test_valid_collections(parent: str) -> None:
    assert validate_collection(parent) == parent


@pytest.mark.parametrize("parent", ["", "documents/1", "documents/", "/documents", "doc uments",
                                    "/".join(["s"] * (MAX_SEGMENTS + 1))])
def test_invalid_collections(parent: str) -> None:
    with pytest.raises(errors.InvalidName) as caught:
        validate_collection(parent)
    assert caught.value.field == "parent"


@pytest.mark.parametrize("prefix", ["", "documents", "documents/1", "projects/p1/notes"])
def test_valid_prefixes(prefix: str) -> None:
    assert validate_prefix(prefix) == prefix


@pytest.mark.parametrize("prefix", ["documents/", "/documents", "a b", "documents//1", "-x"])
def test_invalid_prefixes(prefix: str) -> None:
    with pytest.raises(errors.InvalidName) as caught:
        validate_prefix(prefix)
    assert caught.value.field == "prefix"


def test_name_field_is_reported_as_given() -> None:
    with pytest.raises(errors.InvalidName) as caught:
        validate_name("x/a b", field="resource_id")
    assert caught.value.field == "resource_id"
    assert caught.value.metadata() == {"field": "resource_id"}


def test_name_length_limit_is_512_characters() -> None:
    # Four segments of 128, 128, 128 and 125 characters plus three slashes: exactly 512.
    longest = "/".join(["a" * 128, "b" * 128, "c" * 128, "d" * 125])
    assert len(longest) == MAX_NAME_LENGTH
    assert validate_name(longest) == longest
    with pytest.raises(errors.InvalidName, match="512"):
        validate_name(longest + "d")


def test_segment_limit_is_16() -> None:
    assert validate_name("/".join(["s"] * 16))
    with pytest.raises(errors.InvalidName, match="16"):
        validate_name("/".join(["s"] * 18))
    assert validate_collection("/".join(["s"] * 15))
    with pytest.raises(errors.InvalidName, match="16"):
        validate_collection("/".join(["s"] * 17))
    with pytest.raises(errors.InvalidName):
        validate_prefix("/".join(["s"] * 17))


def test_segment_length_limit_is_128() -> None:
    assert validate_name("d/" + "x" * 128)
    with pytest.raises(errors.InvalidName):
        validate_name("d/" + "x" * 129)
    with pytest.raises(errors.InvalidName):
        validate_collection("x" * 129)


@FAST
@given(resource_names)
def test_even_segment_paths_are_names_not_collections(name: str) -> None:
    assert validate_name(name) == name
    assert validate_prefix(name) == name
    with pytest.raises(errors.InvalidName):
        validate_collection(name)


@FAST
@given(collection_paths)
def test_odd_segment_paths_are_collections_not_names(parent: str) -> None:
    assert validate_collection(parent) == parent
    assert validate_prefix(parent) == parent
    with pytest.raises(errors.InvalidName):
        validate_name(parent)


@FAST
@given(resource_names, bad_chars, st.data(), st.sampled_from(["name", "resource_id", "x.y"]))
def test_any_foreign_character_in_a_name_is_refused(
    name: str, bad: str, data: st.DataObject, field: str
) -> None:
    at = data.draw(st.integers(0, len(name)))
    with pytest.raises(errors.InvalidName) as caught:
        validate_name(name[:at] + bad + name[at:], field=field)
    assert caught.value.field == field


@FAST
@given(collection_paths, bad_chars, st.data(), st.sampled_from(["parent", "prefix"]))
def test_any_foreign_character_in_a_collection_or_prefix_is_refused(
    parent: str, bad: str, data: st.DataObject, field: str
) -> None:
    at = data.draw(st.integers(0, len(parent)))
    broken = parent[:at] + bad + parent[at:]
    with pytest.raises(errors.InvalidName) as caught:
        validate_collection(broken, field=field)
    assert caught.value.field == field
    with pytest.raises(errors.InvalidName) as caught:
        validate_prefix(broken, field=field)
    assert caught.value.field == field


@pytest.mark.parametrize(("name", "prefix", "expected"), [
    ("documents/1", "", True),
    ("documents/1", "documents", True),
    ("documents/1", "documents/1", True),
    ("documents/1/notes/2", "documents/1", True),
    ("documents/1/notes/2", "documents/1/notes", True),
    ("documentsX/1", "documents", False),
    ("documents/10", "documents/1", False),
    ("documents/1", "documents/1/notes", False),
    ("documents", "documents/1", False),
    ("projects/p/documents/1", "documents", False),
])
def test_matches_prefix_on_whole_segments(name: str, prefix: str, expected: bool) -> None:
    assert matches_prefix(name, prefix) is expected


@FAST
@given(resource_names, st.data())
def test_matches_prefix_is_a_leading_run_of_segments(name: str, data: st.DataObject) -> None:
    parts = name.split("/")
    prefix = data.draw(st.one_of(
        st.integers(0, len(parts)).map(lambda k: "/".join(parts[:k])),  # whole segments
        st.integers(1, len(name)).map(lambda i: name[:i].rstrip("/")),  # any cut
        resource_names | collection_paths,
    ))
    wanted = prefix.split("/") if prefix else []
    assert matches_prefix(name, prefix) is (parts[: len(wanted)] == wanted)


def test_new_resource_id_is_a_valid_segment() -> None:
    for _ in range(100):
        rid = new_resource_id()
        assert validate_name(f"documents/{rid}") == f"documents/{rid}"


def test_new_resource_ids_sort_in_creation_order() -> None:
    ids = [new_resource_id() for _ in range(5000)]
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)


def test_new_resource_ids_sort_in_creation_order_on_a_stuck_or_stepped_back_clock(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    now = time.time_ns()
    clock = itertools.chain([now] * 50, itertools.repeat(now - 3_600 * 10**9))
    monkeypatch.setattr(time, "time_ns", lambda: next(clock))
    ids = [new_resource_id() for _ in range(100)]
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)


# --- plan_write: versions, revisions, times, the hash chain -------------------------------------


def test_create_writes_version_1() -> None:
    ledger = Ledger()
    v = ledger.apply(create("documents/1", reason="first", actor="alice"), T0)
    assert (v.name, v.version, v.revision) == ("documents/1", 1, 1)
    assert (v.content, v.content_type, v.size) == (b'{"a":1}', "application/json", 7)
    assert v.create_time_us == v.update_time_us == T0
    assert (v.actor, v.reason, v.deleted, v.creates) == ("alice", "first", False, True)
    assert v.previous_hash == b""
    assert v.ledger_previous_hash == b""
    assert v.hash == compute_hash(v)
    assert model.verify_chain_link(v)


def test_default_actor_is_anonymous() -> None:
    assert Ledger().apply(create("documents/1"), T0).actor == model.ANONYMOUS


def test_update_adds_one_and_keeps_create_time() -> None:
    ledger = Ledger()
    v1 = ledger.apply(create("documents/1"), T0)
    v2 = ledger.apply(update("documents/1", b'{"a":2}', pre=version_of(v1)), T0 + 10)
    assert (v2.version, v2.revision) == (2, 2)
    assert v2.content == b'{"a":2}'
    assert v2.create_time_us == T0
    assert v2.update_time_us == T0 + 10
    assert not v2.creates
    assert v2.previous_hash == v1.hash
    assert v2.ledger_previous_hash == v1.hash


def test_revision_is_tail_plus_one_and_chains_to_the_tail() -> None:
    ledger = Ledger()
    a1 = ledger.apply(create("documents/a"), T0)
    b1 = ledger.apply(create("documents/b"), T0 + 1)
    a2 = ledger.apply(update("documents/a", pre=version_of(a1)), T0 + 2)
    assert [v.revision for v in ledger.versions] == [1, 2, 3]
    assert b1.previous_hash == b""  # first of its resource
    assert b1.ledger_previous_hash == a1.hash
    assert a2.version == 2
    assert a2.previous_hash == a1.hash  # the same resource's previous version
    assert a2.ledger_previous_hash == b1.hash  # the ledger's previous revision
    tail = Tail(revision=41, hash=b"\x07" * 32, update_time_us=T0)
    planned = plan_write(create("documents/c"), None, tail, T0 + 5, limit=LIMIT)
    assert planned.revision == 42
    assert planned.ledger_previous_hash == b"\x07" * 32


def test_delete_writes_a_tombstone() -> None:
    ledger = Ledger()
    v1 = ledger.apply(create("documents/1"), T0)
    v2 = ledger.apply(delete("documents/1", pre=Precondition.of_etag(v1.etag)), T0 + 5)
    assert (v2.version, v2.revision, v2.deleted) == (2, 2, True)
    assert (v2.content, v2.content_type, v2.size) == (b"", "", 0)
    assert not v2.creates
    assert v2.create_time_us == T0
    assert v2.previous_hash == v1.hash


def test_recreate_continues_numbering_and_resets_create_time() -> None:
    ledger = Ledger()
    v1 = ledger.apply(create("documents/1"), T0)
    v2 = ledger.apply(delete("documents/1", pre=version_of(v1)), T0 + 10)
    v3 = ledger.apply(create("documents/1", b'{"again":true}'), T0 + 20)
    assert (v3.version, v3.revision, v3.deleted) == (3, 3, False)
    assert v3.create_time_us == v3.update_time_us == T0 + 20
    assert v3.creates
    assert v3.previous_hash == v2.hash
    # No ABA: the recreated resource's version-1 ETag can never come back.
    assert v1.etag not in {v.etag for v in ledger.versions[1:]}
    with pytest.raises(errors.VersionMismatch):
        ledger.plan(update("documents/1", pre=Precondition.of_etag(v1.etag)), T0 + 30)
    with pytest.raises(errors.VersionMismatch):
        ledger.plan(update("documents/1", pre=version_of(v1)), T0 + 30)


@pytest.mark.parametrize("now_us", [T0 - 1_000_000, T0 - 1, T0])
def test_update_time_strictly_increases_when_the_clock_does_not(now_us: int) -> None:
    ledger = Ledger()
    v1 = ledger.apply(create("documents/1"), T0)
    v2 = ledger.apply(create("documents/2"), now_us)
    assert v2.update_time_us == T0 + 1
    assert v2.create_time_us == v2.update_time_us  # still a creating version
    v3 = ledger.apply(update("documents/1", pre=version_of(v1)), now_us)
    assert v3.update_time_us == T0 + 2
    assert v3.create_time_us == T0


@FAST
@given(st.lists(st.tuples(st.sampled_from(["documents/a", "documents/b", "notes/c"]),
                          st.sampled_from(["create", "update", "delete"]),
                          st.integers(T0 - 10**9, T0 + 10**9)),
                min_size=1, max_size=30))
def test_any_sequence_of_writes_keeps_both_chains(ops: list[tuple[str, str, int]]) -> None:
    ledger = Ledger()
    for name, op, now_us in ops:
        head = ledger.head(name)
        live = head is not None and not head.latest.deleted
        if not live:
            write = create(name)
        elif op == "update":
            assert head is not None
            write = update(name, pre=version_of(head.latest))
        elif op == "delete":
            assert head is not None
            write = delete(name, pre=Precondition.of_etag(head.latest.etag))
        else:
            with pytest.raises(errors.ResourceAlreadyExists):
                ledger.plan(create(name), now_us)
            continue
        ledger.apply(write, now_us)
    previous: dict[str, Version] = {}
    for index, v in enumerate(ledger.versions):
        assert v.revision == index + 1
        assert model.verify_chain_link(v)
        if index:
            before = ledger.versions[index - 1]
            assert v.ledger_previous_hash == before.hash
            assert v.update_time_us > before.update_time_us
        mine = previous.get(v.name)
        assert v.version == (mine.version + 1 if mine else 1)
        assert v.previous_hash == (mine.hash if mine else b"")
        previous[v.name] = v


# --- hashing and ETags -------------------------------------------------------------------------

BASE = Version(
    name="documents/1", version=3, revision=17, content=b'{"a":1}',
    content_type="application/json", create_time_us=T0, update_time_us=T0 + 5, actor="alice",
    reason="because", deleted=False, previous_hash=b"\x01" * 32,
    ledger_previous_hash=b"\x02" * 32, hash=b"", size=7,
)

COVERED_CHANGES = {
    "name": "documents/2",
    "version": 4,
    "revision": 18,
    "content_type": "application/merge-patch+json",
    "create_time_us": T0 + 1,
    "update_time_us": T0 + 6,
    "actor": "bob",
    "reason": "because!",
    "deleted": True,
    "previous_hash": b"\x01" * 31 + b"\x00",
    "ledger_previous_hash": b"\x02" * 31 + b"\x00",
    "content": b'{"a":2}',
}


def test_every_hashed_field_is_listed() -> None:
    not_covered = {"hash", "size"}
    assert set(COVERED_CHANGES) == {f.name for f in dataclasses.fields(Version)} - not_covered


@pytest.mark.parametrize(("field", "value"), list(COVERED_CHANGES.items()))
def test_compute_hash_changes_with_every_covered_field(field: str, value: object) -> None:
    assert getattr(BASE, field) != value
    assert compute_hash(dataclasses.replace(BASE, **{field: value})) != compute_hash(BASE)


@pytest.mark.parametrize("field", ["previous_hash", "ledger_previous_hash"])
def test_compute_hash_tells_an_empty_link_from_a_present_one(field: str) -> None:
    assert compute_hash(dataclasses.replace(BASE, **{field: b""})) != compute_hash(BASE)


def test_compute_hash_ignores_the_stored_hash() -> None:
    assert compute_hash(dataclasses.replace(BASE, hash=b"\xff" * 32)) == compute_hash(BASE)


@pytest.mark.parametrize(("one", "other"), [
    ({"actor": "ab", "reason": "c"}, {"actor": "a", "reason": "bc"}),
    ({"actor": "", "reason": "abc"}, {"actor": "abc", "reason": ""}),
    ({"version": 12, "revision": 3}, {"version": 1, "revision": 23}),
    ({"create_time_us": 12, "update_time_us": 3}, {"create_time_us": 1, "update_time_us": 23}),
    ({"name": "d/1", "version": 23}, {"name": "d/12", "version": 3}),
    ({"previous_hash": b"\x01\x02", "ledger_previous_hash": b"\x03"},
     {"previous_hash": b"\x01", "ledger_previous_hash": b"\x02\x03"}),
    ({"ledger_previous_hash": b"\x02{", "content": b'"a":1}'},
     {"ledger_previous_hash": b"\x02", "content": b'{"a":1}'}),
])
def test_moving_bytes_between_adjacent_fields_changes_the_hash(
    one: dict[str, Any], other: dict[str, Any]
) -> None:
    assert compute_hash(dataclasses.replace(BASE, **one)) != compute_hash(
        dataclasses.replace(BASE, **other))


@FAST
@given(st.text(min_size=1, max_size=20), st.data())
def test_moving_text_between_actor_and_reason_changes_the_hash(
    text: str, data: st.DataObject
) -> None:
    i = data.draw(st.integers(0, len(text)))
    j = data.draw(st.integers(0, len(text)).filter(lambda j: j != i))
    first = dataclasses.replace(BASE, actor=text[:i], reason=text[i:])
    second = dataclasses.replace(BASE, actor=text[:j], reason=text[j:])
    assert compute_hash(first) != compute_hash(second)


def test_etag_is_strong_quoted_and_names_the_version() -> None:
    digest = compute_hash(BASE)
    etag = etag_for(7, digest)
    assert etag.startswith('"7-')
    assert etag.endswith('"')
    assert not etag.startswith("W/")
    assert etag.count('"') == 2
    assert Precondition.of_etag(etag).etag == etag  # what we issue, we accept back
    v = dataclasses.replace(BASE, hash=digest)
    assert v.etag == etag_for(v.version, v.hash)
    assert v.current == errors.CurrentState(version=3, etag=v.etag)


def test_etag_differs_for_the_same_version_number_with_another_hash() -> None:
    one = compute_hash(BASE)
    other = compute_hash(dataclasses.replace(BASE, content=b'{"a":3}'))
    assert etag_for(3, one) != etag_for(3, other)
    assert etag_for(3, one) != etag_for(4, one)


def test_same_number_different_history_does_not_match() -> None:
    # Two ledgers (say, a restore from an old backup) reach version 2 by different writes.
    left, right = Ledger(), Ledger()
    l1 = left.apply(create("documents/1"), T0)
    r1 = right.apply(create("documents/1"), T0)
    l2 = left.apply(update("documents/1", b'{"a":"left"}', pre=version_of(l1)), T0 + 1)
    right.apply(update("documents/1", b'{"a":"right"}', pre=version_of(r1)), T0 + 1)
    assert l2.version == 2
    with pytest.raises(errors.VersionMismatch):
        right.plan(update("documents/1", pre=Precondition.of_etag(l2.etag)), T0 + 2)


# --- the order of checks -----------------------------------------------------------------------


def live_ledger() -> tuple[Ledger, Version]:
    ledger = Ledger()
    return ledger, ledger.apply(create("documents/1"), T0)


def tombstoned_ledger() -> tuple[Ledger, Version]:
    ledger, v1 = live_ledger()
    return ledger, ledger.apply(delete("documents/1", pre=version_of(v1)), T0 + 1)


def test_create_on_a_live_resource_is_already_exists_with_current() -> None:
    ledger, v1 = live_ledger()
    with pytest.raises(errors.ResourceAlreadyExists) as caught:
        ledger.plan(create("documents/1"), T0 + 1)
    assert caught.value.current == v1.current
    assert caught.value.metadata() == {
        "name": "documents/1", "current_version": "1", "current_etag": v1.etag}


@pytest.mark.parametrize("pre", [None, Precondition.of_version(1), Precondition.of_exists(True),
                                 Precondition.of_etag('"1-00"')])
def test_delete_of_an_absent_resource_is_not_found_whatever_it_carries(
    pre: Precondition | None,
) -> None:
    with pytest.raises(errors.ResourceNotFound) as caught:
        Ledger().plan(delete("documents/1", pre=pre), T0)
    assert caught.value.deleted_at_version == 0
    assert caught.value.metadata() == {"name": "documents/1"}


@pytest.mark.parametrize("pre", [None, Precondition.of_version(2), Precondition.of_exists(True)])
def test_delete_of_a_tombstoned_resource_is_not_found_naming_the_tombstone(
    pre: Precondition | None,
) -> None:
    ledger, tomb = tombstoned_ledger()
    with pytest.raises(errors.ResourceNotFound) as caught:
        ledger.plan(delete("documents/1", pre=pre), T0 + 2)
    assert caught.value.deleted_at_version == tomb.version == 2
    assert caught.value.metadata()["deleted_at_version"] == "2"


@pytest.mark.parametrize("ledger_of", [lambda: (Ledger(), None), tombstoned_ledger])
def test_update_of_an_absent_resource_without_precondition_is_precondition_required(
    ledger_of: Any,
) -> None:
    ledger, _ = ledger_of()
    with pytest.raises(errors.PreconditionRequired) as caught:
        ledger.plan(update("documents/1", pre=None), T0 + 2)
    assert caught.value.current is None
    assert caught.value.metadata() == {"name": "documents/1"}


@pytest.mark.parametrize("ledger_of", [lambda: (Ledger(), None), tombstoned_ledger])
@pytest.mark.parametrize("pre", [Precondition.of_version(1), Precondition.of_exists(True),
                                 Precondition.of_etag('"1-00"'),
                                 Precondition.of_unmodified_since(S + 10)])
def test_update_of_an_absent_resource_with_precondition_is_version_mismatch(
    ledger_of: Any, pre: Precondition
) -> None:
    ledger, _ = ledger_of()
    with pytest.raises(errors.VersionMismatch) as caught:
        ledger.plan(update("documents/1", pre=pre), T0 + 2)
    assert caught.value.current is None


@pytest.mark.parametrize("write", [update("documents/1", pre=None),
                                   delete("documents/1", pre=None),
                                   patch("documents/1", MERGE_PATCH, b"{}", pre=None)])
def test_write_to_a_live_resource_without_precondition_is_precondition_required(
    write: Write,
) -> None:
    ledger, v1 = live_ledger()
    with pytest.raises(errors.PreconditionRequired) as caught:
        ledger.plan(write, T0 + 1)
    assert caught.value.current == v1.current
    assert caught.value.metadata() == {
        "name": "documents/1", "current_version": "1", "current_etag": v1.etag}


# --- preconditions -----------------------------------------------------------------------------


def test_etag_precondition_match_and_mismatch() -> None:
    ledger, v1 = live_ledger()
    v2 = ledger.apply(update("documents/1", pre=Precondition.of_etag(v1.etag)), T0 + 1)
    assert v2.version == 2
    for stale in (v1.etag, etag_for(2, b"\x00" * 32), '"2"', '"whatever"'):
        with pytest.raises(errors.VersionMismatch) as caught:
            ledger.plan(update("documents/1", pre=Precondition.of_etag(stale)), T0 + 2)
        assert caught.value.current == v2.current
        assert caught.value.expected == f"etag {stale}"
    with pytest.raises(errors.VersionMismatch):
        ledger.plan(delete("documents/1", pre=Precondition.of_etag(v1.etag)), T0 + 2)


def test_version_precondition_match_and_mismatch() -> None:
    ledger, v1 = live_ledger()
    v2 = ledger.apply(update("documents/1", pre=version_of(v1)), T0 + 1)
    for stale in (1, 3, 99):
        with pytest.raises(errors.VersionMismatch) as caught:
            ledger.plan(update("documents/1", pre=Precondition.of_version(stale)), T0 + 2)
        assert caught.value.current == v2.current
        assert caught.value.metadata()["current_version"] == "2"
    tomb = ledger.apply(delete("documents/1", pre=version_of(v2)), T0 + 2)
    assert tomb.deleted


def test_exists_precondition_holds_for_any_live_version() -> None:
    ledger, _ = live_ledger()
    v2 = ledger.apply(update("documents/1", pre=Precondition.of_exists(True)), T0 + 1)
    v3 = ledger.apply(update("documents/1", pre=Precondition.of_exists(True)), T0 + 2)
    assert (v2.version, v3.version) == (2, 3)


@pytest.mark.parametrize("etag", ['W/"1-ab"', "1-ab", '"1-ab', '1-ab"', '"a b"', '"a"b"', "*",
                                  ""])
def test_of_etag_refuses_weak_and_unquoted(etag: str) -> None:
    with pytest.raises(errors.InvalidPrecondition) as caught:
        Precondition.of_etag(etag)
    assert caught.value.field == "precondition.etag"


@pytest.mark.parametrize("version", [0, -1, -(2**63)])
def test_of_version_refuses_zero_and_negatives(version: int) -> None:
    with pytest.raises(errors.InvalidPrecondition) as caught:
        Precondition.of_version(version)
    assert caught.value.field == "precondition.version"


def test_of_exists_refuses_false() -> None:
    assert Precondition.of_exists(True).kind is PreconditionKind.EXISTS
    with pytest.raises(errors.InvalidPrecondition) as caught:
        Precondition.of_exists(False)
    assert caught.value.field == "precondition.exists"


def unmodified(ledger: Ledger, since_s: int, now_us: int) -> Version:
    return ledger.plan(update("documents/1", pre=Precondition.of_unmodified_since(since_s)),
                       now_us)


def test_unmodified_since_holds_when_the_last_write_is_not_later() -> None:
    ledger = Ledger()
    ledger.apply(create("documents/1"), T0 + 500_000)  # written in second S
    assert unmodified(ledger, S, T0 + 2 * US_PER_SECOND).version == 2
    assert unmodified(ledger, S + 60, T0 + 2 * US_PER_SECOND).version == 2


def test_unmodified_since_is_refused_when_written_later() -> None:
    ledger = Ledger()
    v1 = ledger.apply(create("documents/1"), T0 + 500_000)
    with pytest.raises(errors.ModifiedSince) as caught:
        unmodified(ledger, S - 1, T0 + 2 * US_PER_SECOND)
    assert caught.value.current == v1.current
    assert caught.value.since == model.format_seconds(S - 1)


def test_unmodified_since_is_refused_for_two_versions_in_that_second() -> None:
    ledger = Ledger()
    v1 = ledger.apply(create("documents/1"), T0 + 100_000)
    v2 = ledger.apply(update("documents/1", pre=version_of(v1)), T0 + 900_000)
    # The client's date cannot say which of the two it saw: a lost update must not slip through.
    with pytest.raises(errors.ModifiedSince) as caught:
        unmodified(ledger, S, T0 + 2 * US_PER_SECOND)
    assert caught.value.current == v2.current


def test_unmodified_since_holds_when_the_previous_version_is_an_earlier_second() -> None:
    ledger = Ledger()
    v1 = ledger.apply(create("documents/1"), T0 - 100_000)  # second S - 1
    ledger.apply(update("documents/1", pre=version_of(v1)), T0 + 100_000)  # second S
    assert unmodified(ledger, S, T0 + 2 * US_PER_SECOND).version == 3


def test_unmodified_since_counts_a_tombstone_in_the_same_second() -> None:
    ledger = Ledger()
    v1 = ledger.apply(create("documents/1"), T0 - 5 * US_PER_SECOND)
    ledger.apply(delete("documents/1", pre=version_of(v1)), T0 + 100_000)
    ledger.apply(create("documents/1"), T0 + 200_000)
    with pytest.raises(errors.ModifiedSince):
        unmodified(ledger, S, T0 + 2 * US_PER_SECOND)


def test_unmodified_since_applies_to_delete() -> None:
    ledger = Ledger()
    ledger.apply(create("documents/1"), T0 + 500_000)
    with pytest.raises(errors.ModifiedSince):
        ledger.plan(delete("documents/1", pre=Precondition.of_unmodified_since(S - 1)), T0 + 10**6)
    tomb = ledger.plan(delete("documents/1", pre=Precondition.of_unmodified_since(S)), T0 + 10**6)
    assert tomb.deleted


# --- patches -----------------------------------------------------------------------------------


def test_merge_patch_through_plan_write() -> None:
    ledger = Ledger()
    v1 = ledger.apply(create("documents/1", b'{"a":1,"b":{"c":2,"d":3}}',
                             content_type="application/vnd.demo+json"), T0)
    v2 = ledger.apply(patch("documents/1", MERGE_PATCH, b'{"b":{"c":null},"e":[1]}',
                            pre=version_of(v1)), T0 + 1)
    assert json.loads(v2.content) == {"a": 1, "b": {"d": 3}, "e": [1]}
    assert v2.content_type == "application/vnd.demo+json"
    assert v2.size == len(v2.content)
    assert v2.version == 2


def test_json_patch_through_plan_write() -> None:
    ledger, v1 = live_ledger()
    doc = b'[{"op":"test","path":"/a","value":1},{"op":"replace","path":"/a","value":5}]'
    v2 = ledger.apply(patch("documents/1", JSON_PATCH, doc, pre=version_of(v1)), T0 + 1)
    assert json.loads(v2.content) == {"a": 5}
    assert v2.content_type == "application/json"
    with pytest.raises(errors.PatchConflict):
        ledger.plan(patch("documents/1", JSON_PATCH, doc, pre=version_of(v2)), T0 + 2)


def test_patch_of_non_json_content_is_a_conflict() -> None:
    ledger = Ledger()
    v1 = ledger.apply(create("documents/1", b"plain words", content_type="text/plain"), T0)
    with pytest.raises(errors.PatchConflict):
        ledger.plan(patch("documents/1", MERGE_PATCH, b'{"a":1}', pre=version_of(v1)), T0 + 1)


def test_patch_precondition_is_checked_before_the_patch() -> None:
    ledger = Ledger()
    ledger.apply(create("documents/1", b"plain words", content_type="text/plain"), T0)
    with pytest.raises(errors.VersionMismatch):
        ledger.plan(patch("documents/1", MERGE_PATCH, b'{"a":1}',
                          pre=Precondition.of_version(7)), T0 + 1)


def test_patch_result_over_the_limit_is_too_large() -> None:
    ledger, v1 = live_ledger()
    write = patch("documents/1", MERGE_PATCH, b'{"b":"' + b"x" * 100 + b'"}', pre=version_of(v1))
    size = len(ledger.plan(write, T0 + 1).content)
    assert ledger.plan(write, T0 + 1, limit=size).size == size
    with pytest.raises(errors.ContentTooLarge) as caught:
        ledger.plan(write, T0 + 1, limit=size - 1)
    assert (caught.value.limit, caught.value.size, caught.value.field) == (size - 1, size, "patch")
    assert caught.value.metadata() == {"field": "patch", "limit": str(size - 1)}


# --- page tokens -------------------------------------------------------------------------------


@pytest.mark.parametrize(("after", "kind"), [("documents/1", str), ("", str), (7, int), (0, int)])
def test_page_token_round_trip(after: str | int, kind: type[str] | type[int]) -> None:
    token = encode_page_token("resources:documents", after)
    assert token
    assert decode_page_token(token, "resources:documents", kind) == after


@FAST
@given(st.text(max_size=30), st.text(max_size=30) | st.integers(-(2**63), 2**63))
def test_page_token_round_trip_any(scope: str, after: str | int) -> None:
    token = encode_page_token(scope, after)
    assert token.isascii()
    assert "=" not in token
    assert decode_page_token(token, scope, type(after)) == after


def test_empty_page_token_is_the_first_page() -> None:
    assert decode_page_token("", "resources:documents", str) is None


def raw_token(data: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")


@pytest.mark.parametrize("token", [
    encode_page_token("resources:other", "documents/1"),  # another listing
    encode_page_token("versions:documents/1", 3),  # another kind of listing
    "!!!!",
    "not a token",
    "é",
    "a",
    base64.urlsafe_b64encode(b"\xff\xfe\xfd").decode(),
    raw_token([1, 2]),
    raw_token("resources:documents"),
    raw_token({"s": "resources:documents"}),
    raw_token({"a": "documents/1"}),
    raw_token({"s": "resources:documents", "a": 5}),  # wrong type for this listing
    raw_token({"s": "resources:documents", "a": None}),
    raw_token({"s": "resources:documents", "a": ["x"]}),
    base64.urlsafe_b64encode(b"[" * 100_000).decode(),  # deeper than json.loads can recurse
])
def test_bad_page_tokens_are_invalid(token: str) -> None:
    with pytest.raises(errors.InvalidPageToken) as caught:
        decode_page_token(token, "resources:documents", str)
    assert caught.value.field == "page_token"


@pytest.mark.parametrize("after", ["3", True, 3.0, None])
def test_int_page_token_refuses_other_types(after: Any) -> None:
    with pytest.raises(errors.InvalidPageToken):
        decode_page_token(raw_token({"s": "versions:d/1", "a": after}), "versions:d/1", int)


@FAST
@given(st.text(max_size=60))
def test_any_text_is_a_position_or_an_invalid_page_token(token: str) -> None:
    try:
        after = decode_page_token(token, "resources:documents", str)
    except errors.InvalidPageToken:
        return
    assert after is None or isinstance(after, str)


@pytest.mark.parametrize(("requested", "expected"), [(0, 100), (1, 1), (100, 100), (1000, 1000),
                                                     (1001, 1000), (10**9, 1000)])
def test_page_size_default_and_maximum(requested: int, expected: int) -> None:
    assert page_size(requested) == expected


def test_page_size_custom_bounds() -> None:
    assert page_size(0, default=5, maximum=10) == 5
    assert page_size(50, default=5, maximum=10) == 10


@pytest.mark.parametrize("requested", [-1, -1000])
def test_page_size_refuses_negatives(requested: int) -> None:
    with pytest.raises(errors.InvalidArgument) as caught:
        page_size(requested)
    assert caught.value.field == "page_size"


# --- request ids and reasons -------------------------------------------------------------------


@pytest.mark.parametrize("request_id", ["", "abc", "x" * 256, "!~", "3f2a-9c/xyz"])
def test_valid_request_ids(request_id: str) -> None:
    assert model.validate_request_id(request_id) == request_id


@pytest.mark.parametrize("request_id", ["x" * 257, "a b", "é", "a\nb", "\x7f"])
def test_invalid_request_ids(request_id: str) -> None:
    with pytest.raises(errors.InvalidArgument) as caught:
        model.validate_request_id(request_id)
    assert caught.value.field == "request_id"


def test_reasons() -> None:
    assert model.validate_reason("fix\ttypo, see #12") == "fix\ttypo, see #12"
    assert model.validate_reason("x" * 1024)
    for bad in ("x" * 1025, "line\nbreak", "nul\x00"):
        with pytest.raises(errors.InvalidArgument) as caught:
            model.validate_reason(bad)
        assert caught.value.field == "reason"


def test_the_hash_format_is_fixed() -> None:
    """Golden digests: the stored hashes of every ledger depend on these exact bytes, so any
    rewrite of the hashing code must reproduce them (values from the first implementation)."""
    v = Version(name="documents/1", version=3, revision=17, content=b'{"a":1}',
                content_type="application/json", create_time_us=1700000000000000,
                update_time_us=1700000000123456, actor="alice", reason="fix typo \u00e9",
                deleted=False, previous_hash=bytes(range(32)),
                ledger_previous_hash=bytes(range(32, 64)), hash=b"", size=7)
    tombstone = dataclasses.replace(v, deleted=True, content=b"", content_type="", size=0)
    assert compute_hash(v).hex() == (
        "be39aee4db66641b6f84343da01b2485b584e6949576ad6573c60d808181456b")
    assert compute_hash(tombstone).hex() == (
        "8fa5a5be0705a1b8e455099ad3b35ad48656c24eb2b2c477dcd84db6c229a0cc")
