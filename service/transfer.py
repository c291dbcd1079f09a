"""Export and import of a whole ledger as JSON Lines, verified as it loads. Pure (no I/O).

The export is one JSON object per line: a header, every version in revision order, and an end
record carrying the count and the ledger digest, so a truncated or extended file is refused too::

    {"record": "header", "format": "casledger-export/1", "revision": 42}
    {"record": "version", "revision": 1, "name": "documents/d1", "version": 1,
     "content_type": "application/json", "create_time_us": ..., "update_time_us": ...,
     "actor": "anonymous", "reason": "", "deleted": false, "size": 17,
     "previous_hash": "", "ledger_previous_hash": "", "hash": "3fa9...",
     "content_base64": "eyJ0aXRsZSI6ImRyYWZ0In0="}
    ...
    {"record": "end", "versions": 42, "digest": "42:9b1f..."}

Hashes are hex, content is base64 (exact bytes, whatever the media type), times are microseconds
since the epoch — exactly the fields the hash covers, so the file can be verified on its own.
:func:`read_export` parses and verifies each record before handing it on, and raises
:class:`ImportRefused` at the first one that does not verify.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterable, Iterator
from typing import Any

from .model import Version
from .verify import Digest, Problem, Verifier

EXPORT_FORMAT = "casledger-export/1"

_INT_FIELDS = ("revision", "version", "create_time_us", "update_time_us", "size")
_STR_FIELDS = ("name", "content_type", "actor", "reason")
_HASH_FIELDS = ("previous_hash", "ledger_previous_hash", "hash")
_VERSION_KEYS = frozenset(("record", "deleted", "content_base64", *_INT_FIELDS, *_STR_FIELDS,
                           *_HASH_FIELDS))


class ImportRefused(Exception):
    """The export does not verify: `line` is where, `problem` what (if it is a broken link)."""

    def __init__(self, line: int, message: str, problem: Problem | None = None) -> None:
        super().__init__(f"line {line}: {message}")
        self.line = line
        self.problem = problem


def _dumps(record: dict[str, Any]) -> str:
    return json.dumps(record, separators=(",", ":"), ensure_ascii=False) + "\n"


def header_line(revision: int) -> str:
    return _dumps({"record": "header", "format": EXPORT_FORMAT, "revision": revision})


def version_line(v: Version) -> str:
    return _dumps({
        "record": "version", "revision": v.revision, "name": v.name, "version": v.version,
        "content_type": v.content_type, "create_time_us": v.create_time_us,
        "update_time_us": v.update_time_us, "actor": v.actor, "reason": v.reason,
        "deleted": bool(v.deleted), "size": v.size, "previous_hash": v.previous_hash.hex(),
        "ledger_previous_hash": v.ledger_previous_hash.hex(), "hash": v.hash.hex(),
        "content_base64": base64.b64encode(v.content).decode("ascii"),
    })


def end_line(versions: int, digest: Digest) -> str:
    return _dumps({"record": "end", "versions": versions, "digest": str(digest)})


def _version(record: dict[str, Any]) -> Version:
    """A Version from a version record; ValueError names what is wrong."""
    if set(record) != _VERSION_KEYS:
        wrong = sorted(set(record) ^ _VERSION_KEYS)
        raise ValueError(f"a version record has exactly the export's fields (differs in {wrong})")
    for key in _INT_FIELDS:
        if type(record[key]) is not int or record[key] < 0:
            raise ValueError(f"{key} must be a non-negative integer")
    for key in _STR_FIELDS:
        if not isinstance(record[key], str):
            raise ValueError(f"{key} must be a string")
    if not isinstance(record["deleted"], bool):
        raise ValueError("deleted must be true or false")
    hashes = {}
    for key in _HASH_FIELDS:
        value = record[key]
        if not isinstance(value, str) or len(value) not in (0, 64):
            raise ValueError(f"{key} must be 64 hex digits (or empty)")
        hashes[key] = bytes.fromhex(value)
    if not isinstance(record["content_base64"], str):
        raise ValueError("content_base64 must be a string")
    try:
        content = base64.b64decode(record["content_base64"], validate=True)
    except binascii.Error as exc:
        raise ValueError(f"content_base64 is not base64: {exc}") from None
    return Version(
        name=record["name"], version=record["version"], revision=record["revision"],
        content=content, content_type=record["content_type"],
        create_time_us=record["create_time_us"], update_time_us=record["update_time_us"],
        actor=record["actor"], reason=record["reason"], deleted=record["deleted"],
        previous_hash=hashes["previous_hash"],
        ledger_previous_hash=hashes["ledger_previous_hash"], hash=hashes["hash"],
        size=record["size"],
    )


def read_export(lines: Iterable[bytes | str], verifier: Verifier | None = None
                ) -> Iterator[Version]:
    """The versions of an export, each verified (chains, hash, tombstone rules) before it is
    yielded; then the end record's count and digest are checked. Raises ImportRefused."""
    verifier = verifier or Verifier()
    state = "header"
    number = header_revision = 0
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise ImportRefused(number, f"not JSON: {exc}") from None
        kind = record.get("record") if isinstance(record, dict) else None
        if state == "header":
            if kind != "header" or record.get("format") != EXPORT_FORMAT:
                raise ImportRefused(number, f"not a {EXPORT_FORMAT} export (no header record)")
            header_revision = record.get("revision")
            state = "versions"
        elif state == "versions" and kind == "version":
            try:
                version = _version(record)
            except ValueError as exc:
                raise ImportRefused(number, str(exc)) from None
            verifier.feed((version,))
            if not verifier.ok:
                problem = verifier.problems[0]
                raise ImportRefused(number, str(problem), problem)
            yield version
        elif state == "versions" and kind == "end":
            _check_end(number, record, verifier)
            if header_revision != verifier.revision:
                raise ImportRefused(number, f"the header says revision {header_revision!r}; "
                                    f"the export ends at revision {verifier.revision}")
            state = "end"
        else:
            raise ImportRefused(number, f"unexpected {kind or 'line'} record"
                                + (" after the end record" if state == "end" else ""))
    if state != "end":
        raise ImportRefused(number, "the export ends without its end record: it was truncated")


def _check_end(number: int, record: dict[str, Any], verifier: Verifier) -> None:
    if record.get("versions") != verifier.versions:
        raise ImportRefused(number, f"the end record counts {record.get('versions')!r} versions;"
                            f" the export holds {verifier.versions}")
    try:
        expected = Digest.parse(str(record.get("digest")))
    except ValueError as exc:
        raise ImportRefused(number, str(exc)) from None
    if expected != verifier.digest():
        raise ImportRefused(number, f"the end record's digest {expected} is not the digest "
                            f"{verifier.digest()} of the versions exported")
