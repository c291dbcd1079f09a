"""The verifier's fast path and its slices (`casledger verify --jobs N`), pure: compute_hash_row
is compute_hash, and a ledger cut into slices — each checked by a Verifier.for_slice, its summary
pickled as it is between processes, then absorbed in order — gives exactly what one pass gives:
the same problems (kind, name, version, revision and detail, in the same order), the same count,
state, heads and digests, on every tampering of test_verify.py and on generated ones."""

from __future__ import annotations

import contextlib
import itertools
import pickle
from collections.abc import Callable
from dataclasses import dataclass, replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from casledger.service.model import Version, compute_hash, compute_hash_row
from casledger.service.verify import (
    ROW_FIELDS,
    Digest,
    ProblemKind,
    Row,
    SliceSummary,
    Verifier,
    row_of,
)

from .test_verify import SCRIPT, T0, at, build, rechain, rehash

FAST = settings(max_examples=300, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow])

# --- compute_hash_row ----------------------------------------------------------------------

# Short, or (repeated, which is cheap to draw) past the 4 KiB compute_hash_row has prefixes for.
_text = st.text(max_size=40) | st.builds(lambda text, times: text * times,
                                         st.text(min_size=1, max_size=4), st.integers(500, 1500))
_ints = st.integers() | st.integers(min_value=-(10 ** 30), max_value=10 ** 30)
versions = st.builds(
    Version, name=_text, version=_ints, revision=_ints, content=st.binary(max_size=300),
    content_type=_text, create_time_us=_ints, update_time_us=_ints, actor=_text, reason=_text,
    deleted=st.booleans(),
    previous_hash=st.binary(max_size=40) | st.binary(min_size=1, max_size=4).map(
        lambda part: part * 2100),
    ledger_previous_hash=st.binary(max_size=40), hash=st.binary(max_size=32),
    size=st.integers())


@FAST
@given(versions)
def test_compute_hash_row_is_compute_hash(v: Version) -> None:
    assert compute_hash_row(row_of(v)) == compute_hash(v)


# What a hand-edited SQLite file can hold in any column, and then some.
_anything = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
             | st.text(max_size=8) | st.binary(max_size=8))


@FAST
@given(versions, st.sampled_from(ROW_FIELDS), _anything)
def test_compute_hash_row_raises_what_compute_hash_raises(v: Version, field: str,
                                                          value: object) -> None:
    odd = replace(v, **{field: value})  # type: ignore[arg-type]
    try:
        expected: object = compute_hash(odd)
    except Exception as exc:
        expected = type(exc)
    try:
        got: object = compute_hash_row(row_of(odd))
    except Exception as exc:
        got = type(exc)
    assert got == expected


# --- one pass and slices -------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    digest_at: int | None = None
    max_problems: int = 1000
    batch: int = 1000  # rows per feed_rows call
    # Join the workers' summaries from the last one back (Verifier.resume, as `verify --jobs`
    # does as they come in) before the parent absorbs them.
    join: bool = False


def one_pass(rows: list[Row], options: Options) -> Verifier:
    verifier = Verifier(digest_at=options.digest_at, max_problems=options.max_problems)
    for start in range(0, len(rows), options.batch):
        verifier.feed_rows(rows[start:start + options.batch])
    return verifier


def _crossing(summary: SliceSummary) -> SliceSummary:
    summary = pickle.loads(pickle.dumps(summary))
    assert isinstance(summary, SliceSummary)
    return summary


