"""Unit tests for service/verify.py: the streaming verifier and the ledger digest, on ledgers
planned by the real ledger rules (model.plan_write) and then tampered with in memory."""

from __future__ import annotations

from dataclasses import replace

import pytest

from casledger.service.model import (
    EMPTY_TAIL,
    Head,
    Precondition,
    Tail,
    Version,
    Write,
    WriteKind,
    compute_hash,
    plan_write,
)
from casledger.service.verify import Digest, ProblemKind, Verifier, ledger_digest

T0 = 1_700_000_000_000_000

# (kind, name, content): revisions 1..9.
SCRIPT = (
    ("create", "documents/a", b'{"n":1}'),
    ("create", "documents/b", b'{"b":1}'),
    ("update", "documents/a", b'{"n":2}'),
    ("create", "notes/n", b'{"text":"hi"}'),
    ("update", "documents/a", b'{"n":3}'),
    ("delete", "documents/b", b""),
    ("update", "documents/a", b'{"n":4}'),
    ("create", "documents/b", b'{"b":2}'),
    ("update", "notes/n", b'{"text":"bye"}'),
)


def build(script: tuple[tuple[str, str, bytes], ...] = SCRIPT) -> list[Version]:
    """The versions the ledger rules write for `script`, hashes and chains included."""
    heads: dict[str, Head] = {}
    tail = EMPTY_TAIL
    versions = []
    for index, (kind, name, content) in enumerate(script):
        head = heads.get(name)
        live = head is not None and not head.latest.deleted
        write = Write(
            WriteKind(kind), name, content=content,
            content_type="" if kind == "delete" else "application/json",
            precondition=Precondition.of_version(head.latest.version)
            if live and head and kind != "create" else None,
            reason=f"step {index}")
        version = plan_write(write, head, tail, T0 + index * 1000, limit=1 << 20)
        heads[name] = Head(version, head.latest.update_time_us if head else None)
        tail = Tail(version.revision, version.hash, version.update_time_us)
        versions.append(version)
    return versions


def rehash(v: Version, **changes: object) -> Version:
    """`v` with `changes`, its hash recomputed (what a forger who knows the format does)."""
    changed = replace(v, **changes)  # type: ignore[arg-type]
    return replace(changed, hash=compute_hash(changed))


def rechain(versions: list[Version]) -> list[Version]:
    """Recompute every hash and both chains, as a forger rewriting history would."""
    heads: dict[str, bytes] = {}
    previous = b""
    out = []
    for v in versions:
        v = rehash(v, previous_hash=heads.get(v.name, b""), ledger_previous_hash=previous)
        heads[v.name] = previous = v.hash
        out.append(v)
    return out


def verify(versions: list[Version], **options: int) -> Verifier:
    verifier = Verifier(**options)  # type: ignore[arg-type]
    verifier.feed(versions)
    return verifier


def found(verifier: Verifier) -> set[tuple[ProblemKind, str, int]]:
    return {(p.kind, p.name, p.version) for p in verifier.problems}


def at(versions: list[Version], name: str, version: int) -> int:
    return next(i for i, v in enumerate(versions) if (v.name, v.version) == (name, version))


def test_an_intact_ledger_verifies() -> None:
    versions = build()
    verifier = verify(versions)
    assert verifier.ok, verifier.problems
    assert (verifier.versions, verifier.resources, verifier.revision) == (9, 3, 9)


def test_the_empty_ledger_verifies_and_has_a_digest() -> None:
    verifier = verify([])
    assert verifier.ok
    assert verifier.digest().revision == 0


def test_edited_content_is_a_hash_mismatch_at_that_version_only() -> None:
    versions = build()
    i = at(versions, "documents/a", 2)
    versions[i] = replace(versions[i], content=b'{"n":20}', size=8)
    assert found(verify(versions)) == {(ProblemKind.HASH_MISMATCH, "documents/a", 2)}


@pytest.mark.parametrize(("field", "value"), [
    ("reason", "innocent"), ("actor", "mallory"), ("content_type", "text/plain"),
    ("update_time_us", T0 + 2001), ("create_time_us", T0 + 1), ("name", "documents/z"),
])
def test_edited_metadata_is_a_hash_mismatch(field: str, value: object) -> None:
    versions = build()
    i = at(versions, "documents/a", 2)
    versions[i] = replace(versions[i], **{field: value})  # type: ignore[arg-type]
    problems = found(verify(versions))
    assert (ProblemKind.HASH_MISMATCH, versions[i].name, 2) in problems


