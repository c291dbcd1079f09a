"""Content media types and strict JSON: what the ledger accepts as a resource's content.

Content is stored as the exact bytes received. This module only *judges* them: it normalizes the
media type (RFC 9110 §8.3.1) and, for JSON media types, checks that the bytes are JSON as RFC 8259
defines it, which is stricter than what :func:`json.loads` accepts. Every failure is reported as a
:class:`~casledger.service.errors.InvalidArgument` subclass naming the request field, never as a
``ValueError`` or a ``RecursionError`` escaping from the decoder.
"""

from __future__ import annotations

import json
import math
import re
from typing import TypeAlias

from . import errors

JSONValue: TypeAlias = bool | int | float | str | list["JSONValue"] | dict[str, "JSONValue"] | None

DEFAULT_CONTENT_TYPE = "application/json"
MAX_MEDIA_TYPE_LENGTH = 255
MAX_JSON_DEPTH = 512
# CPython's default int_max_str_digits. Fixed here rather than read from the interpreter so that
# what the ledger accepts does not change with PYTHONINTMAXSTRDIGITS.
MAX_INT_DIGITS = 4300

_TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
# quoted-string without obs-text: a stored media type goes back out as a header, so ASCII only.
_QUOTED_STRING = r'"(?:[\t \x21\x23-\x5b\x5d-\x7e]|\\[\t \x21-\x7e])*"'
_TYPE_SUBTYPE = re.compile(rf"({_TOKEN})/({_TOKEN})")
# One `OWS ";" OWS [ parameter ]` (RFC 9110 §5.6.6 allows empty parameters).
_PARAMETER = re.compile(rf"[ \t]*;[ \t]*(?:({_TOKEN})=({_TOKEN}|{_QUOTED_STRING}))?")

# A JSON string (possibly unterminated) or a bracket. Strings are matched whole so brackets inside
# them are not counted; possessive quantifiers keep a megabyte-long string linear and shallow.
_STRUCTURE = re.compile(r'"(?:[^"\\]++|\\.)*+"?|[\[\]{}]', re.DOTALL)
# Lone surrogates can only come from \uD800-\uDFFF escapes (the UTF-8 codec refuses encoded ones).
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")
_BOM = b"\xef\xbb\xbf"


def normalize_media_type(content_type: str, *, field: str = "content_type") -> str:
    """Return `content_type` in canonical form, or DEFAULT_CONTENT_TYPE when it is empty.

    The syntax is RFC 9110's ``type "/" subtype *( OWS ";" OWS [ parameter ] )``. Type, subtype and
    parameter names are case-insensitive and come back lowercased; parameter values are kept as
    given. Surrounding whitespace and the whitespace around ``;`` are dropped, so the result is
    ``type/subtype;name=value``: never longer than the input.

    Raises:
        errors.InvalidContent: the value is malformed, a wildcard, or over 255 characters.
    """
    if content_type == "":
        return DEFAULT_CONTENT_TYPE
    value = content_type.strip(" \t")
    if len(value) > MAX_MEDIA_TYPE_LENGTH:
        raise errors.InvalidContent(
            f"{field} is {len(value)} characters long; at most {MAX_MEDIA_TYPE_LENGTH} are allowed",
            field=field,
        )
    match = _TYPE_SUBTYPE.match(value)
    if match is None:
        raise errors.InvalidContent(
            f"{field} {value!r} is not a media type: expected type/subtype, optionally followed "
            "by ;name=value parameters (RFC 9110)",
            field=field,
        )
    type_, subtype = match.group(1).lower(), match.group(2).lower()
    if "*" in (type_, subtype):
        raise errors.InvalidContent(
            f"{field} {value!r} is a media range, not a media type: name the actual type",
            field=field,
        )
    parameters = []
    position = match.end()
    while position < len(value):
        parameter = _PARAMETER.match(value, position)
        if parameter is None:
            raise errors.InvalidContent(
                f"{field} {value!r} is not a valid media type: unexpected {value[position]!r} at "
                f"position {position}; parameters must be ;name=value with a token or a quoted "
                "string as the value",
                field=field,
            )
        if parameter.group(1) is not None:
            parameters.append(f";{parameter.group(1).lower()}={parameter.group(2)}")
        position = parameter.end()
    return f"{type_}/{subtype}{''.join(parameters)}"


def is_json_media_type(media_type: str) -> bool:
    """Whether `media_type` is application/json or a ``+json`` structured syntax (RFC 6839).

    Parameters are ignored and the comparison is case-insensitive; the input need not be
    normalized.
    """
    essence = media_type.split(";", 1)[0].strip(" \t").lower()
    type_, slash, subtype = essence.partition("/")
    if not slash or not type_:
        return False
    if type_ == "application" and subtype == "json":
        return True
    return len(subtype) > len("+json") and subtype.endswith("+json")


class _Rejected(Exception):
    """Raised by the decoder hooks; carries the reason out of json.loads."""


def _parse_int(text: str) -> int:
    digits = len(text) - text.startswith("-")
    if digits > MAX_INT_DIGITS:
        raise _Rejected(f"an integer has {digits} digits; at most {MAX_INT_DIGITS} are allowed")
    try:
        return int(text)
    except ValueError:  # the interpreter's own limit may be lower than ours
        raise _Rejected(f"an integer with {digits} digits is too long for this server") from None