def in_slices(rows: list[Row], cuts: list[int], options: Options) -> tuple[Verifier, int]:
    """The parent feeds rows[:cuts[0]] and absorbs the other slices' summaries, in order (or
    feeds a slice's rows when it cannot); also returns how many slices it had to feed."""
    bounds = [0, *cuts, len(rows)]
    parent = one_pass(rows[:bounds[1]], options)
    segments: list[tuple[int, int, SliceSummary]] = []
    for low, high in itertools.pairwise(bounds[1:]):
        worker = Verifier.for_slice(digest_at=options.digest_at,
                                    max_problems=options.max_problems)
        for start in range(low, high, options.batch):
            worker.feed_rows(rows[start:min(high, start + options.batch)])
        segments.append((low, high, _crossing(worker.summary())))
    if options.join:
        joined: list[tuple[int, int, SliceSummary]] = []
        for low, high, summary in reversed(segments):
            if joined:
                earlier = Verifier.resume(summary, digest_at=options.digest_at,
                                          max_problems=options.max_problems)
                if earlier.absorb(joined[-1][2]):
                    joined[-1] = (low, joined[-1][1], _crossing(earlier.summary()))
                    continue
            joined.append((low, high, summary))
        segments = joined[::-1]
    fed = 0
    for low, high, summary in segments:
        if not parent.absorb(summary):
            fed += 1
            for start in range(low, high, options.batch):
                parent.feed_rows(rows[start:min(high, start + options.batch)])
    return parent, fed


def _attempt(call: Callable[[], object]) -> object:
    try:
        return call()
    except Exception as exc:  # a revision of the wrong type (not in a file): the same either way
        return type(exc)


def outcome(verifier: Verifier, expected: Digest | None) -> dict[str, object]:
    checked = None if expected is None else _attempt(lambda: verifier.check_digest(expected))
    return {
        "check_digest": checked,
        "problems": list(verifier.problems), "problem_count": verifier.problem_count,
        "versions": verifier.versions, "revision": verifier.revision,
        "resources": verifier.resources, "heads": _attempt(lambda: list(verifier.heads())),
        "digest": _attempt(verifier.digest), "target": verifier.target_digest,
    }