def test_a_dropped_version_breaks_both_chains_where_it_was() -> None:
    versions = build()
    del versions[at(versions, "documents/a", 2)]  # revision 3
    problems = found(verify(versions))
    # The next revision (4, notes/n v1) no longer follows revision 3 ...
    assert (ProblemKind.REVISION_GAP, "notes/n", 1) in problems
    assert (ProblemKind.LEDGER_CHAIN_BROKEN, "notes/n", 1) in problems
    # ... and documents/a jumps from version 1 to 3.
    assert (ProblemKind.VERSION_GAP, "documents/a", 3) in problems
    assert (ProblemKind.RESOURCE_CHAIN_BROKEN, "documents/a", 3) in problems


def test_a_dropped_version_even_with_every_hash_recomputed_leaves_a_gap() -> None:
    versions = build()
    del versions[at(versions, "documents/a", 2)]
    problems = found(verify(rechain(versions)))
    assert (ProblemKind.REVISION_GAP, "notes/n", 1) in problems
    assert (ProblemKind.VERSION_GAP, "documents/a", 3) in problems


def test_swapped_contents_are_two_hash_mismatches() -> None:
    versions = build()
    i, j = at(versions, "documents/a", 2), at(versions, "documents/a", 3)
    versions[i], versions[j] = (replace(versions[i], content=versions[j].content),
                                replace(versions[j], content=versions[i].content))
    assert found(verify(versions)) == {(ProblemKind.HASH_MISMATCH, "documents/a", 2),
                                       (ProblemKind.HASH_MISMATCH, "documents/a", 3)}


def test_reordered_versions_break_the_ledger_chain() -> None:
    versions = build()
    versions[2], versions[3] = versions[3], versions[2]
    problems = found(verify(versions))
    assert (ProblemKind.REVISION_GAP, "notes/n", 1) in problems
    assert (ProblemKind.LEDGER_CHAIN_BROKEN, "notes/n", 1) in problems


def test_an_inserted_version_with_a_valid_hash_breaks_the_chain_after_it() -> None:
    versions = build()
    forged = rehash(versions[4], content=b'{"n":99}', size=8)  # a second documents/a v3
    versions.insert(5, forged)
    problems = found(verify(versions))
    assert (ProblemKind.VERSION_GAP, "documents/a", 3) in problems
    assert (ProblemKind.REVISION_GAP, "documents/a", 3) in problems


def test_a_tombstone_turned_back_into_a_version_is_a_hash_mismatch() -> None:
    versions = build()
    i = at(versions, "documents/b", 2)
    versions[i] = replace(versions[i], deleted=False)
    assert found(verify(versions)) == {(ProblemKind.HASH_MISMATCH, "documents/b", 2)}


def test_a_forged_tombstone_with_a_recomputed_hash_breaks_the_next_links() -> None:
    versions = build()
    i = at(versions, "documents/a", 3)
    versions[i] = rehash(versions[i], deleted=True, content=b"", content_type="", size=0)
    problems = found(verify(versions))
    assert (ProblemKind.RESOURCE_CHAIN_BROKEN, "documents/a", 4) in problems
    assert (ProblemKind.LEDGER_CHAIN_BROKEN, versions[i + 1].name, versions[i + 1].version) \
        in problems


def test_a_tombstone_with_content_breaks_the_tombstone_rules() -> None:
    versions = build()
    i = at(versions, "documents/b", 2)
    versions[i] = replace(versions[i], content=b"{}", size=2)
    assert found(verify(rechain(versions))) == {(ProblemKind.BAD_TOMBSTONE, "documents/b", 2)}


def test_a_deleted_flag_other_than_0_or_1_is_reported() -> None:
    versions = build()
    i = at(versions, "documents/b", 2)
    versions[i] = replace(versions[i], deleted=2)  # type: ignore[arg-type]
    assert (ProblemKind.BAD_TOMBSTONE, "documents/b", 2) in found(verify(versions))


def test_a_size_that_is_not_the_contents_length_is_reported() -> None:
    versions = build()
    versions[0] = replace(versions[0], size=999)
    assert found(verify(versions)) == {(ProblemKind.SIZE_MISMATCH, "documents/a", 1)}


def test_a_row_of_the_wrong_types_is_malformed_not_a_crash() -> None:
    versions = build()
    versions[1] = replace(versions[1], content="text")  # type: ignore[arg-type]
    verifier = verify(versions)
    assert (ProblemKind.MALFORMED, "documents/b", 1) in found(verifier)
    assert verifier.revision == 9


def test_problems_kept_are_bounded_but_all_are_counted() -> None:
    versions = [replace(v, reason="edited") for v in build()]
    verifier = verify(versions, max_problems=3)
    assert len(verifier.problems) == 3
    assert verifier.problem_count == 9


