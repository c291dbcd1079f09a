"""The ledger rules, pure: names, versions, preconditions, hashing and ETags. No I/O here.

A write is planned by :func:`plan_write` from the resource's head (its latest version, if any) and
the ledger's tail (its latest revision): it checks the write against the rules and returns the
exact :class:`Version` to append, hash and all. Storage backends only read the head and tail and
append what this module decides, inside one transaction.

Hash chain. Each version's SHA-256 covers, length-prefixed and in this order: a format tag, the
name, version, revision, content type, create and update times (microseconds since the epoch),
actor, reason, the deleted flag, the hash of the same resource's previous version, the hash of the
ledger's previous revision, and finally the content bytes. Changing any of these, dropping,
inserting or reordering a version breaks one of the two chains.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import secrets
import time
from dataclasses import dataclass
from enum import Enum
from typing import Any

from . import content as content_rules
from . import errors
from . import patch as patch_rules
from .errors import CurrentState

MAX_NAME_LENGTH = 512
MAX_SEGMENTS = 16
MAX_REASON_LENGTH = 1024
MAX_REQUEST_ID_LENGTH = 256
ANONYMOUS = "anonymous"
HASH_FORMAT = b"casledger/v1"
US_PER_SECOND = 1_000_000

_SEGMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._~-]{0,127}")
_REQUEST_ID = re.compile(r"[\x21-\x7e]+")
_ETAG = re.compile(r'"[\x21\x23-\x7e]+"')


# --- names -------------------------------------------------------------------------------------


def _segments(path: str, *, field: str, what: str) -> list[str]:
    if not path:
        raise errors.InvalidName(f"{field} is empty; a {what} is required", field=field)
    if len(path) > MAX_NAME_LENGTH:
        raise errors.InvalidName(
            f"{field} is {len(path)} characters long; the limit is {MAX_NAME_LENGTH}", field=field
        )
    parts = path.split("/")
    if len(parts) > MAX_SEGMENTS:
        raise errors.InvalidName(
            f"{field} has {len(parts)} segments; the limit is {MAX_SEGMENTS}", field=field
        )
    for index, part in enumerate(parts):
        if not _SEGMENT.fullmatch(part):
            shown = part if part.isprintable() else part.encode("unicode_escape").decode()
            raise errors.InvalidName(
                f"{field} segment {index + 1} ({shown!r}) must match "
                "[A-Za-z0-9][A-Za-z0-9._~-]{0,127}",
                field=field,
            )
    return parts


def validate_name(name: str, *, field: str = "name") -> str:
    """Check a resource name: `collection/id` pairs, e.g. `projects/p1/notes/n7`."""
    if len(_segments(name, field=field, what="resource name")) % 2:
        raise errors.InvalidName(
            f"{field} {name!r} names a collection; a resource name has an even number of "
            "segments (collection/id)",
            field=field,
        )
    return name


def validate_collection(parent: str, *, field: str = "parent") -> str:
    """Check a collection path: an odd number of segments, e.g. `documents`."""
    if not len(_segments(parent, field=field, what="collection")) % 2:
        raise errors.InvalidName(
            f"{field} {parent!r} names a resource; a collection has an odd number of segments",
            field=field,
        )
    return parent


def validate_prefix(prefix: str, *, field: str = "prefix") -> str:
    """Check a watch prefix: empty (everything) or any whole-segment path."""
    if prefix:
        _segments(prefix, field=field, what="prefix")
    return prefix


def parent_of(name: str) -> str:
    return name.rsplit("/", 1)[0]


def matches_prefix(name: str, prefix: str) -> bool:
    """Whole-segment prefix match: `documents` matches `documents/1`, not `documentsX/1`."""
    return not prefix or name == prefix or name.startswith(prefix + "/")


_last_id_us = 0


def new_resource_id() -> str:
    """A server-generated id: time-ordered (so listings follow creation order) and random."""
    global _last_id_us
    # Strictly increasing within the process: two ids in one microsecond (or across a clock step
    # back) would otherwise sort by their random part, not by creation order.
    _last_id_us = max(time.time_ns() // 1000, _last_id_us + 1)
    return f"{_last_id_us:014x}{secrets.token_hex(6)}"


def validate_request_id(request_id: str) -> str:
    if len(request_id) > MAX_REQUEST_ID_LENGTH or (
        request_id and not _REQUEST_ID.fullmatch(request_id)
    ):
        raise errors.InvalidArgument(
            f"request_id must be 1-{MAX_REQUEST_ID_LENGTH} visible ASCII characters",
            field="request_id",
        )
    return request_id


def validate_reason(reason: str) -> str:
    if len(reason) > MAX_REASON_LENGTH or any(ord(c) < 0x20 and c != "\t" for c in reason):
        raise errors.InvalidArgument(
            f"reason must be at most {MAX_REASON_LENGTH} characters without control characters",
            field="reason",
        )
    return reason


# --- versions ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Version:
    """One version of a resource, exactly as stored."""

    name: str
    version: int
    revision: int
    content: bytes
    content_type: str
    create_time_us: int
    update_time_us: int
    actor: str
    reason: str
    deleted: bool
    previous_hash: bytes
    ledger_previous_hash: bytes
    hash: bytes
    # Length of the content as written; kept when a read leaves the content itself out.
    size: int

    @property
    def etag(self) -> str:
        return etag_for(self.version, self.hash)

    def without_content(self) -> Version:
        """The same version with its content left out (`size` still tells its length). Built
        field by field: dataclasses.replace takes twice as long, on every cached head."""
        return Version(self.name, self.version, self.revision, b"", self.content_type,
                       self.create_time_us, self.update_time_us, self.actor, self.reason,
                       self.deleted, self.previous_hash, self.ledger_previous_hash, self.hash,
                       self.size)

    @property
    def creates(self) -> bool:
        """Whether this version created (or re-created after a tombstone) its resource."""
        return not self.deleted and self.create_time_us == self.update_time_us

    @property
    def current(self) -> CurrentState:
        return CurrentState(version=self.version, etag=self.etag)


@dataclass(frozen=True, slots=True)
class Head:
    """A resource's latest version (content only when the write needs it), and when the version
    before it was written (for If-Unmodified-Since)."""

    latest: Version
    previous_update_time_us: int | None


@dataclass(frozen=True, slots=True)
class Tail:
    """The ledger's latest revision: the next write chains to it."""

    revision: int
    hash: bytes
    update_time_us: int