def _parse_float(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        shown = text if len(text) <= 40 else text[:37] + "..."
        raise _Rejected(f"the number {shown} is outside the range of a double")
    return number


def _parse_constant(name: str) -> float:
    # json.loads accepts NaN, Infinity and -Infinity; RFC 8259 does not.
    raise _Rejected(f"{name} is not a JSON value (RFC 8259 has no NaN or infinities)")


def _object(pairs: list[tuple[str, JSONValue]]) -> dict[str, JSONValue]:
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _Rejected(f"duplicate object key {key!r}")
            seen.add(key)
    return result


# Built once: json.loads with hooks would build a decoder (and its C scanner) on every call.
_DECODER = json.JSONDecoder(object_pairs_hook=_object, parse_int=_parse_int,
                            parse_float=_parse_float, parse_constant=_parse_constant)


def _position(text: str, index: int) -> str:
    line = text.count("\n", 0, index) + 1
    column = index - text.rfind("\n", 0, index)
    return f"line {line}, column {column}"


def _too_deep_at(text: str) -> int | None:
    """The index of the first bracket that opens nesting level MAX_JSON_DEPTH + 1, if any."""
    if text.count("[") + text.count("{") <= MAX_JSON_DEPTH:
        return None  # the usual case, at C speed: too few brackets to nest that deep at all
    depth = 0
    for match in _STRUCTURE.finditer(text):
        char = text[match.start()]
        if char in "[{":
            depth += 1
            if depth > MAX_JSON_DEPTH:
                return match.start()
        elif char in "]}":
            depth -= 1
    return None


def _first_surrogate(value: JSONValue) -> str | None:
    """The first lone surrogate in any string or key of `value` (iterative: it may nest deep)."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            found = _SURROGATE.search(item)
            if found:
                return found.group()
        elif isinstance(item, list):
            pending.extend(item)
        elif isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
    return None


def parse_json(
    data: bytes, *, field: str, error: type[errors.InvalidArgument] = errors.InvalidContent
) -> JSONValue:
    """Parse `data` as strict RFC 8259 JSON.

    On top of :func:`json.loads` (its decoder, with hooks) this refuses: bytes that are not UTF-8,
    a byte order mark, NaN/Infinity, numbers outside a double's range, integers over
    MAX_INT_DIGITS digits, duplicate object keys, nesting deeper than MAX_JSON_DEPTH, and unpaired
    surrogate escapes (``"\\ud800"``, which Python would decode into a string that cannot be
    encoded back to UTF-8).

    Raises:
        error: ``error(message, field=field)`` for every failure, whatever the bytes; the message
            says what is wrong and, where the decoder knows it, the line and column.
    """
    if data.startswith(_BOM):
        raise error(
            f"{field} starts with a UTF-8 byte order mark, which JSON text must not have",
            field=field,
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(
            f"{field} is not valid UTF-8: {exc.reason} (byte 0x{data[exc.start]:02x} at offset "
            f"{exc.start})",
            field=field,
        ) from None
    # Checked before decoding, not by catching RecursionError: how deep the decoder can go depends
    # on how deep the caller's stack already is, and the answer must not.
    too_deep = _too_deep_at(text)
    if too_deep is not None:
        raise error(
            f"{field} nests arrays and objects more than {MAX_JSON_DEPTH} levels deep "
            f"({_position(text, too_deep)})",
            field=field,
        )
    try:
        value: JSONValue = _DECODER.decode(text)
    except _Rejected as exc:
        raise error(f"{field} is not valid JSON: {exc}", field=field) from None
    except json.JSONDecodeError as exc:
        raise error(
            f"{field} is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})",
            field=field,
        ) from None
    except (ValueError, RecursionError) as exc:  # defence in depth; the checks above should win
        raise error(f"{field} is not valid JSON: {type(exc).__name__}", field=field) from None
    if _SURROGATE_ESCAPE.search(text):
        surrogate = _first_surrogate(value)
        if surrogate is not None:
            raise error(
                f"{field} is not valid JSON text: a string contains the unpaired surrogate "
                f"\\u{ord(surrogate):04x}, which is not a Unicode character",
                field=field,
            )
    return value


def validate_content(data: bytes, content_type: str, *, limit: int) -> str:
    """Check content as received and return its normalized media type.

    The size comes first, so an oversized body is refused without being looked at. For JSON media
    types the bytes must parse (see :func:`parse_json`); the parsed value is discarded because
    content is stored exactly as received, never re-serialized.

    Raises:
        errors.ContentTooLarge: ``len(data) > limit``.
        errors.InvalidContent: a malformed media type (field ``content_type``) or malformed JSON
            (field ``content``).
    """
    if len(data) > limit:
        raise errors.ContentTooLarge(len(data), limit, field="content")
    media_type = normalize_media_type(content_type)
    if is_json_media_type(media_type):
        parse_json(data, field="content")
    return media_type


def dump_json(value: JSONValue) -> bytes:
    """Serialize `value` compactly and deterministically (for a given value) as UTF-8.

    Used for the result of a patch. Key order is the value's own (insertion) order.

    Raises:
        ValueError: `value` holds NaN or an infinity. Values from :func:`parse_json` never do.
    """
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return text.encode("utf-8")
