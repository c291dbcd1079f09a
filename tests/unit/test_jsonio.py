"""The bridge's JSON writer: orjson's bytes, the same JSON value as the standard library's, and
exact where orjson declines (integers beyond 64 bits, lone surrogates)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from casledger.http_bridge import jsonio

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20)


@given(JSON_VALUES)
def test_the_value_written_reads_back_as_the_same_value(value: Any) -> None:
    assert json.loads(jsonio.dumps(value)) == value


@pytest.mark.parametrize("value", [
    {"big": 2**64}, {"negative": -(2**63) - 1}, [10**40, 1.5], {"lone": "\ud800"},
])
def test_what_orjson_declines_is_written_exactly_by_json(value: Any) -> None:
    written = jsonio.dumps(value)
    assert json.loads(written) == value
    assert written.isascii()


def test_bodies_are_compact_utf8() -> None:
    assert jsonio.dumps({"a": [1, "é"]}) == '{"a":[1,"é"]}'.encode()
    response = jsonio.FastJSONResponse({"n": 2**70}, media_type="application/problem+json")
    assert response.body == b'{"n":1180591620717411303424}'
    assert response.headers["content-type"] == "application/problem+json"
