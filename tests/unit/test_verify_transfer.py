"""Unit tests for the export format (service/transfer.py) and the diff of two versions
(service/jsondiff.py)."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from casledger.service.content import JSONValue
from casledger.service.jsondiff import diff_json, diff_text
from casledger.service.model import Version
from casledger.service.patch import json_patch
from casledger.service.transfer import (
    EXPORT_FORMAT,
    ImportRefused,
    end_line,
    header_line,
    read_export,
    version_line,
)
from casledger.service.verify import ProblemKind, Verifier

from .test_verify import build

FAST = settings(max_examples=300, deadline=None, database=None)


def export(versions: list[Version]) -> list[str]:
    verifier = Verifier()
    verifier.feed(versions)
    return [header_line(verifier.revision), *(version_line(v) for v in versions),
            end_line(len(versions), verifier.digest())]


def edit(line: str, **changes: Any) -> str:
    record = json.loads(line)
    record.update(changes)
    return json.dumps(record) + "\n"


def refused(lines: list[str]) -> ImportRefused:
    with pytest.raises(ImportRefused) as caught:
        list(read_export(lines))
    return caught.value


def test_an_export_reads_back_as_the_same_versions() -> None:
    versions = build()
    lines = export(versions)
    assert json.loads(lines[0]) == {"record": "header", "format": EXPORT_FORMAT, "revision": 9}
    assert list(read_export(lines)) == versions
    assert list(read_export(line.encode() for line in lines)) == versions


def test_every_line_is_one_json_object_with_its_hash() -> None:
    versions = build()
    for line, v in zip(export(versions)[1:-1], versions, strict=True):
        record = json.loads(line)
        assert line.endswith("\n")
        assert line.count("\n") == 1
        assert record["hash"] == v.hash.hex()
        assert base64.b64decode(record["content_base64"]) == v.content


def test_an_edited_version_is_refused_naming_it() -> None:
    lines = export(build())
    lines[3] = edit(lines[3], content_base64=base64.b64encode(b'{"n":7}').decode())
    problem = refused(lines).problem
    assert problem is not None
    assert (problem.kind, problem.name, problem.version) == (ProblemKind.HASH_MISMATCH,
                                                             "documents/a", 2)


def test_a_dropped_version_is_refused() -> None:
    lines = export(build())
    del lines[3]
    error = refused(lines)
    assert error.line == 4  # the header, revisions 1 and 2, then revision 4
    assert error.problem is not None
    assert error.problem.kind is ProblemKind.REVISION_GAP


def test_a_truncated_export_is_refused() -> None:
    lines = export(build())
    assert "truncated" in str(refused(lines[:-1]))
    assert "truncated" in str(refused(lines[:-3]))


@pytest.mark.parametrize(("index", "changes", "message"), [
    (-1, {"versions": 8}, "counts 8 versions"),
    (-1, {"digest": "9:" + "0" * 64}, "not the digest"),
    (-1, {"digest": "nine"}, "REVISION:64-hex-digits"),
    (0, {"format": "casledger-export/0"}, "no header record"),
    (0, {"revision": 5}, "the header says revision 5"),
    (1, {"revision": "1"}, "revision must be a non-negative integer"),
    (1, {"version": True}, "version must be a non-negative integer"),
    (1, {"name": 7}, "name must be a string"),
    (1, {"deleted": 0}, "deleted must be true or false"),
    (1, {"hash": "00"}, "hash must be 64 hex digits"),
    (1, {"hash": "zz" * 32}, "non-hexadecimal"),
    (1, {"content_base64": "not base64!"}, "content_base64 is not base64"),
    (1, {"extra": 1}, "exactly the export's fields"),
    (1, {"record": "header"}, "unexpected header record"),
])
def test_a_malformed_record_is_refused(index: int, changes: dict[str, Any], message: str) -> None:
    lines = export(build())
    lines[index] = edit(lines[index], **changes)
    assert message in str(refused(lines))


def test_a_line_that_is_not_json_is_refused() -> None:
    lines = export(build())
    lines[2] = "{not json\n"
    assert str(refused(lines)).startswith("line 3: not JSON")


def test_anything_after_the_end_record_is_refused() -> None:
    lines = export(build())
    assert "after the end record" in str(refused([*lines, lines[1]]))


def test_an_empty_ledger_exports_and_reads_back() -> None:
    assert list(read_export(export([]))) == []


# --- diff ----------------------------------------------------------------------------------


def ops(a: JSONValue, b: JSONValue) -> list[dict[str, Any]]:
    return [change.as_patch() for change in diff_json(a, b)]


def test_a_structural_diff_names_each_changed_path() -> None:
    a = {"title": "draft", "tags": ["a", "b"], "meta": {"n": 1}, "gone": True}
    b = {"title": "final", "tags": ["a"], "meta": {"n": 1, "m": None}, "a/b": 1}
    assert ops(a, b) == [
        {"op": "remove", "path": "/gone", "old": True},
        {"op": "replace", "path": "/title", "value": "final", "old": "draft"},
        {"op": "remove", "path": "/tags/1", "old": "b"},
        {"op": "add", "path": "/meta/m", "value": None},
        {"op": "add", "path": "/a~1b", "value": 1},
    ]


def test_numbers_compare_by_value_and_booleans_are_not_numbers() -> None:
    assert ops({"n": 1}, {"n": 1.0}) == []
    assert ops({"n": 1}, {"n": True}) == [
        {"op": "replace", "path": "/n", "value": True, "old": 1}]
    assert ops([0], [False]) == [{"op": "replace", "path": "/0", "value": False, "old": 0}]


def test_a_changed_type_at_the_root_is_one_replace() -> None:
    assert ops({"a": 1}, [1]) == [{"op": "replace", "path": "", "value": [1], "old": {"a": 1}}]


scalars = (st.none() | st.booleans() | st.integers(-5, 5) | st.sampled_from([0.5, 1.0])
           | st.text(max_size=3))
keys = st.sampled_from(["a", "b", "", "~", "/", "0"])
documents: st.SearchStrategy[JSONValue] = st.recursive(
    scalars, lambda children: st.lists(children, max_size=4)
    | st.dictionaries(keys, children, max_size=4), max_leaves=20)


@FAST
@given(documents, documents)
def test_the_diff_is_a_json_patch_from_a_to_b(a: JSONValue, b: JSONValue) -> None:
    patched = json_patch(a, ops(a, b))  # type: ignore[arg-type]
    assert diff_json(patched, b) == []


@FAST
@given(documents)
def test_a_document_has_no_diff_with_itself(a: JSONValue) -> None:
    assert diff_json(a, a) == []


def test_text_diffs_are_unified_and_binary_is_not_text() -> None:
    lines = diff_text(b"one\ntwo\n", b"one\nthree\n", "x@1", "x@2")
    assert lines == ["--- x@1", "+++ x@2", "@@ -1,2 +1,2 @@", " one", "-two", "+three"]
    assert diff_text(b"\xff", b"a", "x@1", "x@2") is None