EMPTY_TAIL = Tail(revision=0, hash=b"", update_time_us=0)


def compute_hash(v: Version) -> bytes:
    """The SHA-256 of a version (its `hash` field is ignored); see the module docstring."""
    return _digest(v.name, v.version, v.revision, v.content_type, v.create_time_us,
                   v.update_time_us, v.actor, v.reason, v.deleted, v.previous_hash,
                   v.ledger_previous_hash, v.content)


def _digest(name: str, version: int, revision: int, content_type: str, create_time_us: int,
            update_time_us: int, actor: str, reason: str, deleted: bool, previous_hash: bytes,
            ledger_previous_hash: bytes, content: bytes) -> bytes:
    parts = (
        HASH_FORMAT,
        name.encode(),
        str(version).encode(),
        str(revision).encode(),
        content_type.encode(),
        str(create_time_us).encode(),
        str(update_time_us).encode(),
        actor.encode(),
        reason.encode(),
        b"1" if deleted else b"0",
        previous_hash,
        ledger_previous_hash,
    )
    # One buffer of length-prefixed parts, then the content: SHA-256 sees the same stream as
    # part-by-part updates would feed it.
    framed = b"".join([piece for part in parts for piece in (len(part).to_bytes(4, "big"), part)])
    h = hashlib.sha256(framed + len(content).to_bytes(8, "big"))
    h.update(content)
    return h.digest()


