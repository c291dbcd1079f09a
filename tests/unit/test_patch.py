"""Unit tests for service/patch.py: RFC 7396 merge patch and RFC 6902 JSON Patch."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from casledger.service import errors
from casledger.service.content import MAX_JSON_DEPTH, JSONValue, dump_json, parse_json
from casledger.service.patch import (
    JSON_PATCH,
    MERGE_PATCH,
    SUPPORTED,
    apply_patch,
    json_patch,
    merge_patch,
)

# No example database: it would write .hypothesis/ into the working tree.
FAST = settings(max_examples=200, deadline=None, database=None)

scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=6)
)
keys = st.sampled_from(["a", "b", "c", "", "~", "/", "0"])
json_values: st.SearchStrategy[JSONValue] = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(keys, children, max_size=4),
    max_leaves=20,
)
# Merge patch cannot set an object member to null (null means "remove"), so targets whose objects
# hold nulls are not representable; inside arrays (replaced whole) anything goes.
mergeable_values: st.SearchStrategy[JSONValue] = st.recursive(
    scalars,
    lambda children: (
        st.lists(children | json_values, max_size=4)
        | st.dictionaries(keys, children.filter(lambda v: v is not None), max_size=4)
    ),
    max_leaves=20,
)


def canonical(value: JSONValue) -> str:
    """Type-exact comparison: unlike ==, tells true from 1 and 1 from 1.0."""
    return json.dumps(value, sort_keys=True)


def j(text: str) -> Any:
    return json.loads(text)


def nest(depth: int) -> JSONValue:
    value: JSONValue = []
    for _ in range(depth - 1):
        value = [value]
    return value


def patch_json(document: JSONValue, operations: str) -> JSONValue:
    return json_patch(document, j(operations))


# --- RFC 7396 Appendix A ----------------------------------------------------------------------

RFC7396_EXAMPLES = [
    ('{"a":"b"}', '{"a":"c"}', '{"a":"c"}'),
    ('{"a":"b"}', '{"b":"c"}', '{"a":"b","b":"c"}'),
    ('{"a":"b"}', '{"a":null}', "{}"),
    ('{"a":"b","b":"c"}', '{"a":null}', '{"b":"c"}'),
    ('{"a":["b"]}', '{"a":"c"}', '{"a":"c"}'),
    ('{"a":"c"}', '{"a":["b"]}', '{"a":["b"]}'),
    ('{"a":{"b":"c"}}', '{"a":{"b":"d","c":null}}', '{"a":{"b":"d"}}'),
    ('{"a":[{"b":"c"}]}', '{"a":[1]}', '{"a":[1]}'),
    ('["a","b"]', '["c","d"]', '["c","d"]'),
    ('{"a":"b"}', '["c"]', '["c"]'),
    ('{"a":"foo"}', "null", "null"),
    ('{"a":"foo"}', '"bar"', '"bar"'),
    ('{"e":null}', '{"a":1}', '{"e":null,"a":1}'),
    ("[1,2]", '{"a":"b","c":null}', '{"a":"b"}'),
    ("{}", '{"a":{"bb":{"ccc":null}}}', '{"a":{"bb":{}}}'),
]


@pytest.mark.parametrize(("original", "patch", "result"), RFC7396_EXAMPLES)
def test_rfc7396_appendix_a(original: str, patch: str, result: str) -> None:
    assert canonical(merge_patch(j(original), j(patch))) == canonical(j(result))
    applied = apply_patch(MERGE_PATCH, patch.encode(), original.encode())
    assert canonical(j(applied.decode())) == canonical(j(result))


def test_merge_patch_keeps_arrays_in_the_patch_verbatim() -> None:
    # Nulls inside an array are values, not deletions: arrays are never merged.
    assert merge_patch({"a": 1}, {"a": [None, {"x": None}]}) == {"a": [None, {"x": None}]}


def test_merge_patch_does_not_mutate_or_alias_its_inputs() -> None:
    target: JSONValue = {"a": {"b": [1]}, "c": 2}
    patch: JSONValue = {"a": {"d": [3]}, "c": None}
    result = merge_patch(target, patch)
    assert result == {"a": {"b": [1], "d": [3]}}
    assert target == {"a": {"b": [1]}, "c": 2}
    assert patch == {"a": {"d": [3]}, "c": None}
    assert isinstance(result, dict)
    assert isinstance(result["a"], dict)
    assert isinstance(target["a"], dict)
    assert isinstance(patch["a"], dict)
    assert result["a"]["b"] is not target["a"]["b"]
    assert result["a"]["d"] is not patch["a"]["d"]


def merge_diff(source: JSONValue, target: JSONValue) -> JSONValue:
    """A merge patch that turns `source` into `target` (RFC 7396 §3 describes the idea)."""
    if not (isinstance(source, dict) and isinstance(target, dict)):
        return target
    diff: dict[str, JSONValue] = {name: None for name in source if name not in target}
    for name, value in target.items():
        if name not in source:
            diff[name] = value
        elif canonical(source[name]) != canonical(value):
            diff[name] = merge_diff(source[name], value)
    return diff


@FAST
@given(json_values, mergeable_values)
def test_merge_patch_from_a_diff_reproduces_the_target(
    source: JSONValue, target: JSONValue
) -> None:
    before = canonical(source)
    assert canonical(merge_patch(source, merge_diff(source, target))) == canonical(target)
    assert canonical(source) == before


@FAST
@given(json_values, json_values)
def test_merge_patch_is_idempotent(target: JSONValue, patch: JSONValue) -> None:
    once = merge_patch(target, patch)
    assert canonical(merge_patch(once, patch)) == canonical(once)


# --- RFC 6902 Appendix A ----------------------------------------------------------------------

RFC6902_EXAMPLES = {
    "A.1 adding an object member": (
        '{"foo": "bar"}',
        '[{"op": "add", "path": "/baz", "value": "qux"}]',
        '{"baz": "qux", "foo": "bar"}',
    ),
    "A.2 adding an array element": (
        '{"foo": ["bar", "baz"]}',
        '[{"op": "add", "path": "/foo/1", "value": "qux"}]',
        '{"foo": ["bar", "qux", "baz"]}',
    ),
    "A.3 removing an object member": (
        '{"baz": "qux", "foo": "bar"}',
        '[{"op": "remove", "path": "/baz"}]',
        '{"foo": "bar"}',
    ),
    "A.4 removing an array element": (
        '{"foo": ["bar", "qux", "baz"]}',
        '[{"op": "remove", "path": "/foo/1"}]',
        '{"foo": ["bar", "baz"]}',
    ),
    "A.5 replacing a value": (
        '{"baz": "qux", "foo": "bar"}',
        '[{"op": "replace", "path": "/baz", "value": "boo"}]',
        '{"baz": "boo", "foo": "bar"}',
    ),
    "A.6 moving a value": (
        '{"foo": {"bar": "baz", "waldo": "fred"}, "qux": {"corge": "grault"}}',
        '[{"op": "move", "from": "/foo/waldo", "path": "/qux/thud"}]',
        '{"foo": {"bar": "baz"}, "qux": {"corge": "grault", "thud": "fred"}}',
    ),
    "A.7 moving an array element": (
        '{"foo": ["all", "grass", "cows", "eat"]}',
        '[{"op": "move", "from": "/foo/1", "path": "/foo/3"}]',
        '{"foo": ["all", "cows", "eat", "grass"]}',
    ),
    "A.8 testing a value: success": (
        '{"baz": "qux", "foo": ["a", 2, "c"]}',
        '[{"op": "test", "path": "/baz", "value": "qux"},'
        ' {"op": "test", "path": "/foo/1", "value": 2}]',
        '{"baz": "qux", "foo": ["a", 2, "c"]}',
    ),
    "A.10 adding a nested member object": (
        '{"foo": "bar"}',
        '[{"op": "add", "path": "/child", "value": {"grandchild": {}}}]',
        '{"foo": "bar", "child": {"grandchild": {}}}',
    ),
    "A.11 ignoring unrecognized elements": (
        '{"foo": "bar"}',
        '[{"op": "add", "path": "/baz", "value": "qux", "xyz": 123}]',
        '{"foo": "bar", "baz": "qux"}',
    ),
    "A.14 ~ escape ordering": (
        '{"/": 9, "~1": 10}',
        '[{"op": "test", "path": "/~01", "value": 10}]',
        '{"/": 9, "~1": 10}',
    ),
    "A.16 adding an array value": (
        '{"foo": ["bar"]}',
        '[{"op": "add", "path": "/foo/-", "value": ["abc", "def"]}]',
        '{"foo": ["bar", ["abc", "def"]]}',
    ),
}


@pytest.mark.parametrize(
    ("document", "patch", "result"), RFC6902_EXAMPLES.values(), ids=RFC6902_EXAMPLES.keys()
)
def test_rfc6902_appendix_a(document: str, patch: str, result: str) -> None:
    assert canonical(patch_json(j(document), patch)) == canonical(j(result))
    applied = apply_patch(JSON_PATCH, patch.encode(), document.encode())
    assert canonical(j(applied.decode())) == canonical(j(result))


@pytest.mark.parametrize(
    ("document", "patch", "path"),
    [
        pytest.param(
            '{"baz": "qux", "foo": ["a", 2, "c"]}',
            '[{"op": "test", "path": "/baz", "value": "bar"}]',
            "/baz",
            id="A.9 testing a value: error",
        ),
        pytest.param(
            '{"foo": "bar"}',
            '[{"op": "add", "path": "/baz/bat", "value": "qux"}]',
            "/baz/bat",
            id="A.12 adding to a nonexistent target",
        ),
        pytest.param(
            '{"/": 9, "~1": 10}',
            '[{"op": "test", "path": "/~01", "value": "10"}]',
            "/~01",
            id="A.15 comparing strings and numbers",
        ),
    ],
)
def test_rfc6902_appendix_a_errors(document: str, patch: str, path: str) -> None:
    with pytest.raises(errors.PatchConflict) as caught:
        apply_patch(JSON_PATCH, patch.encode(), document.encode())
    assert caught.value.path == path
    assert caught.value.message.startswith("operation 0 (")


def test_rfc6902_a13_invalid_document_duplicate_op() -> None:
    document = b'[{"op": "add", "path": "/baz", "value": "qux", "op": "remove"}]'
    with pytest.raises(errors.InvalidPatch, match="duplicate object key 'op'") as caught:
        apply_patch(JSON_PATCH, document, b'{"foo": "bar"}')
    assert caught.value.field == "patch.document"


def test_a15_message_says_the_types_differ() -> None:
    with pytest.raises(errors.PatchConflict, match=r"it is a number, not a string"):
        patch_json({"/": 9, "~1": 10}, '[{"op": "test", "path": "/~01", "value": "10"}]')


# --- JSON Patch: more operations that apply ---------------------------------------------------


@pytest.mark.parametrize(
    ("document", "patch", "result"),
    [
        ('{"a": 1}', '[{"op": "add", "path": "", "value": [1]}]', "[1]"),
        ('{"a": 1}', '[{"op": "add", "path": "/a", "value": null}]', '{"a": null}'),
        ('{"a": 1}', '[{"op": "add", "path": "/", "value": 2}]', '{"a": 1, "": 2}'),
        ("[1, 2]", '[{"op": "add", "path": "/2", "value": 3}]', "[1, 2, 3]"),
        ("[1, 2]", '[{"op": "add", "path": "/0", "value": 0}]', "[0, 1, 2]"),
        ('{"a": 1}', '[{"op": "replace", "path": "", "value": "x"}]', '"x"'),
        ("[1, 2]", '[{"op": "replace", "path": "/1", "value": {}}]', "[1, {}]"),
        ('{"a/b": {"m~n": 1}}', '[{"op": "remove", "path": "/a~1b/m~0n"}]', '{"a/b": {}}'),
        ('{"a": [1]}', '[{"op": "move", "from": "/a", "path": "/a"}]', '{"a": [1]}'),
        ('{"a": [1]}', '[{"op": "move", "from": "", "path": ""}]', '{"a": [1]}'),
        ('{"a": [1]}', '[{"op": "move", "from": "/a", "path": ""}]', "[1]"),
        ('{"a": 1, "b": [2]}', '[{"op": "move", "from": "/a", "path": "/b/-"}]', '{"b": [2, 1]}'),
        ('{"a": 1, "b": 2}', '[{"op": "move", "from": "/a", "path": "/b"}]', '{"b": 1}'),
        ('{"a": {"b": 1}}', '[{"op": "move", "from": "/a/b", "path": "/a/c"}]', '{"a": {"c": 1}}'),
        (
            '{"a": [1, 2]}',
            '[{"op": "copy", "from": "/a", "path": "/a/-"}]',
            '{"a": [1, 2, [1, 2]]}',
        ),
        ('{"a": 1}', '[{"op": "copy", "from": "", "path": "/b"}]', '{"a": 1, "b": {"a": 1}}'),
        ('{"a": 1}', '[{"op": "test", "path": "", "value": {"a": 1.0}}]', '{"a": 1}'),
        (
            '{"a": [1, {"b": [null]}]}',
            '[{"op": "test", "path": "/a", "value": [1.0, {"b": [null]}]}]',
            '{"a": [1, {"b": [null]}]}',
        ),
        (
            '{"a": 1, "b": 2}',
            '[{"op": "test", "path": "", "value": {"b": 2, "a": 1}}]',
            '{"a": 1, "b": 2}',
        ),
        ('{"a": 1}', "[]", '{"a": 1}'),
        (
            '{"list": [1]}',
            '[{"op": "add", "path": "/list/-", "value": 2},'
            ' {"op": "copy", "from": "/list", "path": "/copy"},'
            ' {"op": "remove", "path": "/list/0"},'
            ' {"op": "test", "path": "/copy", "value": [1, 2]}]',
            '{"list": [2], "copy": [1, 2]}',
        ),
    ],
)
def test_json_patch_applies(document: str, patch: str, result: str) -> None:
    assert canonical(patch_json(j(document), patch)) == canonical(j(result))


def test_json_patch_copies_are_independent() -> None:
    result = patch_json(
        {"a": {"x": 1}},
        '[{"op": "copy", "from": "/a", "path": "/b"}, {"op": "add", "path": "/b/y", "value": 2}]',
    )
    assert result == {"a": {"x": 1}, "b": {"x": 1, "y": 2}}


def test_json_patch_does_not_mutate_its_inputs() -> None:
    target: JSONValue = {"a": [1, {"b": 2}]}
    operations: JSONValue = j(
        '[{"op": "add", "path": "/v", "value": {"k": []}}, {"op": "add", "path": "/v/k/-",'
        ' "value": 1}, {"op": "remove", "path": "/a/1/b"}, {"op": "move", "from": "/a/0",'
        ' "path": "/m"}]'
    )
    before = canonical(target), canonical(operations)
    assert json_patch(target, operations) == {"a": [{}], "v": {"k": [1]}, "m": 1}
    assert (canonical(target), canonical(operations)) == before


# --- JSON Patch: malformed documents ----------------------------------------------------------


@pytest.mark.parametrize(
    ("patch", "fragment"),
    [
        (
            '{"op": "add", "path": "/a", "value": 1}',
            "must be an array of operations, not an object",
        ),
        ("null", "not a null"),
        ("[1]", "operation 0: must be an object, not a number"),
        ('[{"op": "test", "path": "", "value": 1}, []]', "operation 1: must be an object, not an"),
        ('[{"path": "/a"}]', "operation 0: missing member 'op'"),
        ('[{"op": 1, "path": "/a"}]', "'op' must be one of add, remove, replace, move, copy, test"),
        ('[{"op": "ADD", "path": "/a", "value": 1}]', "not 'ADD'"),
        ('[{"op": "frobnicate", "path": "/a"}]', "not 'frobnicate'"),
        ('[{"op": "add", "value": 1}]', "operation 0 (add): missing member 'path'"),
        ('[{"op": "add", "path": "/a"}]', "operation 0 (add): missing member 'value'"),
        ('[{"op": "replace", "path": "/a"}]', "operation 0 (replace): missing member 'value'"),
        ('[{"op": "test", "path": "/a"}]', "operation 0 (test): missing member 'value'"),
        ('[{"op": "remove"}]', "operation 0 (remove): missing member 'path'"),
        ('[{"op": "move", "path": "/a"}]', "operation 0 (move): missing member 'from'"),
        ('[{"op": "copy", "from": "/a"}]', "operation 0 (copy): missing member 'path'"),
        ('[{"op": "remove", "path": 1}]', "'path' must be a JSON Pointer string, not a number"),
        ('[{"op": "remove", "path": null}]', "'path' must be a JSON Pointer string, not a null"),
        ('[{"op": "copy", "from": ["/a"], "path": "/b"}]', "'from' must be a JSON Pointer string"),
        ('[{"op": "remove", "path": "a"}]', "'path' 'a' is not a JSON Pointer: it must be empty"),
        ('[{"op": "move", "from": "a/b", "path": "/c"}]', "'from' 'a/b' is not a JSON Pointer"),
        ('[{"op": "remove", "path": "/a~2"}]', "'~' at position 2 must be followed by 0 or 1"),
        ('[{"op": "remove", "path": "/a~"}]', "'~' at position 2 must be followed by 0 or 1"),
        ('[{"op": "remove", "path": "/~/a"}]', "'~' at position 1"),
        (
            '[{"op": "test", "path": "/a", "value": 1}, {"op": "remove", "path": "/b"},'
            ' {"op": "add", "path": "/c"}]',
            "operation 2 (add): missing member 'value'",
        ),
    ],
)
def test_json_patch_rejects_malformed_documents(patch: str, fragment: str) -> None:
    with pytest.raises(errors.InvalidPatch) as caught:
        apply_patch(JSON_PATCH, patch.encode(), b'{"a": 1}')
    assert caught.value.field == "patch.document"
    assert fragment in caught.value.message


def test_a_malformed_operation_is_reported_even_after_one_that_would_conflict() -> None:
    # The whole document is validated before anything is applied.
    with pytest.raises(errors.InvalidPatch, match="operation 1"):
        patch_json({}, '[{"op": "remove", "path": "/missing"}, {"op": "nope"}]')


# --- JSON Patch: well-formed operations that do not apply -------------------------------------


@pytest.mark.parametrize(
    ("document", "patch", "path", "fragment"),
    [
        (
            '{"a": 1}',
            '[{"op": "remove", "path": "/b"}]',
            "/b",
            "in the object at the document root",
        ),
        ('{"a": {}}', '[{"op": "remove", "path": "/a/b"}]', "/a/b", "in the object at '/a'"),
        ("1", '[{"op": "replace", "path": "/a", "value": 1}]', "/a", "root is a number"),
        ('"s"', '[{"op": "add", "path": "/0", "value": 1}]', "/0", "cannot exist: the value at"),
        ("[]", '[{"op": "add", "path": "/a", "value": 1}]', "/a", "'a' is not an index or '-'"),
        ('{"a": 1}', '[{"op": "remove", "path": ""}]', "", "cannot remove the whole document"),
        ('{"a": 1}', '[{"op": "replace", "path": "/b", "value": 1}]', "/b", "does not exist"),
        ('{"a": 1}', '[{"op": "test", "path": "/b", "value": 1}]', "/b", "does not exist"),
        ('{"a": 1}', '[{"op": "test", "path": "/a", "value": true}]', "/a", "not a boolean"),
        ('{"a": true}', '[{"op": "test", "path": "/a", "value": 1}]', "/a", "test failed"),
        ('{"a": 0}', '[{"op": "test", "path": "/a", "value": false}]', "/a", "test failed"),
        ('{"a": [true]}', '[{"op": "test", "path": "/a", "value": [1]}]', "/a", "test failed"),
        ('{"a": null}', '[{"op": "test", "path": "/a", "value": {}}]', "/a", "test failed"),
        (
            '{"a": {"b": 1}}',
            '[{"op": "test", "path": "/a", "value": {"c": 1}}]',
            "/a",
            "test failed",
        ),
        (
            '{"a": {"b": 1}}',
            '[{"op": "test", "path": "/a", "value": {"b": 1, "c": 1}}]',
            "/a",
            "test failed",
        ),
        ('{"a": [1, 2]}', '[{"op": "test", "path": "/a", "value": [2, 1]}]', "/a", "test failed"),
        ('{"a": [1, 2]}', '[{"op": "test", "path": "/a", "value": [1]}]', "/a", "test failed"),
        ('{"a": 1}', '[{"op": "add", "path": "/a/b", "value": 1}]', "/a/b", "cannot exist"),
        ('{"a": "s"}', '[{"op": "remove", "path": "/a/0"}]', "/a/0", "is a string"),
        ('{"a": 1}', '[{"op": "add", "path": "/x/y/z", "value": 1}]', "/x/y/z", "no member 'x'"),
        ('{"a": [1]}', '[{"op": "add", "path": "/a/2", "value": 1}]', "/a/2", "(length 1)"),
        ('{"a": [1]}', '[{"op": "add", "path": "/a/01", "value": 1}]', "/a/01", "'01' is not"),
        ('{"a": [1]}', '[{"op": "add", "path": "/a/-1", "value": 1}]', "/a/-1", "is not an index"),
        ('{"a": [1]}', '[{"op": "add", "path": "/a/+1", "value": 1}]', "/a/+1", "is not an index"),
        ('{"a": [1]}', '[{"op": "add", "path": "/a/ 1", "value": 1}]', "/a/ 1", "is not an index"),
        ('{"a": [1]}', '[{"op": "add", "path": "/a/1e0", "value": 1}]', "/a/1e0", "is not an"),
        ('{"a": [1]}', '[{"op": "add", "path": "/a/\u0661", "value": 1}]', "/a/\u0661", "not an"),
        (
            '{"a": [1]}',
            '[{"op": "add", "path": "/a/' + "9" * 5000 + '", "value": 1}]',
            "/a/" + "9" * 5000,
            "is not an index",
        ),
        ('{"a": [1]}', '[{"op": "remove", "path": "/a/1"}]', "/a/1", "(length 1)"),
        ('{"a": [1]}', '[{"op": "remove", "path": "/a/-"}]', "/a/-", "'-' is not an index"),
        ('{"a": [1]}', '[{"op": "replace", "path": "/a/-", "value": 2}]', "/a/-", "not an index"),
        ('{"a": [1]}', '[{"op": "test", "path": "/a/-", "value": 1}]', "/a/-", "not an index"),
        ('{"a": [[1]]}', '[{"op": "add", "path": "/a/-/0", "value": 1}]', "/a/-/0", "'-' is not"),
        ('{"a": [1]}', '[{"op": "copy", "from": "/a/-", "path": "/b"}]', "/a/-", "'-' is not"),
        ('{"a": [1]}', '[{"op": "move", "from": "/a/-", "path": "/b"}]', "/a/-", "'-' is not"),
        ('{"a": 1}', '[{"op": "move", "from": "/b", "path": "/c"}]', "/b", "no member 'b'"),
        ('{"a": 1}', '[{"op": "move", "from": "/b", "path": "/b"}]', "/b", "no member 'b'"),
        ('{"a": 1}', '[{"op": "copy", "from": "/b", "path": "/c"}]', "/b", "no member 'b'"),
        ('{"a": 1}', '[{"op": "move", "from": "/a", "path": "/x/y"}]', "/x/y", "no member 'x'"),
        (
            '{"a": {"b": 1}}',
            '[{"op": "move", "from": "/a", "path": "/a/b"}]',
            "/a/b",
            "into its own child",
        ),
        (
            '{"a": {"b": {}}}',
            '[{"op": "move", "from": "/a", "path": "/a/b/c"}]',
            "/a/b/c",
            "into its own child",
        ),
        ('{"a": 1}', '[{"op": "move", "from": "", "path": "/b"}]', "/b", "into its own child"),
        (
            '{"a": [1]}',
            '[{"op": "add", "path": "/b", "value": 1}, {"op": "test", "path": "/b", "value": 2}]',
            "/b",
            "operation 1 (test)",
        ),
    ],
)
def test_json_patch_conflicts(document: str, patch: str, path: str, fragment: str) -> None:
    with pytest.raises(errors.PatchConflict) as caught:
        apply_patch(JSON_PATCH, patch.encode(), document.encode())
    assert caught.value.path == path
    assert caught.value.metadata() == ({"path": path} if path else {})
    assert fragment in caught.value.message


def test_move_into_a_sibling_with_a_common_prefix_is_not_into_its_own_child() -> None:
    assert patch_json({"a": 1, "ab": {}}, '[{"op": "move", "from": "/a", "path": "/ab/a"}]') == {
        "ab": {"a": 1}
    }


def test_a_conflict_leaves_the_target_untouched() -> None:
    target: JSONValue = {"a": [1, 2]}
    with pytest.raises(errors.PatchConflict):
        patch_json(
            target,
            '[{"op": "remove", "path": "/a/0"}, {"op": "add", "path": "/b", "value": 1},'
            ' {"op": "test", "path": "/a/0", "value": 1}]',
        )
    assert target == {"a": [1, 2]}


# --- JSON Patch: resource limits --------------------------------------------------------------


def test_copy_budget_stops_a_copy_bomb() -> None:
    bomb = json.dumps([{"op": "copy", "from": "/a", "path": "/a/-"}] * 64).encode()
    with pytest.raises(errors.InvalidPatch, match="copies would create more than 1000 JSON values"):
        apply_patch(JSON_PATCH, bomb, b'{"a": [0]}', copy_budget=1000)


def test_copy_budget_counts_every_copied_value() -> None:
    copy = '[{"op": "copy", "from": "/a", "path": "/b"}]'
    assert patch_json({"a": [1, [2]]}, copy) == {"a": [1, [2]], "b": [1, [2]]}
    assert json_patch({"a": [1, [2]]}, j(copy), copy_budget=4) == {"a": [1, [2]], "b": [1, [2]]}
    with pytest.raises(errors.InvalidPatch, match="operation 0 \\(copy\\)"):
        json_patch({"a": [1, [2]]}, j(copy), copy_budget=3)


def test_patched_content_may_not_nest_deeper_than_content_can() -> None:
    # Adds a 300-deep value at the bottom of a 300-deep one: 601 levels with the outer object.
    current = dump_json({"a": nest(300)})
    patch = json.dumps([{"op": "copy", "from": "/a", "path": "/a" + "/0" * 299 + "/-"}])
    with pytest.raises(errors.InvalidPatch, match=f"more than {MAX_JSON_DEPTH} levels deep"):
        apply_patch(JSON_PATCH, patch.encode(), current)


def test_content_at_the_depth_limit_patches_fine() -> None:
    current = dump_json({"a": nest(MAX_JSON_DEPTH - 1)})
    result = apply_patch(MERGE_PATCH, b'{"b": 1}', current)
    assert result == dump_json({"a": nest(MAX_JSON_DEPTH - 1), "b": 1})
    result = apply_patch(JSON_PATCH, b'[{"op": "copy", "from": "/a", "path": "/c"}]', current)
    assert parse_json(result, field="content") == {
        "a": nest(MAX_JSON_DEPTH - 1),
        "c": nest(MAX_JSON_DEPTH - 1),
    }


# --- apply_patch ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "media_type",
    [
        MERGE_PATCH,
        "Application/Merge-Patch+JSON",
        "application/merge-patch+json; charset=utf-8",
        " application/merge-patch+json ;charset=utf-8",
    ],
)
def test_apply_patch_media_type_is_case_insensitive_and_ignores_parameters(
    media_type: str,
) -> None:
    assert apply_patch(media_type, '{"b": "é"}'.encode(), b'{"a": 1}') == '{"a":1,"b":"é"}'.encode()


@pytest.mark.parametrize(
    "media_type",
    ["", "application/json", "application/patch+json", "text/plain", "application/merge-patch"],
)
def test_apply_patch_refuses_other_media_types(media_type: str) -> None:
    with pytest.raises(errors.UnsupportedPatchType) as caught:
        apply_patch(media_type, b"{}", b"{}")
    assert caught.value.media_type == media_type
    assert caught.value.field == "patch.media_type"


def test_supported_lists_both() -> None:
    assert SUPPORTED == ("application/merge-patch+json", "application/json-patch+json")


def test_apply_patch_returns_compact_json() -> None:
    result = apply_patch(
        JSON_PATCH, b'[{"op": "add", "path": "/b", "value": [1, 2.0]}]', b'{"a": 1}'
    )
    assert result == b'{"a":1,"b":[1,2.0]}'


@pytest.mark.parametrize(
    ("document", "fragment"),
    [
        (b"[" * 10_000 + b"]" * 10_000, "more than 512 levels deep"),
        (b'{"a":' * 10_000 + b"1" + b"}" * 10_000, "more than 512 levels deep"),
        (b'{"a": 1' + b"0" * 100_000 + b"}", "an integer has 100001 digits"),
        (b"\xff", "not valid UTF-8"),
        (b"\xef\xbb\xbf{}", "byte order mark"),
        (b'{"a": NaN}', "NaN is not a JSON value"),
        (b'{"a": 1, "a": 2}', "duplicate object key 'a'"),
        (b'{"a": "\\udc00"}', "unpaired surrogate"),
        (b"", "Expecting value"),
    ],
)
@pytest.mark.parametrize("media_type", SUPPORTED)
def test_apply_patch_bad_document_is_invalid_patch(
    media_type: str, document: bytes, fragment: str
) -> None:
    with pytest.raises(errors.InvalidPatch) as caught:
        apply_patch(media_type, document, b"{}")
    assert caught.value.field == "patch.document"
    assert fragment in caught.value.message


@pytest.mark.parametrize(
    "current",
    [
        b"[" * 10_000 + b"]" * 10_000,
        b"1" * 100_000,
        b"\xff",
        b"NaN",
        b'{"a":1,"a":1}',
        b'"\\ud800"',
    ],
)
@pytest.mark.parametrize(("media_type", "document"), [(MERGE_PATCH, b"{}"), (JSON_PATCH, b"[]")])
def test_apply_patch_bad_current_is_invalid_content(
    media_type: str, document: bytes, current: bytes
) -> None:
    with pytest.raises(errors.InvalidContent) as caught:
        apply_patch(media_type, document, current)
    assert caught.value.field == "content"


# --- properties -------------------------------------------------------------------------------


@FAST
@given(json_values)
def test_empty_json_patch_is_identity(document: JSONValue) -> None:
    result = json_patch(document, [])
    assert canonical(result) == canonical(document)
    if isinstance(document, dict | list):
        assert result is not document


@FAST
@given(json_values)
def test_testing_the_whole_document_against_itself_succeeds(document: JSONValue) -> None:
    assert canonical(json_patch(document, [{"op": "test", "path": "", "value": document}])) == (
        canonical(document)
    )


@FAST
@given(st.dictionaries(keys, json_values, max_size=4), st.text(max_size=4), json_values)
def test_add_then_remove_a_new_member_is_identity(
    document: dict[str, JSONValue], name: str, value: JSONValue
) -> None:
    if name in document:
        return
    pointer = "/" + name.replace("~", "~0").replace("/", "~1")
    operations: JSONValue = [
        {"op": "add", "path": pointer, "value": value},
        {"op": "test", "path": pointer, "value": value},
        {"op": "remove", "path": pointer},
    ]
    assert canonical(json_patch(document, operations)) == canonical(document)


pointers = st.lists(
    st.sampled_from(["a", "b", "", "0", "1", "2", "-", "01", "~0", "~1", "~2", "x/y"]), max_size=3
).map(lambda tokens: "".join("/" + token for token in tokens))
operation_dicts = st.fixed_dictionaries(
    {"op": st.sampled_from(["add", "remove", "replace", "move", "copy", "test", "nope"])},
    optional={"path": pointers | st.integers(), "from": pointers, "value": json_values},
)


@FAST
@given(json_values, st.lists(operation_dicts, max_size=5))
def test_json_patch_raises_only_ledger_errors_and_never_mutates(
    document: JSONValue, operations: list[JSONValue]
) -> None:
    before = canonical(document), canonical(operations)
    try:
        result = json_patch(document, operations)
    except (errors.InvalidPatch, errors.PatchConflict):
        pass
    else:
        assert canonical(parse_json(dump_json(result), field="content")) == canonical(result)
    assert (canonical(document), canonical(operations)) == before


@FAST
@given(st.sampled_from(SUPPORTED), st.binary(max_size=200))
def test_apply_patch_on_arbitrary_documents_raises_only_ledger_errors(
    media_type: str, document: bytes
) -> None:
    with contextlib.suppress(errors.LedgerError):
        apply_patch(media_type, document, b'{"a": [1, {"b": null}], "c": "d"}')


@FAST
@given(st.sampled_from(SUPPORTED), st.binary(max_size=200))
def test_apply_patch_on_arbitrary_content_raises_only_ledger_errors(
    media_type: str, current: bytes
) -> None:
    document = {MERGE_PATCH: b'{"a": 1}', JSON_PATCH: b'[{"op": "remove", "path": "/a"}]'}
    with contextlib.suppress(errors.LedgerError):
        apply_patch(media_type, document[media_type], current)


@FAST
@given(st.sampled_from(SUPPORTED), json_values, json_values)
def test_apply_patch_on_arbitrary_json_raises_only_ledger_errors(
    media_type: str, patch: JSONValue, current: JSONValue
) -> None:
    try:
        result = apply_patch(media_type, dump_json(patch), dump_json(current))
    except errors.LedgerError:
        return
    parse_json(result, field="content")
