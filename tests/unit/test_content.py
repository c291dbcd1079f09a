"""Unit tests for service/content.py: media types and strict JSON."""

from __future__ import annotations

import contextlib
import json
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from casledger.service import content, errors
from casledger.service.content import (
    DEFAULT_CONTENT_TYPE,
    MAX_INT_DIGITS,
    MAX_JSON_DEPTH,
    JSONValue,
    dump_json,
    is_json_media_type,
    normalize_media_type,
    parse_json,
    validate_content,
)

# No example database: it would write .hypothesis/ into the working tree.
FAST = settings(max_examples=200, deadline=None, database=None)

json_values: st.SearchStrategy[JSONValue] = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


def canonical(value: JSONValue) -> str:
    """Type-exact comparison: unlike ==, tells true from 1 and 1 from 1.0."""
    return json.dumps(value, sort_keys=True)


def nested(depth: int, open_: str = "[", close: str = "]") -> bytes:
    return (open_ * depth + close * depth).encode()


# --- normalize_media_type ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given_type", "expected"),
    [
        ("", DEFAULT_CONTENT_TYPE),
        ("application/json", "application/json"),
        ("Application/JSON", "application/json"),
        ("  text/plain\t", "text/plain"),
        ("text/plain; charset=utf-8", "text/plain;charset=utf-8"),
        ("text/plain ;\tCharSet=UTF-8", "text/plain;charset=UTF-8"),
        ("text/plain;charset=utf-8;format=flowed", "text/plain;charset=utf-8;format=flowed"),
        ('text/plain; title="a b\\"c;d"', 'text/plain;title="a b\\"c;d"'),
        ('text/plain; x=""', 'text/plain;x=""'),
        ("text/plain;", "text/plain"),
        ("text/plain;;a=b", "text/plain;a=b"),
        ("application/vnd.api+json", "application/vnd.api+json"),
        ("application/x-www-form-urlencoded", "application/x-www-form-urlencoded"),
        ("a/b; c=!#$%&'*+-.^_`|~", "a/b;c=!#$%&'*+-.^_`|~"),
    ],
)
def test_normalize_media_type_accepts(given_type: str, expected: str) -> None:
    assert normalize_media_type(given_type) == expected


@pytest.mark.parametrize(
    "bad",
    [
        " ",
        "text",
        "text/",
        "/plain",
        "text//plain",
        "te xt/plain",
        "text/pl ain",
        "text/plain charset=utf-8",
        "text/plain; charset",
        "text/plain; charset=",
        "text/plain; =utf-8",
        "text/plain; charset = utf-8",
        'text/plain; a="unterminated',
        'text/plain; a="bad\x01control"',
        "text/plain; a=b c",
        "text/plain\x00",
        "text/pläin",
        "text/plain; a=ü",
        "*/*",
        "text/*",
        "text/plain\r\nX-Injected: 1",
        "text/plain/extra",
    ],
)
def test_normalize_media_type_rejects(bad: str) -> None:
    with pytest.raises(errors.InvalidContent) as caught:
        normalize_media_type(bad)
    assert caught.value.field == "content_type"


def test_normalize_media_type_length_limit() -> None:
    at_limit = "a/" + "b" * 253
    assert normalize_media_type(at_limit) == at_limit
    with pytest.raises(errors.InvalidContent, match="at most 255"):
        normalize_media_type(at_limit + "b")


def test_normalize_media_type_names_the_field() -> None:
    with pytest.raises(errors.InvalidContent) as caught:
        normalize_media_type("nope", field="patch.media_type")
    assert caught.value.field == "patch.media_type"
    assert "'nope'" in caught.value.message


@FAST
@given(st.text(max_size=40))
def test_normalize_media_type_only_raises_invalid_content(value: str) -> None:
    try:
        normalized = normalize_media_type(value)
    except errors.InvalidContent:
        return
    assert normalize_media_type(normalized) == normalized
    assert len(normalized) <= max(len(value), len(DEFAULT_CONTENT_TYPE))


# --- is_json_media_type -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("media_type", "expected"),
    [
        ("application/json", True),
        ("APPLICATION/JSON", True),
        ("application/json; charset=utf-8", True),
        ("application/json;charset=utf-8", True),
        ("application/merge-patch+json", True),
        ("application/problem+json", True),
        ("text/vnd.example+json", True),
        ("application/+json", False),
        ("application/jsonx", False),
        ("application/json-seq", False),
        ("text/json", False),
        ("application/x+json+xml", False),
        ("text/plain", False),
        ("json", False),
        ("/json", False),
        ("", False),
    ],
)
def test_is_json_media_type(media_type: str, expected: bool) -> None:
    assert is_json_media_type(media_type) is expected