def even_cuts(n: int, jobs: int) -> list[int]:
    return [n * k // jobs for k in range(1, jobs)]


def assert_same(rows: list[Row], cuts: list[int], options: Options = Options(),
                expected: Digest | None = None) -> int:
    """Slices give what one pass gives; returns how many slices the parent had to feed."""
    sliced, fed = in_slices(rows, cuts, options)
    assert outcome(sliced, expected) == outcome(one_pass(rows, options), expected)
    return fed


def rows(versions: list[Version]) -> list[Row]:
    return [row_of(v) for v in versions]


# Every tampering of test_verify.py, as a function of the pristine ledger (revisions 1..9).
def _edit_content(vs: list[Version]) -> list[Version]:
    i = at(vs, "documents/a", 2)
    vs[i] = replace(vs[i], content=b'{"n":20}', size=8)
    return vs


def _edit(field: str, value: object) -> Callable[[list[Version]], list[Version]]:
    def edit(vs: list[Version]) -> list[Version]:
        i = at(vs, "documents/a", 2)
        vs[i] = replace(vs[i], **{field: value})  # type: ignore[arg-type]
        return vs
    return edit


def _drop(vs: list[Version]) -> list[Version]:
    del vs[at(vs, "documents/a", 2)]
    return vs


def _swap_contents(vs: list[Version]) -> list[Version]:
    i, j = at(vs, "documents/a", 2), at(vs, "documents/a", 3)
    vs[i], vs[j] = (replace(vs[i], content=vs[j].content), replace(vs[j], content=vs[i].content))
    return vs


def _reorder(vs: list[Version]) -> list[Version]:
    vs[2], vs[3] = vs[3], vs[2]
    return vs


def _insert(vs: list[Version]) -> list[Version]:
    vs.insert(5, rehash(vs[4], content=b'{"n":99}', size=8))
    return vs


def _set(name: str, number: int, **changes: object
         ) -> Callable[[list[Version]], list[Version]]:
    def edit(vs: list[Version]) -> list[Version]:
        i = at(vs, name, number)
        vs[i] = replace(vs[i], **changes)  # type: ignore[arg-type]
        return vs
    return edit


def _forge_tombstone(vs: list[Version]) -> list[Version]:
    i = at(vs, "documents/a", 3)
    vs[i] = rehash(vs[i], deleted=True, content=b"", content_type="", size=0)
    return vs


def _forge_all(vs: list[Version]) -> list[Version]:
    i = at(vs, "documents/a", 2)
    vs[i] = replace(vs[i], content=b'{"n":"forged"}', size=14)
    return rechain(vs)


TAMPERINGS: dict[str, Callable[[list[Version]], list[Version]]] = {
    "intact": lambda vs: vs,
    "edited content": _edit_content,
    **{f"edited {field}": _edit(field, value) for field, value in (
        ("reason", "innocent"), ("actor", "mallory"), ("content_type", "text/plain"),
        ("update_time_us", T0 + 2001), ("create_time_us", T0 + 1), ("name", "documents/z"))},
    "dropped version": _drop,
    "dropped version, rechained": lambda vs: rechain(_drop(vs)),
    "swapped contents": _swap_contents,
    "reordered": _reorder,
    "inserted": _insert,
    "tombstone undone": _set("documents/b", 2, deleted=False),
    "forged tombstone": _forge_tombstone,
    "tombstone with content": lambda vs: rechain(_set("documents/b", 2, content=b"{}",
                                                      size=2)(vs)),
    "deleted flag 2": _set("documents/b", 2, deleted=2),
    "wrong size": _set("documents/a", 1, size=999),
    "content of the wrong type": _set("documents/b", 1, content="text"),
    "every reason edited": lambda vs: [replace(v, reason="edited") for v in vs],
    "history rewritten": _forge_all,
    "truncated": lambda vs: vs[:-2],
    # Values of unusual types that stay readable: the stitching must step aside.
    "revision as text": _set("documents/a", 2, revision="3"),
    "version as text": _set("documents/a", 2, version="2"),
    "hash as text": _set("documents/a", 2, hash="forged"),
    "time as text": _set("notes/n", 1, update_time_us=str(T0 + 3000)),
    "version as float": _set("documents/a", 2, version=2.0),
}


@pytest.mark.parametrize("jobs", [1, 2, 3])
@pytest.mark.parametrize("tampering", list(TAMPERINGS))
@pytest.mark.parametrize("options", [Options(), Options(digest_at=5), Options(max_problems=2),
                                     Options(digest_at=9, max_problems=1, batch=2),
                                     Options(join=True), Options(digest_at=5, join=True),
                                     Options(digest_at=9, max_problems=2, batch=2, join=True)],
                         ids=["plain", "digest-at-5", "2-problems", "digest-at-9-batches-of-2",
                              "joined", "joined-digest-at-5", "joined-digest-at-9-2-problems"])
def test_slices_report_what_one_pass_reports(tampering: str, jobs: int,
                                             options: Options) -> None:
    pristine = build()
    expected = one_pass(rows(pristine), Options(digest_at=options.digest_at)).target_digest
    versions = TAMPERINGS[tampering](build())
    fed = assert_same(rows(versions), even_cuts(len(versions), jobs), options, expected)
    if tampering == "intact":
        assert fed == 0  # nothing to step aside for: every slice was absorbed


@pytest.mark.parametrize("tampering", list(TAMPERINGS))
def test_every_cut_of_the_ledger_gives_the_same(tampering: str) -> None:
    versions = rows(TAMPERINGS[tampering](build()))
    for jobs in (2, 3, 4):
        for cuts in itertools.combinations(range(len(versions) + 1), jobs - 1):
            assert_same(versions, list(cuts), Options(digest_at=4, join=jobs > 2))


def test_a_slice_summary_grows_with_resources_not_versions() -> None:
    script = tuple(("create" if i < 3 else "update", f"documents/d{i % 3}", b"{}")
                   for i in range(600))
    versions = rows(build(script))
    worker = Verifier.for_slice(digest_at=450)
    worker.feed_rows(versions[300:])
    summary = worker.summary()
    assert not summary.gave_up
    assert (len(summary.pending), len(summary.heads), summary.versions) == (3, 3, 300)
    assert summary.snapshot is not None
    assert len(summary.snapshot[2]) == 3
    assert_same(versions, [300], Options(digest_at=450))


def test_a_worker_gives_up_on_a_malformed_row_and_the_parent_reads_the_slice() -> None:
    versions = rows(_set("documents/b", 1, content="text")(build()))
    worker = Verifier.for_slice()
    worker.feed_rows(versions[1:])
    assert "malformed" in worker.summary().gave_up
    assert assert_same(versions, [1]) == 1
    sliced, _ = in_slices(versions, [1], Options())
    assert (sliced.problems[0].kind, sliced.problems[0].name) == (ProblemKind.MALFORMED,
                                                                  "documents/b")


# --- generated tamperings ------------------------------------------------------------------

# A longer ledger than SCRIPT: more resources, tombstones and re-creations.
LONG = SCRIPT + tuple(
    (kind, name, content) for kind, name, content in (
        ("update", "documents/a", b'{"n":5}'), ("delete", "notes/n", b""),
        ("create", "notes/m", b"{}"), ("update", "documents/b", b'{"b":3}'),
        ("create", "notes/n", b'{"text":"again"}'), ("update", "notes/m", b'{"m":2}'),
        ("delete", "documents/a", b""), ("update", "notes/n", b'{"text":"more"}'),
    ))


@st.composite
def tamperings(draw: st.DrawFn) -> list[Row]:
    ledger = [list(row) for row in rows(build(LONG))]
    for _ in range(draw(st.integers(1, 4))):
        action = draw(st.sampled_from(["set", "copy", "drop", "swap", "duplicate"]))
        if not ledger:
            break
        i = draw(st.integers(0, len(ledger) - 1))
        j = draw(st.integers(0, len(ledger) - 1))
        if action == "set":
            column = draw(st.integers(0, len(ROW_FIELDS) - 1))
            ledger[i][column] = draw(_anything)
        elif action == "copy":  # a column from another row: plausible values, wrong place
            column = draw(st.integers(0, len(ROW_FIELDS) - 1))
            ledger[i][column] = ledger[j][column]
        elif action == "drop":
            del ledger[i]
        elif action == "swap":
            ledger[i], ledger[j] = ledger[j], ledger[i]
        else:
            ledger.insert(i, list(ledger[j]))
    versions = [tuple(row) for row in ledger]
    # A forger who then recomputes what they can: the hashes, or the hashes and both chains.
    forger = draw(st.sampled_from([None, "hashes", "chains"]))
    return versions if forger is None else _recomputed(versions, chains=forger == "chains")


def _recomputed(versions: list[Row], *, chains: bool) -> list[Row]:
    out = []
    heads: dict[object, bytes] = {}
    previous = b""
    for row in versions:
        if chains:
            with contextlib.suppress(TypeError):  # an unhashable name
                row = (*row[:10], heads.get(row[0], b""), previous, *row[12:])
        with contextlib.suppress(Exception):  # what compute_hash cannot hash
            row = (*row[:12], compute_hash(Version(*row)), row[13])
        out.append(row)
        previous = row[12]
        with contextlib.suppress(TypeError):
            heads[row[0]] = row[12]
    return out


@FAST
@given(tamperings(), st.data())
def test_slices_report_what_one_pass_reports_on_generated_tamperings(
        versions: list[Row], data: st.DataObject) -> None:
    jobs = data.draw(st.integers(2, 4), label="jobs")
    cuts = sorted(data.draw(st.lists(st.integers(0, len(versions)), min_size=jobs - 1,
                                     max_size=jobs - 1), label="cuts"))
    options = Options(digest_at=data.draw(st.none() | st.integers(0, len(versions) + 2)),
                      max_problems=data.draw(st.sampled_from([1, 3, 1000])),
                      batch=data.draw(st.sampled_from([1, 3, 1000])), join=data.draw(st.booleans()))
    expected = one_pass(rows(build(LONG)), Options(digest_at=options.digest_at)).target_digest
    assert_same(versions, cuts, options, expected)


def test_an_intact_ledger_is_absorbed_whole_at_every_cut() -> None:
    versions = rows(build(LONG))
    for cuts in itertools.combinations(range(len(versions) + 1), 2):
        assert assert_same(versions, list(cuts), Options(digest_at=7)) == 0
        assert assert_same(versions, list(cuts), Options(digest_at=7, join=True)) == 0