# The length prefixes of parts of up to 4 KiB: every part a valid version has (a reason of
# MAX_REASON_LENGTH characters is at most 4 KiB of UTF-8).
_PREFIXES = tuple(n.to_bytes(4, "big") for n in range(4 * MAX_REASON_LENGTH + 1))
_TAG = len(HASH_FORMAT).to_bytes(4, "big") + HASH_FORMAT


def compute_hash_row(row: tuple[Any, ...]) -> bytes:
    """:func:`compute_hash` of the version whose fields, in :class:`Version` order, are `row` (a
    database row; its hash and size are ignored), without building the :class:`Version`.

    The verifier's hot loop. The same bytes go to SHA-256 in the same order — the length-prefixed
    parts joined into one buffer, then the content — so the digest is the same: SHA-256 only
    sees the concatenated stream, however it is fed. Each part is converted exactly as
    compute_hash converts it (``str(number).encode()``, the same truthiness for the flag). A part
    longer than 4 KiB, or a value compute_hash cannot hash, goes to compute_hash itself, so this
    raises exactly what it raises."""
    (name, version, revision, content, content_type, create_time_us, update_time_us, actor,
     reason, deleted, previous_hash, ledger_previous_hash, _, _) = row
    prefix = _PREFIXES
    try:
        name_b = name.encode()
        version_b = str(version).encode()
        revision_b = str(revision).encode()
        type_b = content_type.encode()
        create_b = str(create_time_us).encode()
        update_b = str(update_time_us).encode()
        actor_b = actor.encode()
        reason_b = reason.encode()
        h = hashlib.sha256(b"".join((
            _TAG, prefix[len(name_b)], name_b, prefix[len(version_b)], version_b,
            prefix[len(revision_b)], revision_b, prefix[len(type_b)], type_b,
            prefix[len(create_b)], create_b, prefix[len(update_b)], update_b,
            prefix[len(actor_b)], actor_b, prefix[len(reason_b)], reason_b,
            b"\0\0\0\x011" if deleted else b"\0\0\0\x010",
            prefix[len(previous_hash)], previous_hash,
            prefix[len(ledger_previous_hash)], ledger_previous_hash,
            len(content).to_bytes(8, "big"))))
        h.update(content)
    except Exception:  # a long part, or a value of the wrong type: let compute_hash decide
        return compute_hash(Version(*row))
    return h.digest()


def etag_for(version: int, digest: bytes) -> str:
    """The strong, quoted ETag of a version: its number and 64 bits of its hash."""
    return f'"{version}-{digest[:8].hex()}"'


# --- preconditions -----------------------------------------------------------------------------


class PreconditionKind(Enum):
    ETAG = "etag"
    VERSION = "version"
    EXISTS = "exists"
    UNMODIFIED_SINCE = "unmodified_since"


@dataclass(frozen=True, slots=True)
class Precondition:
    """What a write requires of the current version; exactly one of the values is meaningful."""

    kind: PreconditionKind
    etag: str = ""
    version: int = 0
    unmodified_since_s: int = 0

    @classmethod
    def of_etag(cls, etag: str) -> Precondition:
        if etag.startswith("W/"):
            raise errors.InvalidPrecondition(
                "a weak entity-tag can never match under strong comparison; send the strong "
                "ETag the resource was read with",
                field="precondition.etag",
            )
        if not _ETAG.fullmatch(etag):
            raise errors.InvalidPrecondition(
                f'precondition.etag must be a quoted entity-tag such as "3-9f2c..." (got {etag!r})',
                field="precondition.etag",
            )
        return cls(PreconditionKind.ETAG, etag=etag)

    @classmethod
    def of_version(cls, version: int) -> Precondition:
        if version < 1:
            raise errors.InvalidPrecondition(
                f"precondition.version must be >= 1 (got {version})", field="precondition.version"
            )
        return cls(PreconditionKind.VERSION, version=version)

    @classmethod
    def of_exists(cls, exists: bool) -> Precondition:
        if not exists:
            raise errors.InvalidPrecondition(
                "precondition.exists must be true; to create, use CreateResource",
                field="precondition.exists",
            )
        return cls(PreconditionKind.EXISTS)

    @classmethod
    def of_unmodified_since(cls, seconds: int) -> Precondition:
        return cls(PreconditionKind.UNMODIFIED_SINCE, unmodified_since_s=seconds)

    def describe(self) -> str:
        if self.kind is PreconditionKind.ETAG:
            return f"etag {self.etag}"
        if self.kind is PreconditionKind.VERSION:
            return f"version {self.version}"
        if self.kind is PreconditionKind.EXISTS:
            return "an existing resource"
        return f"unmodified since {format_seconds(self.unmodified_since_s)}"


