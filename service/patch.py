"""Patches the service applies to JSON content: RFC 7396 merge patch and RFC 6902 JSON Patch.

A malformed patch document is the client's mistake (``InvalidPatch``, field ``patch.document``);
a well-formed one that does not fit the current content is a ``PatchConflict`` naming the JSON
Pointer that failed. Nothing here mutates its inputs, and nothing recurses: content may nest
MAX_JSON_DEPTH levels, which is deeper than ``copy.deepcopy`` or a recursive walk can be trusted
to go on a stack that already holds a server.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from . import errors
from .content import MAX_JSON_DEPTH, JSONValue, dump_json, parse_json

MERGE_PATCH = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"
SUPPORTED = (MERGE_PATCH, JSON_PATCH)
# How many JSON values (scalars and containers) the `copy` operations of one JSON Patch may create.
# Without a bound, a few kilobytes of "copy /a to /a/-" double the document each time. Every value
# serializes to at least one byte, so a caller whose content limit is L bytes loses nothing by
# passing copy_budget=L; the default matches the default 1 MiB limit.
MAX_COPIED_VALUES = 1 << 20

_FIELD = "patch.document"
_MEMBERS: dict[str, tuple[str, ...]] = {
    "add": ("path", "value"),
    "remove": ("path",),
    "replace": ("path", "value"),
    "move": ("from", "path"),
    "copy": ("from", "path"),
    "test": ("path", "value"),
}
_INDEX = re.compile(r"0|[1-9][0-9]{0,17}")  # 18 digits: no list is longer, and int() stays cheap
_BAD_ESCAPE = re.compile(r"~(?![01])")


def apply_patch(
    media_type: str, document: bytes, current: bytes, *, copy_budget: int = MAX_COPIED_VALUES
) -> bytes:
    """Apply the patch `document` of type `media_type` to the JSON content `current`.

    `media_type` is compared case-insensitively with its parameters ignored. The result is
    serialized with :func:`~casledger.service.content.dump_json`.

    Raises:
        errors.UnsupportedPatchType: `media_type` is neither of SUPPORTED.
        errors.InvalidPatch: the document is not strict JSON, not a valid JSON Patch, copies more
            than `copy_budget` values, or would produce content nested deeper than MAX_JSON_DEPTH.
        errors.InvalidContent: `current` is not strict JSON.
        errors.PatchConflict: a JSON Patch operation does not apply to the content.
    """
    kind = media_type.split(";", 1)[0].strip(" \t").lower()
    if kind not in SUPPORTED:
        raise errors.UnsupportedPatchType(media_type)
    patch = parse_json(document, field=_FIELD, error=errors.InvalidPatch)
    target = parse_json(current, field="content", error=errors.InvalidContent)
    if kind == MERGE_PATCH:
        result = merge_patch(target, patch)
    else:
        result = json_patch(target, patch, copy_budget=copy_budget)
    if _depth(result) > MAX_JSON_DEPTH:
        # Merge patches cannot deepen content; JSON Patch can, by adding or copying a deep value
        # deep inside. Stored content must stay parseable, so refuse rather than store it.
        raise errors.InvalidPatch(
            f"the patched content would nest more than {MAX_JSON_DEPTH} levels deep", field=_FIELD
        )
    return dump_json(result)


def merge_patch(target: JSONValue, patch: JSONValue) -> JSONValue:
    """Return `target` with the RFC 7396 merge patch `patch` applied (§2, MergePatch).

    A patch that is not an object replaces the target; in an object patch, null removes a member
    and an object value is merged into the member (a non-object member becomes ``{}`` first).
    """
    if not isinstance(patch, dict):
        return _deep_copy(patch)
    result: dict[str, JSONValue] = {}
    if isinstance(target, dict):
        result = {name: _deep_copy(value) for name, value in target.items()}
    pending: list[tuple[dict[str, JSONValue], dict[str, JSONValue]]] = [(result, patch)]
    while pending:
        into, changes = pending.pop()
        for name, value in changes.items():
            if value is None:
                into.pop(name, None)
            elif isinstance(value, dict):
                member = into.get(name)
                if not isinstance(member, dict):
                    member = into[name] = {}
                pending.append((member, value))
            else:
                into[name] = _deep_copy(value)
    return result


@dataclass(frozen=True, slots=True)
class _Operation:
    index: int
    op: str
    path: str
    tokens: tuple[str, ...]
    source: str  # the "from" member; "" and () when the op has none
    source_tokens: tuple[str, ...]
    value: JSONValue

    def conflict(self, pointer: str, detail: str) -> errors.PatchConflict:
        return errors.PatchConflict(f"operation {self.index} ({self.op}): {detail}", path=pointer)


def json_patch(
    target: JSONValue, operations: JSONValue, *, copy_budget: int = MAX_COPIED_VALUES
) -> JSONValue:
    """Return `target` with the RFC 6902 JSON Patch `operations` applied, in order.

    The whole document is validated before anything is applied, and the operations work on a copy,
    so a failure anywhere leaves no partial result.

    Raises:
        errors.InvalidPatch: `operations` is not an array of well-formed operations (the message
            names the operation's index), or its copies would create more than `copy_budget`
            values.
        errors.PatchConflict: an operation does not apply: a path or "from" that points nowhere,
            an index out of range, a failing "test", a move into the moved value's own child.
    """
    parsed = _parse_operations(operations)
    document = _deep_copy(target)
    budget = copy_budget
    for op in parsed:
        if op.op in ("add", "replace"):
            setter = _add if op.op == "add" else _replace
            document = setter(document, op, op.path, op.tokens, _deep_copy(op.value))
        elif op.op == "remove":
            _remove(document, op, op.path, op.tokens)
        elif op.op == "test":
            found = _get(document, op, op.path, op.tokens)
            if not _equal(found, op.value):
                raise op.conflict(op.path, _test_failure(op.path, found, op.value))
        elif op.op == "move":
            if op.source_tokens == op.tokens:
                _get(document, op, op.source, op.source_tokens)
                continue
            if op.tokens[: len(op.source_tokens)] == op.source_tokens:
                raise op.conflict(
                    op.path, f"cannot move {op.source!r} into its own child {op.path!r}"
                )
            moved = _remove(document, op, op.source, op.source_tokens)
            document = _add(document, op, op.path, op.tokens, moved)
        else:  # copy
            original = _get(document, op, op.source, op.source_tokens)
            size = _count(original, stop_after=budget)
            if size > budget:
                raise errors.InvalidPatch(
                    f"operation {op.index} (copy): the patch's copies would create more than "
                    f"{copy_budget} JSON values",
                    field=_FIELD,
                )
            budget -= size
            document = _add(document, op, op.path, op.tokens, _deep_copy(original))
    return document


def _parse_operations(operations: JSONValue) -> list[_Operation]:
    if not isinstance(operations, list):
        raise errors.InvalidPatch(
            "a JSON Patch document must be an array of operations, not "
            f"{_article(_kind(operations))}",
            field=_FIELD,
        )
    parsed = []
    for index, item in enumerate(operations):
        if not isinstance(item, dict):
            raise errors.InvalidPatch(
                f"operation {index}: must be an object, not {_article(_kind(item))}", field=_FIELD
            )
        if "op" not in item:
            raise errors.InvalidPatch(f"operation {index}: missing member 'op'", field=_FIELD)
        op = item["op"]
        if not isinstance(op, str) or op not in _MEMBERS:
            raise errors.InvalidPatch(
                f"operation {index}: 'op' must be one of {', '.join(_MEMBERS)}, not {_show(op)}",
                field=_FIELD,
            )
        for member in _MEMBERS[op]:
            if member not in item:
                raise errors.InvalidPatch(
                    f"operation {index} ({op}): missing member {member!r}", field=_FIELD
                )
        path = _pointer(item, "path", index, op)
        source = _pointer(item, "from", index, op) if "from" in _MEMBERS[op] else ""
        parsed.append(
            _Operation(
                index=index,
                op=op,
                path=path,
                tokens=_tokens(path),
                source=source,
                source_tokens=_tokens(source),
                value=item.get("value"),
            )
        )
    return parsed


def _pointer(item: dict[str, JSONValue], member: str, index: int, op: str) -> str:
    pointer = item[member]
    if not isinstance(pointer, str):
        raise errors.InvalidPatch(
            f"operation {index} ({op}): {member!r} must be a JSON Pointer string, not "
            f"{_article(_kind(pointer))}",
            field=_FIELD,
        )
    if pointer and not pointer.startswith("/"):
        raise errors.InvalidPatch(
            f"operation {index} ({op}): {member!r} {pointer!r} is not a JSON Pointer: it must be "
            "empty or start with '/'",
            field=_FIELD,
        )
    bad = _BAD_ESCAPE.search(pointer)
    if bad is not None:
        raise errors.InvalidPatch(
            f"operation {index} ({op}): {member!r} {pointer!r} is not a JSON Pointer: '~' at "
            f"position {bad.start()} must be followed by 0 or 1 (RFC 6901)",
            field=_FIELD,
        )
    return pointer


def _tokens(pointer: str) -> tuple[str, ...]:
    # "~1" before "~0", so that "~01" is "~1" and not "/" (RFC 6901 §4).
    return tuple(t.replace("~1", "/").replace("~0", "~") for t in pointer.split("/")[1:])


def _where(tokens: tuple[str, ...]) -> str:
    if not tokens:
        return "the document root"
    return repr("".join("/" + t.replace("~", "~0").replace("/", "~1") for t in tokens))


def _index(token: str, length: int, *, insert: bool) -> int | None:
    """The array index `token` names, or None; "-" and `length` itself only when inserting."""
    if token == "-":
        return length if insert else None
    if _INDEX.fullmatch(token) is None:
        return None
    index = int(token)
    return index if index < (length + 1 if insert else length) else None


def _get(document: JSONValue, op: _Operation, pointer: str, tokens: tuple[str, ...]) -> JSONValue:
    node = document
    for depth, token in enumerate(tokens):
        if isinstance(node, dict):
            if token not in node:
                raise op.conflict(
                    pointer,
                    f"{pointer!r} does not exist: no member {token!r} in the object at "
                    f"{_where(tokens[:depth])}",
                )
            node = node[token]
        elif isinstance(node, list):
            index = _index(token, len(node), insert=False)
            if index is None:
                raise op.conflict(
                    pointer,
                    f"{pointer!r} does not exist: {token!r} is not an index of the array at "
                    f"{_where(tokens[:depth])} (length {len(node)})",
                )
            node = node[index]
        else:
            raise op.conflict(
                pointer,
                f"{pointer!r} does not exist: the value at {_where(tokens[:depth])} is "
                f"{_article(_kind(node))}",
            )
    return node


def _parent(
    document: JSONValue, op: _Operation, pointer: str, tokens: tuple[str, ...]
) -> dict[str, JSONValue] | list[JSONValue]:
    parent = _get(document, op, pointer, tokens[:-1])
    if not isinstance(parent, dict | list):
        raise op.conflict(
            pointer,
            f"{pointer!r} cannot exist: the value at {_where(tokens[:-1])} is "
            f"{_article(_kind(parent))}",
        )
    return parent


def _add(
    document: JSONValue, op: _Operation, pointer: str, tokens: tuple[str, ...], value: JSONValue
) -> JSONValue:
    if not tokens:
        return value
    parent = _parent(document, op, pointer, tokens)
    if isinstance(parent, dict):
        parent[tokens[-1]] = value
        return document
    index = _index(tokens[-1], len(parent), insert=True)
    if index is None:
        raise op.conflict(
            pointer,
            f"cannot add at {pointer!r}: {tokens[-1]!r} is not an index or '-' for the array at "
            f"{_where(tokens[:-1])} (length {len(parent)})",
        )
    parent.insert(index, value)
    return document


def _replace(
    document: JSONValue, op: _Operation, pointer: str, tokens: tuple[str, ...], value: JSONValue
) -> JSONValue:
    if not tokens:
        return value
    _get(document, op, pointer, tokens)  # must exist; its parent is then a container
    parent = _parent(document, op, pointer, tokens)
    if isinstance(parent, dict):
        parent[tokens[-1]] = value
    else:
        parent[int(tokens[-1])] = value
    return document


def _remove(
    document: JSONValue, op: _Operation, pointer: str, tokens: tuple[str, ...]
) -> JSONValue:
    if not tokens:
        raise op.conflict(pointer, "cannot remove the whole document")
    removed = _get(document, op, pointer, tokens)
    parent = _parent(document, op, pointer, tokens)
    if isinstance(parent, dict):
        del parent[tokens[-1]]
    else:
        del parent[int(tokens[-1])]
    return removed


def _test_failure(pointer: str, found: JSONValue, expected: JSONValue) -> str:
    message = f"test failed: the value at {pointer!r} differs from the expected value"
    if _kind(found) != _kind(expected):
        message += f" (it is {_article(_kind(found))}, not {_article(_kind(expected))})"
    return message


def _kind(value: JSONValue) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def _article(kind: str) -> str:
    return f"an {kind}" if kind in ("array", "object") else f"a {kind}"


def _show(value: JSONValue) -> str:
    return repr(value) if isinstance(value, str) else _article(_kind(value))


def _equal(left: JSONValue, right: JSONValue) -> bool:
    """JSON equality (RFC 6902 §4.6): 1 equals 1.0, true does not equal 1, key order is moot."""
    pending = [(left, right)]
    while pending:
        a, b = pending.pop()
        kind = _kind(a)
        if kind != _kind(b):
            return False
        if isinstance(a, list) and isinstance(b, list):
            if len(a) != len(b):
                return False
            pending.extend(zip(a, b, strict=True))
        elif isinstance(a, dict) and isinstance(b, dict):
            if a.keys() != b.keys():
                return False
            pending.extend((a[key], b[key]) for key in a)
        elif a != b:
            return False
    return True


def _deep_copy(value: JSONValue) -> JSONValue:
    root = _shell(value)
    pending: list[tuple[JSONValue, JSONValue]] = [] if root is value else [(value, root)]
    while pending:
        source, copy = pending.pop()
        if isinstance(source, dict) and isinstance(copy, dict):
            for key, item in source.items():
                copy[key] = _shell(item)
                if copy[key] is not item:
                    pending.append((item, copy[key]))
        elif isinstance(source, list) and isinstance(copy, list):
            for item in source:
                copy.append(_shell(item))
                if copy[-1] is not item:
                    pending.append((item, copy[-1]))
    return root


def _shell(value: JSONValue) -> JSONValue:
    """An empty container of the same kind, or the scalar itself (immutable, safe to share)."""
    if isinstance(value, dict):
        return {}
    if isinstance(value, list):
        return []
    return value


def _count(value: JSONValue, *, stop_after: int) -> int:
    """How many values `value` holds, itself included; stops early past `stop_after`."""
    count, pending = 0, [value]
    while pending and count <= stop_after:
        item = pending.pop()
        count += 1
        if isinstance(item, dict):
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
    return count


def _depth(value: JSONValue) -> int:
    """Nesting of arrays and objects, as content.parse_json counts it: ``[]`` is 1, ``0`` is 0."""
    deepest, pending = 0, [(value, 1)]
    while pending:
        item, level = pending.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, level)
            children = item.values() if isinstance(item, dict) else item
            pending.extend((child, level + 1) for child in children)
    return deepest
