"""Structured logs: one JSON object per line (or readable text), and the request id of each call.

Every line carries ``time`` (RFC 3339, UTC), ``level``, ``logger`` and ``message``, then the
record's fields: whatever was passed as ``extra={...}``, and the ``request_id`` of the request or
call being served (a :class:`~contextvars.ContextVar` set by the bridge's middleware and by the
service's interceptor), so a request can be followed from the bridge's access line to the
service's. ``configure(level, fmt)`` installs the format on the root logger; ``auto`` writes text
on a terminal and JSON otherwise.

The access loggers are :data:`HTTP_ACCESS` (one line per HTTP request, bridge) and
:data:`GRPC_ACCESS` (one line per RPC, service), both at INFO.
"""

from __future__ import annotations

import json
import logging
import secrets
import sys
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any, TextIO, TypeGuard

HTTP_ACCESS = "casledger.access.http"
GRPC_ACCESS = "casledger.access.grpc"
FORMATS = ("auto", "json", "text")
# The header (HTTP) and metadata key (gRPC) that carry the request id.
REQUEST_ID_HEADER = "X-Request-Id"
REQUEST_ID_KEY = "x-request-id"
MAX_REQUEST_ID = 128

# The request id of the request or call this code runs for ("" outside of one).
request_id: ContextVar[str] = ContextVar("request_id", default="")

# LogRecord's own attributes: everything else on a record came in through `extra`.
_RECORD_ATTRIBUTES = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message", "asctime", "taskName"}


def valid_request_id(value: str | None) -> TypeGuard[str]:
    """1 to 128 visible ASCII characters (no space, no control character)."""
    return (value is not None and 0 < len(value) <= MAX_REQUEST_ID and value.isascii()
            and value.isprintable() and " " not in value)


def new_request_id() -> str:
    return secrets.token_hex(16)  # 128 random bits, as uuid4().hex gave, without the UUID


def accept_request_id(value: str | None) -> str:
    """The caller's request id if it is valid, else a new one (never an unusable log field)."""
    return value if valid_request_id(value) else new_request_id()


def fields_of(record: logging.LogRecord) -> dict[str, Any]:
    """The record's structured fields: its `extra` values (None left out), then the request id
    of the current context unless the record names one."""
    fields = {key: value for key, value in vars(record).items()
              if key not in _RECORD_ATTRIBUTES and not key.startswith("_") and value is not None}
    if "request_id" not in fields and (current := request_id.get()):
        fields["request_id"] = current
    return fields


class JSONFormatter(logging.Formatter):
    """One JSON object per record, on one line: time, level, logger, message, then fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in fields_of(record).items():
            entry.setdefault(key, value)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        # ASCII only: a log line must survive any terminal or pipe encoding.
        return json.dumps(entry, default=str, separators=(",", ":"))


class TextFormatter(logging.Formatter):
    """The classic ``time LEVEL logger message`` line, fields appended as ``key=value``."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = fields_of(record)
        if not fields:
            return line
        head, sep, rest = line.partition("\n")  # keep a traceback below the fields
        pairs = " ".join(f"{key}={_text_value(value)}" for key, value in fields.items())
        return f"{head} {pairs}{sep}{rest}"


def _text_value(value: Any) -> str:
    text = str(value)
    if not text or any(c.isspace() or c in "\"=" for c in text):
        return json.dumps(text)
    return text


def resolve_format(fmt: str, stream: TextIO) -> str:
    """``auto`` -> ``text`` on a terminal, ``json`` otherwise (a file, a pipe, a collector)."""
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    if fmt != "auto":
        return fmt
    isatty = getattr(stream, "isatty", None)
    return "text" if isatty is not None and isatty() else "json"


def formatter(fmt: str) -> logging.Formatter:
    return JSONFormatter() if fmt == "json" else TextFormatter()


def configure(level: str, fmt: str = "auto", stream: TextIO | None = None) -> str:
    """Log to `stream` (stderr) at `level` in `fmt`; returns the format chosen (json or text).
    Like ``logging.basicConfig``, leaves a root logger that already has handlers alone."""
    stream = stream if stream is not None else sys.stderr
    chosen = resolve_format(fmt, stream)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter(chosen))
    logging.basicConfig(level=level.upper(), handlers=[handler])
    return chosen
