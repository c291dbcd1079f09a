"""What changed between two versions: a structural diff of JSON, a unified diff of text. Pure.

:func:`diff_json` compares two JSON documents and returns the changes as RFC 6902 operations
(``add``, ``remove``, ``replace``, each with its JSON Pointer path; ``replace`` and ``remove`` also
carry the ``old`` value for the reader). Applied in order, the operations turn the first document
into the second, so ``casledger diff --json`` output is a JSON Patch. Arrays are compared index by
index (no move detection): what a reader of an audit trail wants is where a value changed, not the
shortest edit script. Numbers compare by value (``1`` equals ``1.0``); ``true`` never equals ``1``.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any

from .content import JSONValue


@dataclass(frozen=True, slots=True)
class Change:
    op: str  # "add" | "remove" | "replace"
    path: str
    old: JSONValue = None
    new: JSONValue = None

    def as_patch(self) -> dict[str, Any]:
        """The RFC 6902 operation, plus the old value where there was one."""
        operation: dict[str, Any] = {"op": self.op, "path": self.path}
        if self.op != "remove":
            operation["value"] = self.new
        if self.op != "add":
            operation["old"] = self.old
        return operation


def _escape(token: str) -> str:
    return token.replace("~", "~0").replace("/", "~1")


def _same(a: JSONValue, b: JSONValue) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b
    if type(a) is not type(b):
        return False
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[key], b[key]) for key in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def diff_json(a: JSONValue, b: JSONValue, path: str = "") -> list[Change]:
    """The changes that turn `a` into `b`, in an order that applies cleanly."""
    if isinstance(a, dict) and isinstance(b, dict):
        changes: list[Change] = []
        for key in a:
            if key not in b:
                changes.append(Change("remove", f"{path}/{_escape(key)}", old=a[key]))
        for key in b:
            where = f"{path}/{_escape(key)}"
            if key not in a:
                changes.append(Change("add", where, new=b[key]))
            else:
                changes += diff_json(a[key], b[key], where)
        return changes
    if isinstance(a, list) and isinstance(b, list):
        changes = []
        common = min(len(a), len(b))
        for index in range(common):
            changes += diff_json(a[index], b[index], f"{path}/{index}")
        # Removals from the end backwards, so each index is still valid when it is applied.
        for index in range(len(a) - 1, common - 1, -1):
            changes.append(Change("remove", f"{path}/{index}", old=a[index]))
        for index in range(common, len(b)):
            changes.append(Change("add", f"{path}/{index}", new=b[index]))
        return changes
    if _same(a, b):
        return []
    return [Change("replace", path, old=a, new=b)]


def diff_text(a: bytes, b: bytes, a_label: str, b_label: str) -> list[str] | None:
    """A unified diff of two UTF-8 texts (lines without their newlines); None when either side
    is not UTF-8 text."""
    try:
        a_text, b_text = a.decode(), b.decode()
    except UnicodeDecodeError:
        return None
    return list(difflib.unified_diff(a_text.splitlines(), b_text.splitlines(), a_label, b_label,
                                     lineterm=""))