# --- parse_json: what it accepts --------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"null", None),
        (b"true", True),
        (b"0", 0),
        (b"-0.5e1", -5.0),
        (b'"x"', "x"),
        (b' \t\r\n{"a": [1, 2.5, "\\u00e9", null, false]} ', {"a": [1, 2.5, "é", None, False]}),
        ('"é😀"'.encode(), "é😀"),
        (b'"\\ud83d\\ude00"', "😀"),  # an escaped surrogate *pair* is one character
        (b'"\\\\ud800"', "\\ud800"),  # an escaped backslash, not a surrogate escape
        (b'"[[[[" ', "[[[["),
        (b'{"a": 1, "b": {"a": 2}}', {"a": 1, "b": {"a": 2}}),  # same key, different objects
    ],
)
def test_parse_json_accepts(data: bytes, expected: JSONValue) -> None:
    assert canonical(parse_json(data, field="content")) == canonical(expected)


def test_parse_json_depth_limit_is_inclusive() -> None:
    value = parse_json(nested(MAX_JSON_DEPTH), field="content")
    assert dump_json(value) == nested(MAX_JSON_DEPTH)
    parse_json(b'{"a":' * MAX_JSON_DEPTH + b"1" + b"}" * MAX_JSON_DEPTH, field="content")


def test_parse_json_integer_digit_limit_is_inclusive() -> None:
    digits = "9" * MAX_INT_DIGITS
    assert parse_json(f"[-{digits}]".encode(), field="content") == [-int(digits)]


def test_many_brackets_are_not_deep_nesting() -> None:
    data = b"[" + b",".join([b'{"a":[]}'] * 1000) + b"]"
    assert parse_json(data, field="content") == [{"a": []}] * 1000


def test_brackets_inside_strings_do_not_count_toward_depth() -> None:
    text = '["' + "[" * 10_000 + '\\"{", "]"]'
    assert parse_json(text.encode(), field="content") == ["[" * 10_000 + '"{', "]"]


# --- parse_json: what it refuses --------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b"", "Expecting value (line 1, column 1)"),
        (b"   ", "Expecting value"),
        (b"{", "line 1, column 2"),
        (b'{"a": 1,\n "b": }', "line 2, column 7"),
        (b"[1,]", "Expecting value"),
        (b"[1] [2]", "Extra data"),
        (b"{'a': 1}", "double quotes"),
        (b"01", "Extra data"),
        (b"+1", "Expecting value"),
        (b".5", "Expecting value"),
        (b"1.", "Extra data"),
        (b'"tab\there"', "Invalid control character"),
        (b'"\\x41"', "Invalid \\escape"),
        (b'"unterminated [[[', "Unterminated string"),
        ("\u0661".encode(), "Expecting value"),  # a non-ASCII digit
        (b"\xef\xbb\xbf{}", "byte order mark"),
        (b"\xff", "not valid UTF-8"),
        (b'"\xe2\x82"', "not valid UTF-8"),  # truncated sequence
        (b'"\xc0\xaf"', "not valid UTF-8"),  # overlong encoding of "/"
        (b'"\xed\xa0\x80"', "not valid UTF-8"),  # a surrogate encoded in UTF-8
        (b"NaN", "NaN is not a JSON value"),
        (b"[Infinity]", "Infinity is not a JSON value"),
        (b'{"a": -Infinity}', "-Infinity is not a JSON value"),
        (b"1e400", "outside the range of a double"),
        (b"-1" + b"0" * 400 + b".0", "outside the range of a double"),
        (b'{"a": 1, "a": 2}', "duplicate object key 'a'"),
        (b'[{"b": {"x": 1, "y": 2, "x": 3}}]', "duplicate object key 'x'"),
        (b'"\\ud800"', "unpaired surrogate \\ud800"),
        (b'{"\\udfff": 1}', "unpaired surrogate \\udfff"),
        (b'["ok", "\\ud83d\\u0041"]', "unpaired surrogate \\ud83d"),
        (b'"\\ude00\\ud83d"', "unpaired surrogate"),
    ],
)
def test_parse_json_rejects(data: bytes, fragment: str) -> None:
    with pytest.raises(errors.InvalidContent) as caught:
        parse_json(data, field="content")
    assert caught.value.field == "content"
    assert fragment in caught.value.message


@pytest.mark.parametrize(
    "data",
    [
        nested(10_000),
        nested(10_000, '{"a":', "}").replace(b"}", b"1}", 1),
        b"[" * 10_000,  # unclosed, too
        nested(MAX_JSON_DEPTH + 1),
        b'[{"a": ' * 300 + b"[" * 300,
    ],
)
def test_parse_json_rejects_deep_nesting_cleanly(data: bytes) -> None:
    with pytest.raises(errors.InvalidContent, match=f"more than {MAX_JSON_DEPTH} levels deep"):
        parse_json(data, field="content")


