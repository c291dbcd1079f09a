"""Conditional requests (RFC 9110 §13), evaluated purely: headers in, a decision out.

Nothing here does I/O. The bridge uses it at two points:

* Before a write (PUT/PATCH/DELETE), :func:`write_conditions` turns If-Match (§13.1.1),
  If-None-Match (§13.1.2) and If-Unmodified-Since (§13.1.4) into the ``Precondition`` the service
  checks atomically with the write, so the bridge never has to read before writing to be safe.
* Once the current state is known, :func:`evaluate_preconditions` (and :func:`evaluate_read` for
  GET/HEAD) runs the §13.2.2 algorithm: If-Match, else If-Unmodified-Since, then If-None-Match,
  then If-Modified-Since (§13.1.3) for GET/HEAD only. If-Range (§13.1.5) is not evaluated: the
  bridge serves no ranges.

Grammar: entity-tags and their comparison are §8.8.3; lists follow the ``#rule`` of §5.6.1 (empty
elements and OWS around commas accepted); HTTP-dates are §5.6.7 (IMF-fixdate, plus the obsolete
RFC 850 and asctime forms a recipient must accept). A malformed entity-tag raises
:class:`MalformedHeader` (a 400 for the bridge), never "absent": guessing could turn a
conditional write into an unconditional one. An invalid date, by contrast, is ignored, as
§13.1.3 and §13.1.4 require.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import Enum
from typing import Protocol, cast, runtime_checkable

from google.protobuf.timestamp_pb2 import Timestamp

from casledger.service.api.casledger.v1 import ledger_pb2

__all__ = [
    "ETagList",
    "EntityTag",
    "HeaderLookup",
    "Headers",
    "MalformedHeader",
    "Outcome",
    "ReadOutcome",
    "WriteConditions",
    "evaluate_preconditions",
    "evaluate_read",
    "format_http_date",
    "headers_from_pairs",
    "parse_etag_list",
    "parse_http_date",
    "strong_match",
    "weak_match",
    "write_conditions",
]


class MalformedHeader(Exception):
    """A conditional header that does not follow its grammar; the bridge answers 400."""

    def __init__(self, header: str, value: str, message: str) -> None:
        super().__init__(f"{header}: {message}")
        self.header = header
        self.value = value
        self.message = message


# --- headers ---------------------------------------------------------------------------------


@runtime_checkable
class HeaderLookup(Protocol):
    """Anything with ``getlist(name)`` returning every line of a header, case-insensitively
    (Starlette's ``Headers`` qualifies)."""

    def getlist(self, key: str, /) -> list[str]: ...


Headers = HeaderLookup | Iterable[tuple[str, str]]


class _PairHeaders:
    def __init__(self, pairs: Iterable[tuple[str, str]]) -> None:
        self._pairs = [(name.lower(), value) for name, value in pairs]

    def getlist(self, key: str, /) -> list[str]:
        key = key.lower()
        return [value for name, value in self._pairs if name == key]


def headers_from_pairs(pairs: Iterable[tuple[str, str]]) -> HeaderLookup:
    """A :class:`HeaderLookup` over ``(name, value)`` pairs; names compare case-insensitively."""
    return _PairHeaders(pairs)


def _lookup(headers: Headers) -> HeaderLookup:
    # Duck-typed: isinstance() against a runtime-checkable Protocol inspects its members on
    # every call, a measurable cost on every request.
    if callable(getattr(headers, "getlist", None)):
        return cast(HeaderLookup, headers)
    return _PairHeaders(cast(Iterable[tuple[str, str]], headers))


# --- entity-tags (§8.8.3) --------------------------------------------------------------------


@dataclass(frozen=True)
class EntityTag:
    """An entity-tag: ``opaque`` is the text between the quotes; ``weak`` for a ``W/`` prefix."""

    opaque: str
    weak: bool = False

    def __str__(self) -> str:
        return f'{"W/" if self.weak else ""}"{self.opaque}"'


@dataclass(frozen=True)
class ETagList:
    """A parsed If-Match / If-None-Match value: ``*`` (``wildcard``) or a list of tags.

    Neither (no tags, not ``*``) means the field held only empty list elements; the evaluators
    treat that exactly like an absent field, since it states no condition.
    """

    wildcard: bool = False
    tags: tuple[EntityTag, ...] = ()

    @property
    def is_empty(self) -> bool:
        """Neither ``*`` nor any tag: a field of empty list elements only."""
        return not self.wildcard and not self.tags


def strong_match(a: EntityTag, b: EntityTag) -> bool:
    """§8.8.3.2 strong comparison: both strong and the opaque-tags equal."""
    return not a.weak and not b.weak and a.opaque == b.opaque


def weak_match(a: EntityTag, b: EntityTag) -> bool:
    """§8.8.3.2 weak comparison: the opaque-tags equal, whatever their weakness."""
    return a.opaque == b.opaque


# etagc = %x21 / %x23-7E / obs-text (%x80-FF: header bytes arrive latin-1 decoded).
_ENTITY_TAG = re.compile(r'(W/)?"([\x21\x23-\x7e\x80-\xff]*)"')


def _parse_line(header: str, line: str) -> list[EntityTag | None]:
    """Members of one field line; ``None`` stands for ``*``."""
    members: list[EntityTag | None] = []
    i, n = 0, len(line)
    while True:
        while i < n and line[i] in " \t,":  # OWS and empty list elements (§5.6.1)
            i += 1
        if i == n:
            return members
        if line[i] == "*":
            members.append(None)
            i += 1
        else:
            match = _ENTITY_TAG.match(line, i)
            if match is None:
                start = i + 2 if line.startswith("W/", i) else i
                if start >= n or line[start] != '"':
                    why = 'expected an entity-tag such as "abc" or W/"abc" (W/ is case-sensitive)'
                elif line.find('"', start + 1) < 0:
                    why = "unterminated entity-tag (no closing double quote)"
                else:
                    why = "character not allowed inside an entity-tag"
                raise MalformedHeader(header, line, why)
            members.append(EntityTag(match.group(2), weak=match.group(1) is not None))
            i = match.end()
        while i < n and line[i] in " \t":
            i += 1
        if i < n and line[i] != ",":
            raise MalformedHeader(header, line, "list members must be separated by commas")


def parse_etag_list(values: Sequence[str], *, header: str = "If-Match") -> ETagList:
    """Parse every line of an If-Match / If-None-Match field as one list (§5.3, §13.1.1).

    ``*`` must be the only member (across all lines); anything off-grammar raises
    :class:`MalformedHeader` naming ``header``.
    """
    members = [m for line in values for m in _parse_line(header, line)]
    if None in members:
        if len(members) > 1:
            raise MalformedHeader(header, ", ".join(values), '"*" must be the only member')
        return ETagList(wildcard=True)
    return ETagList(tags=tuple(m for m in members if m is not None))


def _etag_field(headers: HeaderLookup, name: str) -> ETagList | None:
    parsed = parse_etag_list(headers.getlist(name), header=name)
    return None if parsed.is_empty else parsed


def _current_tag(current_etag: str | None) -> EntityTag | None:
    if current_etag is None:
        return None
    match = _ENTITY_TAG.fullmatch(current_etag)
    if match is None:  # the service's ETag, not the client's: a bug, hence not MalformedHeader
        raise ValueError(f"current ETag {current_etag!r} is not an entity-tag")
    return EntityTag(match.group(2), weak=match.group(1) is not None)


def _list_matches(lst: ETagList, current: EntityTag | None, *, exists: bool, weak: bool) -> bool:
    if lst.wildcard:
        return exists
    compare = weak_match if weak else strong_match
    return current is not None and any(compare(tag, current) for tag in lst.tags)


# --- HTTP-dates (§5.6.7) ---------------------------------------------------------------------

_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_LONG_DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_D, _M, _T = "|".join(_DAYS), "|".join(_MONTHS), r"([0-9]{2}):([0-9]{2}):([0-9]{2})"
# [0-9], not \d (which takes any Unicode digit); case-sensitive, as the grammar's %s"..." says.
_IMF = re.compile(rf"(?:{_D}), ([0-9]{{2}}) ({_M}) ([0-9]{{4}}) {_T} GMT")
_RFC850 = re.compile(rf"(?:{'|'.join(_LONG_DAYS)}), ([0-9]{{2}})-({_M})-([0-9]{{2}}) {_T} GMT")
_ASCTIME = re.compile(rf"(?:{_D}) ({_M}) ([0-9]{{2}}| [0-9]) {_T} ([0-9]{{4}})")


def _utc(dt: datetime, what: str) -> datetime:
    if dt.tzinfo is None:
        raise ValueError(f"{what} must be timezone-aware")
    return dt.astimezone(UTC)


def _build(year: int, month: str, day: str, hh: str, mm: str, ss: str) -> datetime | None:
    try:
        # A leap second (:60) is read as :59; datetime cannot hold it and the second before is
        # the conservative reading for both If-Modified-Since and If-Unmodified-Since.
        return datetime(
            year, _MONTHS.index(month) + 1, int(day), int(hh), int(mm), min(int(ss), 59), tzinfo=UTC
        )
    except ValueError:  # 31 Feb, hour 24, year 0000, ...
        return None


def _rfc850(yy: int, rest: tuple[str, ...], now: datetime) -> datetime | None:
    # §5.6.7: a two-digit year that "appears to be more than 50 years in the future" is the most
    # recent past year with those digits. Start from the next year >= now carrying them, so the
    # result always falls in (now - 50 years, now + 50 years].
    base = now.year + (yy - now.year) % 100
    limit = now.replace(year=now.year + 50, day=28 if (now.month, now.day) == (2, 29) else now.day)
    for year in (base, base - 100):
        dt = _build(year, *rest)
        if dt is not None and (year != base or dt <= limit):
            return dt
    return None


def parse_http_date(value: str, *, now: datetime | None = None) -> datetime | None:
    """An HTTP-date as an aware UTC datetime, or ``None`` if invalid (which callers ignore).

    ``now`` anchors the RFC 850 two-digit-year rule; it defaults to the current time. The day
    name is checked for form only, not against the date, as common servers do.
    """
    value = value.strip(" \t")
    if m := _IMF.fullmatch(value):
        day, month, year, hh, mm, ss = m.groups()
        return _build(int(year), month, day, hh, mm, ss)
    if m := _RFC850.fullmatch(value):
        day, month, yy, hh, mm, ss = m.groups()
        return _rfc850(int(yy), (month, day, hh, mm, ss), _utc(now or datetime.now(UTC), "now"))
    if m := _ASCTIME.fullmatch(value):
        month, day, hh, mm, ss, year = m.groups()
        return _build(int(year), month, day.strip(), hh, mm, ss)
    return None


def format_http_date(dt: datetime) -> str:
    """``dt`` (timezone-aware) as an IMF-fixdate, truncated to the second; locale-independent."""
    dt = _utc(dt, "dt")
    return (
        f"{_DAYS[dt.weekday()]}, {dt.day:02d} {_MONTHS[dt.month - 1]} {dt.year:04d} "
        f"{dt.hour:02d}:{dt.minute:02d}:{dt.second:02d} GMT"
    )


def _date_field(headers: HeaderLookup, name: str, now: datetime) -> datetime | None:
    lines = headers.getlist(name)
    # More than one line is a list of dates: invalid, hence ignored (§13.1.3, §13.1.4).
    return parse_http_date(lines[0], now=now) if len(lines) == 1 else None


# --- evaluation (§13.2.2) --------------------------------------------------------------------


class Outcome(Enum):
    """What the preconditions decide: go ahead, 304 Not Modified, or 412 Precondition Failed."""

    OK = "ok"
    NOT_MODIFIED = "not_modified"
    PRECONDITION_FAILED = "precondition_failed"


ReadOutcome = Outcome


def evaluate_preconditions(
    method: str,
    headers: Headers,
    *,
    current_etag: str | None,
    last_modified: datetime | None,
    exists: bool,
    now: datetime | None = None,
) -> Outcome:
    """The §13.2.2 algorithm against a known current state, for any method.

    ``current_etag`` is the quoted ETag (``'"7-3fa9"'``); ``last_modified`` is aware and compared
    to the second; ``now`` (default: the clock) rejects future If-Modified-Since dates. Malformed
    entity-tags raise :class:`MalformedHeader` whatever the method.

    §13.2.1: preconditions are ignored when the unconditional answer would be neither 2xx nor
    412. For GET/HEAD of an absent resource that answer is 404, so this returns ``OK`` and the
    bridge answers 404. For other methods it cannot know (PUT creates, DELETE is 404), so it
    evaluates them; the bridge must give its own 404 precedence.
    """
    h = _lookup(headers)
    now = _utc(now or datetime.now(UTC), "now")
    if_match = _etag_field(h, "If-Match")
    if_none_match = _etag_field(h, "If-None-Match")
    safe = method.upper() in ("GET", "HEAD")
    if safe and not exists:
        return Outcome.OK
    current = _current_tag(current_etag) if exists else None
    # HTTP dates have one-second resolution (§13.1.3, §13.1.4); without truncation a stored
    # 12:00:00.4 would count as modified after "12:00:00 GMT", the very date we sent.
    modified = None
    if exists and last_modified is not None:
        modified = _utc(last_modified, "last_modified").replace(microsecond=0)

    if if_match is not None:
        if not _list_matches(if_match, current, exists=exists, weak=False):
            return Outcome.PRECONDITION_FAILED
    else:
        since = _date_field(h, "If-Unmodified-Since", now)
        # Ignored when there is no modification date (§13.1.4), e.g. an absent resource.
        if since is not None and modified is not None and modified > since:
            return Outcome.PRECONDITION_FAILED

    if if_none_match is not None:
        if _list_matches(if_none_match, current, exists=exists, weak=True):
            return Outcome.NOT_MODIFIED if safe else Outcome.PRECONDITION_FAILED
    elif safe:
        since = _date_field(h, "If-Modified-Since", now)
        # A date later than our clock is invalid (§13.1.3): honouring it could hide a change.
        if since is not None and since <= now and modified is not None and modified <= since:
            return Outcome.NOT_MODIFIED
    return Outcome.OK


def evaluate_read(
    headers: Headers,
    *,
    current_etag: str | None,
    last_modified: datetime | None,
    exists: bool,
    now: datetime | None = None,
) -> ReadOutcome:
    """:func:`evaluate_preconditions` for GET/HEAD (they evaluate identically)."""
    return evaluate_preconditions(
        "GET",
        headers,
        current_etag=current_etag,
        last_modified=last_modified,
        exists=exists,
        now=now,
    )


# --- writes ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class WriteConditions:
    """What a PUT/PATCH/DELETE asked for, ready for the service's atomic compare-and-swap.

    Fields:

    * ``precondition`` -- what to send with UpdateResource/DeleteResource: ``etag`` for one strong
      If-Match tag (the first, when several), ``exists`` for ``If-Match: *``, ``unmodified_since``
      for a valid If-Unmodified-Since without If-Match. ``None``: nothing usable (answer 428),
      or ``create_only``/``always_fails`` (check those first). Treat as read-only.
    * ``create_only`` -- ``If-None-Match: *``: call CreateResource; ALREADY_EXISTS is a 412.
    * ``always_fails`` -- no current state can satisfy the request (If-Match holding only weak
      tags, which never match strongly; If-Match together with ``If-None-Match: *``; every If-Match
      tag excluded by If-None-Match): answer 412 without writing.
    * ``if_match_any`` -- If-Match was ``*``.
    * ``etag_candidates`` -- the strong If-Match tags, quoted, deduplicated, minus any that an
      If-None-Match tag excludes. The RFC's condition holds if *any* equals the current ETag,
      but the service compares against one.
    * ``none_match_tags`` -- If-None-Match's tags on a write: 412 if any weakly matches the current
      ETag. They name no version to edit, so alone they are no precondition.
    * ``sent_etag_on_if_none_match`` -- the 428 case where the client put its ETag on
      If-None-Match instead of If-Match; the 428 detail should say exactly that.

    Bridge, step by step: (1) ``always_fails`` -> read the current ETag for the problem body, 412.
    (2) ``create_only`` -> CreateResource. (3) ``needs_current_etag`` -> read the resource; if it
    exists and :func:`evaluate_preconditions` says 412, answer 412; send ``bind(etag or None)``.
    (4) otherwise send ``precondition``; ``None`` -> 428. (5) ABORTED from the service -> 412.
    """

    precondition: ledger_pb2.Precondition | None = field(default=None, hash=False)
    create_only: bool = False
    always_fails: bool = False
    if_match_any: bool = False
    etag_candidates: tuple[str, ...] = ()
    none_match_tags: tuple[EntityTag, ...] = ()
    sent_etag_on_if_none_match: bool = False

    @property
    def needs_current_etag(self) -> bool:
        """True when exact RFC semantics need the current ETag before the write: several
        If-Match candidates, or If-None-Match tags next to ``If-Match: *``/If-Unmodified-Since.
        (Skipping the read is safe but may 412 a write the RFC would allow.)"""
        if self.always_fails or self.create_only or self.precondition is None:
            return False
        return len(self.etag_candidates) > 1 or bool(
            self.none_match_tags and not self.etag_candidates
        )

    def bind(self, current_etag: str | None) -> ledger_pb2.Precondition | None:
        """The precondition to send once :func:`evaluate_preconditions` passed against the
        resource whose ETag is ``current_etag`` (``None``: it was absent).

        Pins the write to the version just checked, so a concurrent write between that read and
        the CAS fails (412) instead of slipping through. If-Unmodified-Since is kept as sent: the
        service refuses it when one second holds two versions, a guard an ETag would bypass.
        """
        pre = self.precondition
        if pre is None or current_etag is None or pre.HasField("unmodified_since"):
            return pre
        return ledger_pb2.Precondition(etag=current_etag)


def write_conditions(headers: Headers, *, now: datetime | None = None) -> WriteConditions:
    """Read a write's conditional headers (§13.2.2 order); see :class:`WriteConditions`.

    Raises :class:`MalformedHeader` for a malformed If-Match or If-None-Match.
    """
    h = _lookup(headers)
    if_match = _etag_field(h, "If-Match")
    if_none_match = _etag_field(h, "If-None-Match")
    none_match_tags = if_none_match.tags if if_none_match else ()
    create_only = bool(if_none_match and if_none_match.wildcard)

    if if_match is not None:
        if create_only:  # exists -> If-None-Match fails; absent -> If-Match fails
            return WriteConditions(create_only=True, always_fails=True)
        if if_match.wildcard:
            pre = ledger_pb2.Precondition(exists=True)
            return WriteConditions(pre, if_match_any=True, none_match_tags=none_match_tags)
        # A current ETag that strongly matches c also weakly matches every tag weakly matching
        # c, so a candidate excluded by If-None-Match can never succeed: drop it here.
        candidates = tuple(
            dict.fromkeys(
                str(tag)
                for tag in if_match.tags
                if not tag.weak and not any(weak_match(tag, n) for n in none_match_tags)
            )
        )
        if not candidates:
            return WriteConditions(always_fails=True, none_match_tags=none_match_tags)
        pre = ledger_pb2.Precondition(etag=candidates[0])
        return WriteConditions(pre, etag_candidates=candidates, none_match_tags=none_match_tags)

    if create_only:  # If-Unmodified-Since adds nothing: only an absent resource gets created
        return WriteConditions(create_only=True)
    since = _date_field(h, "If-Unmodified-Since", _utc(now or datetime.now(UTC), "now"))
    if since is not None:
        pre = ledger_pb2.Precondition(unmodified_since=Timestamp(seconds=int(since.timestamp())))
        return WriteConditions(pre, none_match_tags=none_match_tags)
    return WriteConditions(
        none_match_tags=none_match_tags, sent_etag_on_if_none_match=bool(none_match_tags)
    )