def test_state_grows_with_resources_not_versions() -> None:
    script = tuple(("create" if i < 3 else "update", f"documents/d{i % 3}", b"{}")
                   for i in range(600))
    verifier = verify(build(script))
    assert verifier.ok
    assert (verifier.versions, verifier.resources) == (600, 3)


# --- digest --------------------------------------------------------------------------------


def test_a_digest_prints_and_parses_as_revision_colon_hex() -> None:
    digest = verify(build()).digest()
    text = str(digest)
    assert text.startswith("9:")
    assert len(text) == 2 + 64
    assert Digest.parse(text) == digest
    assert Digest.parse(f" {text}\n") == digest


@pytest.mark.parametrize("text", ["", "9", "9:", "x:" + "0" * 64, "9:" + "0" * 63,
                                  "9:" + "G" * 64, "-1:" + "0" * 64, "09:" + "0" * 64])
def test_a_malformed_digest_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="REVISION:64-hex-digits"):
        Digest.parse(text)


def test_the_digest_covers_the_revision_hash_and_every_head() -> None:
    heads = [("documents/a", 4, b"a" * 32), ("documents/b", 3, b"b" * 32)]
    base = ledger_digest(9, b"r" * 32, heads)
    assert ledger_digest(9, b"s" * 32, heads) != base
    assert ledger_digest(8, b"r" * 32, heads) != base
    assert ledger_digest(9, b"r" * 32, heads[:1]) != base
    assert ledger_digest(9, b"r" * 32, [heads[0], ("documents/b", 2, b"b" * 32)]) != base
    assert ledger_digest(9, b"r" * 32, list(heads)) == base


def test_the_digest_does_not_depend_on_how_the_ledger_is_fed() -> None:
    versions = build()
    one_by_one = Verifier()
    for v in versions:
        one_by_one.feed([v])
    assert one_by_one.digest() == verify(versions).digest()


def test_the_digest_at_a_revision_is_the_digest_of_that_prefix() -> None:
    versions = build()
    verifier = verify(versions, digest_at=5)
    assert verifier.target_digest == verify(versions[:5]).digest()
    assert verifier.digest() == verify(versions).digest() != verifier.target_digest


def test_a_ledger_that_extends_a_digest_passes_the_check() -> None:
    versions = build()
    earlier = verify(versions[:5]).digest()
    verifier = verify(versions, digest_at=earlier.revision)
    verifier.check_digest(earlier)
    assert verifier.ok


def test_a_rewritten_history_passes_the_chains_but_not_an_earlier_digest() -> None:
    versions = build()
    earlier = verify(versions).digest()
    i = at(versions, "documents/a", 2)
    versions[i] = replace(versions[i], content=b'{"n":"forged"}', size=14)
    forged = rechain(versions)
    verifier = verify(forged, digest_at=earlier.revision)
    assert verifier.ok  # every hash and link recomputed: the chains alone cannot tell
    verifier.check_digest(earlier)
    assert found(verifier) == {(ProblemKind.DIGEST_MISMATCH, "", 0)}


def test_a_truncated_tail_fails_an_earlier_digest() -> None:
    versions = build()
    earlier = verify(versions).digest()
    verifier = verify(versions[:-2], digest_at=earlier.revision)
    assert verifier.ok
    verifier.check_digest(earlier)
    assert [p.kind for p in verifier.problems] == [ProblemKind.TRUNCATED]


# --- the heads table -----------------------------------------------------------------------


def test_heads_that_agree_with_the_versions_pass() -> None:
    verifier = verify(build())
    verifier.check_heads([("documents/a", 4, False), ("documents/b", 3, False),
                          ("notes/n", 2, False)])
    assert verifier.ok


@pytest.mark.parametrize(("heads", "name"), [
    ([("documents/a", 3, False), ("documents/b", 3, False), ("notes/n", 2, False)],
     "documents/a"),
    ([("documents/a", 4, False), ("documents/b", 3, True), ("notes/n", 2, False)],
     "documents/b"),
    ([("documents/a", 4, False), ("documents/b", 3, False)], "notes/n"),
    ([("documents/a", 4, False), ("documents/b", 3, False), ("notes/m", 1, False),
      ("notes/n", 2, False)], "notes/m"),
    ([("documents/b", 3, False), ("notes/n", 2, False)], "documents/a"),
])
def test_heads_that_disagree_are_reported(heads: list[tuple[str, int, bool]],
                                          name: str) -> None:
    verifier = verify(build())
    verifier.check_heads(heads)
    assert [(p.kind, p.name) for p in verifier.problems] == [(ProblemKind.HEAD_MISMATCH, name)]