def test_deep_nesting_error_gives_the_position() -> None:
    # The "{" on line 1 is level 1, so the 512th "[" on line 2 opens level 513.
    data = b'{"a":\n' + nested(MAX_JSON_DEPTH + 5) + b"\n}"
    with pytest.raises(errors.InvalidContent, match=r"\(line 2, column 512\)"):
        parse_json(data, field="content")


@pytest.mark.parametrize("sign", ["", "-"])
def test_parse_json_rejects_huge_integers(sign: str) -> None:
    data = f'{{"n": {sign}{"1" * 100_000}}}'.encode()
    with pytest.raises(errors.InvalidContent, match="an integer has 100000 digits; at most 4300"):
        parse_json(data, field="content")


def test_parse_json_respects_a_lower_interpreter_integer_limit() -> None:
    previous = sys.get_int_max_str_digits()
    sys.set_int_max_str_digits(640)
    try:
        with pytest.raises(errors.InvalidContent, match="1000 digits is too long for this server"):
            parse_json(b"1" * 1000, field="content")
    finally:
        sys.set_int_max_str_digits(previous)


@pytest.mark.parametrize("failure", [RecursionError, ValueError])
def test_parse_json_translates_decoder_failures_it_did_not_foresee(
    monkeypatch: pytest.MonkeyPatch, failure: type[Exception]
) -> None:
    class Failing(json.JSONDecoder):
        def decode(self, *args: object, **kwargs: object) -> object:
            raise failure("boom")

    monkeypatch.setattr(content, "_DECODER", Failing())
    with pytest.raises(errors.InvalidContent, match=f"not valid JSON: {failure.__name__}"):
        parse_json(b"[]", field="content")


def test_parse_json_raises_the_requested_error_type_and_field() -> None:
    with pytest.raises(errors.InvalidPatch) as caught:
        parse_json(b"{", field="patch.document", error=errors.InvalidPatch)
    assert caught.value.field == "patch.document"
    assert caught.value.message.startswith("patch.document is not valid JSON")


@FAST
@given(st.binary(max_size=200))
def test_parse_json_raises_only_the_requested_error(data: bytes) -> None:
    with contextlib.suppress(errors.InvalidContent):
        parse_json(data, field="content")


json_ish = st.text(alphabet='[]{}",:0123456789.eE-+ ntrufalsNIiy\\u\ud800', max_size=60)


@FAST
@given(json_ish)
def test_parse_json_on_json_like_text(text: str) -> None:
    data = text.encode("utf-8", "surrogatepass")
    try:
        value = parse_json(data, field="content")
    except errors.InvalidContent:
        return
    assert canonical(parse_json(dump_json(value), field="content")) == canonical(value)


# --- dump_json --------------------------------------------------------------------------------


def test_dump_json_is_compact_utf8_and_keeps_key_order() -> None:
    assert dump_json({"b": [1, 2.5, None], "a": "é😀"}) == '{"b":[1,2.5,null],"a":"é😀"}'.encode()


@pytest.mark.parametrize("number", [float("nan"), float("inf"), float("-inf")])
def test_dump_json_refuses_non_finite_numbers(number: float) -> None:
    with pytest.raises(ValueError, match="JSON compliant"):
        dump_json([number])


@FAST
@given(json_values)
def test_dump_then_parse_round_trips(value: JSONValue) -> None:
    assert canonical(parse_json(dump_json(value), field="content")) == canonical(value)


# --- validate_content -------------------------------------------------------------------------


def test_validate_content_returns_the_normalized_type() -> None:
    assert validate_content(b'{"a":1}', "", limit=100) == "application/json"
    assert (
        validate_content(b"[]", "Application/Problem+JSON ", limit=2) == "application/problem+json"
    )
    assert validate_content(b"\xff\x00", "application/octet-stream", limit=2) == (
        "application/octet-stream"
    )
    assert validate_content(b"not json", "text/plain; charset=utf-8", limit=100) == (
        "text/plain;charset=utf-8"
    )


def test_validate_content_checks_size_first() -> None:
    with pytest.raises(errors.ContentTooLarge) as caught:
        validate_content(b"x" * 11, "not a media type", limit=10)
    assert (caught.value.size, caught.value.limit, caught.value.field) == (11, 10, "content")
    assert caught.value.metadata() == {"field": "content", "limit": "10"}


@pytest.mark.parametrize("content_type", ["", "application/json", "application/vnd.x+json"])
def test_validate_content_parses_json_types(content_type: str) -> None:
    with pytest.raises(errors.InvalidContent) as caught:
        validate_content(b'{"a": NaN}', content_type, limit=100)
    assert caught.value.field == "content"


def test_validate_content_rejects_a_bad_media_type() -> None:
    with pytest.raises(errors.InvalidContent) as caught:
        validate_content(b"{}", "application/json; charset", limit=100)
    assert caught.value.field == "content_type"


def test_validate_content_rejects_deep_json() -> None:
    with pytest.raises(errors.InvalidContent):
        validate_content(nested(10_000), "application/json", limit=1 << 20)