def format_seconds(seconds: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def check_precondition(name: str, head: Head, pre: Precondition) -> None:
    """Raise unless `pre` holds for the live (non-deleted) `head`."""
    latest = head.latest
    if pre.kind is PreconditionKind.ETAG:
        ok = pre.etag == latest.etag
    elif pre.kind is PreconditionKind.VERSION:
        ok = pre.version == latest.version
    elif pre.kind is PreconditionKind.EXISTS:
        ok = True
    else:
        since = pre.unmodified_since_s
        written = latest.update_time_us // US_PER_SECOND
        before = head.previous_update_time_us
        # HTTP dates have one-second granularity: two versions in the client's second are
        # indistinguishable, so the condition cannot prove which one the client saw.
        twice = before is not None and before // US_PER_SECOND == written == since
        if written > since or twice:
            raise errors.ModifiedSince(
                name=name, since=format_seconds(since), current=latest.current
            )
        return
    if not ok:
        raise errors.VersionMismatch(name=name, expected=pre.describe(), current=latest.current)


# --- writes ------------------------------------------------------------------------------------


class WriteKind(Enum):
    CREATE = "create"
    UPDATE = "update"
    DELETE = "delete"


@dataclass(frozen=True, slots=True)
class PatchSpec:
    media_type: str
    document: bytes


@dataclass(frozen=True, slots=True)
class Write:
    """A validated write request, ready to be checked against the head and appended."""

    kind: WriteKind
    name: str
    content: bytes = b""
    content_type: str = ""
    patch: PatchSpec | None = None
    precondition: Precondition | None = None
    actor: str = ANONYMOUS
    reason: str = ""
    request_id: str = ""
    # Scope of the request id: the resource name, or `parent/` for a create with a generated id.
    request_scope: str = ""
    fingerprint: bytes = b""

    @property
    def needs_content(self) -> bool:
        """Whether the head's content must be read to plan this write (patches only)."""
        return self.patch is not None


def plan_write(write: Write, head: Head | None, tail: Tail, now_us: int, *, limit: int) -> Version:
    """Check `write` against the resource's head and return the version to append.

    Order of checks (ARCHITECTURE.md): existence, precondition present, precondition holds; the
    request arguments were checked when `write` was built, the request id by the caller.
    """
    live = head if head is not None and not head.latest.deleted else None
    if write.kind is WriteKind.CREATE:
        if live is not None:
            raise errors.ResourceAlreadyExists(name=write.name, current=live.latest.current)
        content, content_type = write.content, write.content_type
    elif write.kind is WriteKind.DELETE:
        if live is None:
            raise errors.ResourceNotFound(
                name=write.name, deleted_at_version=head.latest.version if head else 0
            )
        _require_precondition(write, live)
        content, content_type = b"", ""
    else:
        if write.precondition is None:
            raise errors.PreconditionRequired(
                name=write.name, current=live.latest.current if live else None
            )
        if live is None:
            raise errors.VersionMismatch(
                name=write.name, expected=write.precondition.describe(), current=None
            )
        check_precondition(write.name, live, write.precondition)
        if write.patch is not None:
            content, content_type = _patched(write.patch, live.latest, limit=limit)
        else:
            content, content_type = write.content, write.content_type

    previous = head.latest if head is not None else None
    recreated = previous is None or previous.deleted or write.kind is WriteKind.CREATE
    # update_time strictly increases along the ledger, even when the wall clock steps back: so
    # it orders commits, and create_time == update_time exactly on a (re)creating version.
    update_time_us = max(now_us, tail.update_time_us + 1)
    number = previous.version + 1 if previous else 1
    create_time_us = previous.create_time_us if previous and not recreated else update_time_us
    deleted = write.kind is WriteKind.DELETE
    previous_hash = previous.hash if previous else b""
    return Version(
        name=write.name,
        version=number,
        revision=tail.revision + 1,
        content=content,
        content_type=content_type,
        create_time_us=create_time_us,
        update_time_us=update_time_us,
        actor=write.actor,
        reason=write.reason,
        deleted=deleted,
        previous_hash=previous_hash,
        ledger_previous_hash=tail.hash,
        hash=_digest(write.name, number, tail.revision + 1, content_type, create_time_us,
                     update_time_us, write.actor, write.reason, deleted, previous_hash,
                     tail.hash, content),
        size=len(content),
    )


def _require_precondition(write: Write, live: Head) -> None:
    if write.precondition is None:
        raise errors.PreconditionRequired(name=write.name, current=live.latest.current)
    check_precondition(write.name, live, write.precondition)


def _patched(spec: PatchSpec, latest: Version, *, limit: int) -> tuple[bytes, str]:
    if not content_rules.is_json_media_type(latest.content_type):
        raise errors.PatchConflict(
            f"{latest.name} holds {latest.content_type}, not JSON; a patch applies to JSON "
            "content only: replace the whole content instead"
        )
    result = patch_rules.apply_patch(spec.media_type, spec.document, latest.content,
                                     copy_budget=limit)
    if len(result) > limit:
        raise errors.ContentTooLarge(len(result), limit, field="patch")
    return result, latest.content_type


def verify_chain_link(v: Version) -> bool:
    """Whether a stored version's hash matches its recomputed hash."""
    return compute_hash(v) == v.hash


# --- page tokens -------------------------------------------------------------------------------


def encode_page_token(scope: str, after: str | int) -> str:
    """An opaque token for the next page: bound to the listing it came from (its scope)."""
    raw = json.dumps({"s": scope, "a": after}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_page_token(token: str, scope: str, kind: type[str] | type[int]) -> str | int | None:
    """The position a token resumes after; None for the empty token (the first page)."""
    if not token:
        return None
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        data = json.loads(raw)
    except (binascii.Error, ValueError, RecursionError) as exc:
        # RecursionError: a forged token of deeply nested JSON; json.loads recurses per level.
        raise errors.InvalidPageToken() from exc
    if not isinstance(data, dict) or data.get("s") != scope:
        raise errors.InvalidPageToken()
    after = data.get("a")
    if type(after) is not kind:
        raise errors.InvalidPageToken()
    assert isinstance(after, str | int)
    return after


def decode_name_token(token: str, scope: str) -> str | None:
    """The name a listing resumes after (None: the first page)."""
    after = decode_page_token(token, scope, str)
    assert after is None or isinstance(after, str)
    return after


def decode_version_token(token: str, scope: str) -> int | None:
    """The version a history resumes after (None: the first page); always an int64."""
    after = decode_page_token(token, scope, int)
    assert after is None or isinstance(after, int)
    if after is not None and not 0 <= after < 1 << 63:  # forged: storage cannot bind it
        raise errors.InvalidPageToken()
    return after


def page_size(requested: int, *, default: int = 100, maximum: int = 1000) -> int:
    if requested < 0:
        raise errors.InvalidArgument("page_size must not be negative", field="page_size")
    return min(requested or default, maximum)
