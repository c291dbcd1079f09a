"""Structured logs: the JSON and text formats, request ids, and choosing the format."""

from __future__ import annotations

import io
import json
import logging
import sys
from typing import Any

import pytest

from casledger.service import logs


def record(message: str = "hello %s", *args: Any, level: int = logging.INFO,
           exc_info: Any = None, **extra: Any) -> logging.LogRecord:
    return logging.getLogger("casledger.test").makeRecord(
        "casledger.test", level, __file__, 1, message, args or ("world",), exc_info, extra=extra)


def as_json(rec: logging.LogRecord) -> dict[str, Any]:
    line = logs.JSONFormatter().format(rec)
    assert "\n" not in line
    assert line.isascii()
    parsed: dict[str, Any] = json.loads(line)
    return parsed


def test_json_line_has_time_level_logger_message_and_fields() -> None:
    entry = as_json(record(rpc="casledger.v1.Ledger/GetResource", code="OK", duration_ms=1.5,
                           reason=None))

    assert entry.pop("time").endswith("Z")
    assert entry == {"level": "info", "logger": "casledger.test", "message": "hello world",
                     "rpc": "casledger.v1.Ledger/GetResource", "code": "OK",
                     "duration_ms": 1.5}  # None fields are left out


def test_json_time_is_rfc3339_utc_with_milliseconds() -> None:
    rec = record()
    rec.created = 1_700_000_000.25

    assert as_json(rec)["time"] == "2023-11-14T22:13:20.250Z"


def test_json_takes_the_request_id_of_the_context() -> None:
    token = logs.request_id.set("req-1")
    try:
        from_context = as_json(record())
        explicit = as_json(record(request_id="req-2"))
    finally:
        logs.request_id.reset(token)
    outside = as_json(record())

    assert from_context["request_id"] == "req-1"
    assert explicit["request_id"] == "req-2"
    assert "request_id" not in outside


def test_json_escapes_newlines_and_non_ascii_and_keeps_one_line() -> None:
    entry = as_json(record("line one\nline two: %s", "é", path="/v1/a\nb"))

    assert entry["message"] == "line one\nline two: é"
    assert entry["path"] == "/v1/a\nb"


def test_json_carries_the_exception() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        entry = as_json(record(level=logging.ERROR, exc_info=sys.exc_info()))

    assert entry["level"] == "error"
    assert "ValueError: boom" in entry["exception"]
    assert entry["exception"].startswith("Traceback")


def test_json_writes_what_json_cannot_hold_as_text() -> None:
    assert as_json(record(peer=object()))["peer"].startswith("<object object")


def test_text_line_appends_fields() -> None:
    line = logs.TextFormatter().format(record(status=412, route="/v1/{name}", reason="a b"))

    assert " INFO casledger.test hello world " in line
    assert line.endswith(' status=412 route=/v1/{name} reason="a b"')


def test_text_line_without_fields_is_the_classic_line() -> None:
    line = logs.TextFormatter().format(record())

    assert line.endswith(" INFO casledger.test hello world")


def test_text_line_keeps_the_traceback_below_the_fields() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        line = logs.TextFormatter().format(record(exc_info=sys.exc_info(), code="UNKNOWN"))

    first, rest = line.split("\n", 1)
    assert first.endswith("hello world code=UNKNOWN")
    assert rest.startswith("Traceback")


@pytest.mark.parametrize(("value", "valid"), [
    ("abc", True),
    ("0123456789abcdef0123456789abcdef", True),
    ("a" * 128, True),
    ("!~%/:=", True),
    ("a" * 129, False),
    ("", False),
    (None, False),
    ("a b", False),
    ("a\tb", False),
    ("caf\u00e9", False),
    ("a\x7f", False),
    ("a\nb", False),
])
def test_valid_request_id(value: str | None, valid: bool) -> None:
    assert logs.valid_request_id(value) is valid


def test_accept_request_id_keeps_a_valid_one_and_replaces_others() -> None:
    made = logs.accept_request_id("a b")

    assert logs.accept_request_id("req-7") == "req-7"
    assert len(made) == 32
    assert int(made, 16) >= 0
    assert logs.accept_request_id(None) != logs.accept_request_id(None)


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(("fmt", "stream", "chosen"), [
    ("auto", Terminal(), "text"),
    ("auto", io.StringIO(), "json"),
    ("json", Terminal(), "json"),
    ("text", io.StringIO(), "text"),
])
def test_resolve_format(fmt: str, stream: io.StringIO, chosen: str) -> None:
    assert logs.resolve_format(fmt, stream) == chosen


def test_resolve_format_refuses_others() -> None:
    with pytest.raises(ValueError, match="auto, json, text"):
        logs.resolve_format("xml", io.StringIO())


def test_formatter_by_name() -> None:
    assert isinstance(logs.formatter("json"), logs.JSONFormatter)
    assert isinstance(logs.formatter("text"), logs.TextFormatter)
