"""Tamper evidence, checked: the streaming verifier and the ledger digest. Pure (no I/O).

:class:`Verifier` is fed every version of a ledger in revision order, in one pass, and recomputes
what the ledger rules (:mod:`casledger.service.model`) put there:

- each version's hash, with :func:`~casledger.service.model.compute_hash` (edited content or
  metadata, a forged tombstone: ``HASH_MISMATCH``);
- the ledger chain: revisions go 1, 2, 3 ... and each ``ledger_previous_hash`` is the hash of the
  revision before (a dropped, inserted or reordered version: ``REVISION_GAP`` /
  ``LEDGER_CHAIN_BROKEN``);
- each resource's chain: versions go 1, 2, 3 ... and each ``previous_hash`` is the hash of the
  resource's version before (``VERSION_GAP`` / ``RESOURCE_CHAIN_BROKEN``);
- the tombstone rules (no content, no media type; the flag is 0 or 1 and never follows another
  tombstone) and what the hash does not cover: ``size`` equals the content's length.

Memory. The only state kept across rows is, per resource name, its last (version, hash, deleted)
— it grows with the number of resources, never with the number of versions — plus the previous
revision's number, hash and time. A chain of one resource cannot be checked in revision order
with less: the link from version n to n+1 may span the whole ledger. (Two passes could make it
constant — the second in (name, version) order over the unique index — at twice the reading.)

Speed. :meth:`Verifier.feed_rows` takes database rows (tuples of the :class:`Version` fields, in
order; any iterable, such as the cursor itself, so that no batch of rows is held) and checks each
with one :func:`~casledger.service.model.compute_hash_row` and a handful of comparisons, state in
locals; a row that fails any of them (or that it cannot read) goes to the slow path, which redoes
that row's checks the way they are written out in :meth:`_judge` and :meth:`_diagnose` and says
what is wrong. Only rows that are fine take the fast path, so both paths report the same.

Slices. ``casledger verify --jobs N`` checks contiguous slices of the revisions at once in N
processes. A worker checks its slice with :meth:`Verifier.for_slice`: every row's hash and every
link inside the slice as usual; the rows whose checks need what came before the slice — its first
row (the ledger chain) and each resource's first row in it (the resource's chain) — are settled as
far as the slice can settle them (the hash, the content's length) and handed back as
:data:`Pending` rows in a :class:`SliceSummary`, with the state at the slice's end (each
resource's last version, the last revision) and, if it holds the digest's revision, each
resource's head there. The parent feeds the first slice itself and :meth:`Verifier.absorb` s the
others in order: it judges each pending row against the state the earlier slices left (the same
condition as the fast path, then :meth:`_judge` for a row that fails it), merges the problems by
revision and takes the slice's end state as its own. Two adjacent summaries join into one
(:meth:`Verifier.resume` the first, absorb the second: the pending rows of the second that link
into the first are judged, the others stay pending), so the parent holds one summary for a run of
slices however many there are. The problems, their order and the final state are those of a
single pass over the same rows.

That needs one thing the slice cannot see: that the rows before it left ordinary values in the
state (integer revisions and versions, byte-string hashes). A hand edit that stores, say, a
revision as text leaves a value the checks after it trip over differently; a worker that meets
such a row (or a malformed one) gives up on its slice, and so does :meth:`absorb` once the rows
it was fed did: the parent then reads those slices itself, in one pass.

Digest. ``R:hex``, where hex is the SHA-256 over the digest format tag, R, the hash of revision R
and every resource's head as of R (name, version, hash; sorted by name), each length-prefixed.
The hash of revision R already commits to the whole ledger up to R through the ledger chain, so a
store that still *extends* a digest printed earlier cannot have rewritten anything up to R — not
even one resource's whole history with every hash recomputed, which the chains alone would not
reveal. The heads make the digest say what the ledger held at R.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import re
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, fields
from enum import Enum
from typing import Any

from .model import Version, compute_hash, compute_hash_row

DIGEST_FORMAT = b"casledger-digest/v1"
_DIGEST = re.compile(r"(0|[1-9][0-9]{0,18}):([0-9a-f]{64})")
_NEVER = sys.maxsize
# What a row whose columns hold values of the wrong type (only a hand edit does that) raises.
_UNREADABLE = (TypeError, ValueError, AttributeError, OverflowError)
# The hash of the revision before a slice, to its worker: unknown, and equal to no hash.
_UNKNOWN: Any = object()

Row = tuple[Any, ...]
"""A version as a database row: the :class:`Version` fields, in order (``ROW_FIELDS``)."""
ROW_FIELDS = tuple(f.name for f in fields(Version))
# (revision, hash, update_time_us, name, version) of the last row before a point.
LedgerState = tuple[Any, Any, Any, Any, Any]


class ProblemKind(Enum):
    """What is wrong with one version (the value is what `--json` reports)."""

    HASH_MISMATCH = "hash_mismatch"
    MALFORMED = "malformed"
    REVISION_GAP = "revision_gap"
    LEDGER_CHAIN_BROKEN = "ledger_chain_broken"
    VERSION_GAP = "version_gap"
    RESOURCE_CHAIN_BROKEN = "resource_chain_broken"
    BAD_TOMBSTONE = "bad_tombstone"
    SIZE_MISMATCH = "size_mismatch"
    TIME_ORDER = "time_order"
    HEAD_MISMATCH = "head_mismatch"
    DIGEST_MISMATCH = "digest_mismatch"
    TRUNCATED = "truncated"


@dataclass(frozen=True, slots=True)
class Problem:
    """One broken link, named by the version where it shows (revision 0: not one version)."""

    kind: ProblemKind
    name: str
    version: int
    revision: int
    detail: str

    def __str__(self) -> str:
        where = f"{self.name} version {self.version} (revision {self.revision})" \
            if self.name else f"revision {self.revision}"
        return f"{where}: {self.kind.value}: {self.detail}"


@dataclass(frozen=True, slots=True)
class Digest:
    """A ledger digest at a revision; printed and parsed as ``R:hex``."""

    revision: int
    value: bytes

    def __str__(self) -> str:
        return f"{self.revision}:{self.value.hex()}"

    @classmethod
    def parse(cls, text: str) -> Digest:
        match = _DIGEST.fullmatch(text.strip())
        if match is None:
            raise ValueError(f"a digest looks like REVISION:64-hex-digits, not {text!r}")
        return cls(int(match[1]), bytes.fromhex(match[2]))


def ledger_digest(revision: int, revision_hash: bytes,
                  heads: Iterable[tuple[str, int, bytes]]) -> Digest:
    """The digest at `revision` (whose hash is `revision_hash`) of `heads` sorted by name."""
    h = hashlib.sha256()
    for part in (DIGEST_FORMAT, str(revision).encode(), _bytes(revision_hash)):
        h.update(len(part).to_bytes(4, "big") + part)
    for name, version, digest in heads:
        for part in (name.encode(), str(version).encode(), _bytes(digest)):
            h.update(len(part).to_bytes(4, "big") + part)
    return Digest(revision, h.digest())


def _bytes(value: object) -> bytes:
    # A hash column a hand edit made text: that ledger fails verification (its hash cannot
    # match), but verify still prints the digest it found, rather than crashing.
    return value if isinstance(value, bytes) else str(value).encode()



def _hex8(value: bytes) -> str:
    return value[:8].hex() if value else "(none)"


def row_of(v: Version) -> Row:
    """`v` as a row (its fields in order)."""
    return (v.name, v.version, v.revision, v.content, v.content_type, v.create_time_us,
            v.update_time_us, v.actor, v.reason, v.deleted, v.previous_hash,
            v.ledger_previous_hash, v.hash, v.size)


Pending = tuple[str, int, int, str, int, Any, bytes, bytes, Any, bool, int, "LedgerState | None"]
"""A row of a slice whose checks need the rows before the slice, without its content: (name,
version, revision, content_type, update_time_us, deleted, previous_hash, ledger_previous_hash,
size, hash_differs, content_length, before). What the content decides (``hash_differs``,
``content_length``) is settled by the worker, which had it; ``deleted`` and ``size`` are as read
(the checks say what is wrong with them). ``before``: the ledger state just before the row,
unless the row is the slice's first (then it is the state the earlier slices end with). A plain
tuple: a summary carries one per resource, across processes, and a dataclass pickles ten times
slower."""


def _stand_in(pending: Pending) -> Version:
    """The pending row as a Version the checks can read (the content is never looked at)."""
    (name, version, revision, content_type, update_time_us, deleted, previous_hash,
     ledger_previous_hash, size, *_) = pending
    return Version(name, version, revision, b"", content_type, 0, update_time_us, "", "",
                   deleted, previous_hash, ledger_previous_hash, b"", size)


@dataclass(frozen=True, slots=True)
class SliceSummary:
    """What a worker found in its slice of the revisions; see the module docstring.

    ``gave_up``: why the slice must be checked in one pass instead ("" when it need not; then
    nothing else in the summary is meaningful). ``problems``: the first ``max_problems`` found
    inside the slice (``problem_count`` counts all). ``last``: the ledger state after the
    slice's last row (None: no rows). ``heads``: each resource's last (version, hash, deleted)
    in the slice. ``snapshot``: the slice's first row at or past the digest's revision — its
    revision, its hash, and each resource's (version, hash) in the slice up to it."""

    gave_up: str
    versions: int
    problem_count: int
    problems: tuple[Problem, ...]
    pending: tuple[Pending, ...]
    last: LedgerState | None
    heads: dict[str, tuple[int, bytes, bool]]
    snapshot: tuple[int, bytes, dict[str, tuple[int, bytes]]] | None


class Verifier:
    """Checks a ledger fed in revision order, in one pass; see the module docstring.

    ``digest_at``: also compute the digest at that revision (else at the last one fed).
    Problems are counted; the first ``max_problems`` are kept (memory stays bounded)."""

    def __init__(self, *, digest_at: int | None = None, max_problems: int = 1000) -> None:
        self.versions = 0
        self.problem_count = 0
        self.problems: list[Problem] = []
        self.max_problems = max_problems
        # The state: values as read, so of any type on a hand-edited file (see _judge).
        self._heads: dict[str, tuple[int, bytes, bool]] = {}
        self._revision: Any = 0
        self._hash: Any = b""
        self._time: Any = -1
        self._last: tuple[Any, Any] = ("", 0)
        self._digest_at = digest_at
        self._digest: Digest | None = None
        # A good row left a value in the state that is not an integer revision or version or
        # a byte-string hash: from then on, slices cannot be stitched (see the module docstring).
        self._tainted = False
        # Slice mode (for_slice).
        self._in_slice = False
        self._ledger_known = True
        self._pending: list[Pending] = []
        self._gave_up = ""
        self._slice_snapshot: tuple[int, bytes, dict[str, tuple[int, bytes]]] | None = None

    @classmethod
    def for_slice(cls, *, digest_at: int | None = None, max_problems: int = 1000) -> Verifier:
        """A verifier of one slice of the revisions, for a worker: fed the slice's rows, its
        :meth:`summary` is for the parent's :meth:`absorb`."""
        verifier = cls(digest_at=digest_at, max_problems=max_problems)
        verifier._in_slice = True
        verifier._ledger_known = False
        verifier._hash = _UNKNOWN
        return verifier

    @classmethod
    def resume(cls, summary: SliceSummary, *, digest_at: int | None = None,
               max_problems: int = 1000) -> Verifier:
        """A verifier of a slice that has been fed the rows `summary` sums up: it can
        :meth:`absorb` the summary of the slice right after it, and its :meth:`summary` is then
        that of both slices, as if one worker had checked them in one go. The parent joins the
        workers' chunks so as they come in, holding one summary instead of one per chunk."""
        verifier = cls.for_slice(digest_at=digest_at, max_problems=max_problems)
        verifier._gave_up = summary.gave_up
        verifier.versions, verifier.problem_count = summary.versions, summary.problem_count
        verifier.problems = list(summary.problems)
        verifier._pending = list(summary.pending)
        verifier._heads = dict(summary.heads)
        if summary.last is not None:
            verifier._revision, verifier._hash, verifier._time, *last = summary.last
            verifier._last = (last[0], last[1])
            verifier._ledger_known = True
        verifier._slice_snapshot = summary.snapshot
        return verifier

    @property
    def revision(self) -> int:
        """The last revision fed (0 before any)."""
        return self._revision  # type: ignore[no-any-return]

    @property
    def resources(self) -> int:
        return len(self._heads)

    @property
    def ok(self) -> bool:
        return self.problem_count == 0

    @property
    def digest_at(self) -> int | None:
        return self._digest_at

    @property
    def gave_up(self) -> str:
        """Slice mode: why this slice must be checked in one pass ("" if it need not)."""
        return self._gave_up

    def _report(self, kind: ProblemKind, v: Version, detail: str) -> None:
        self.problem_count += 1
        if len(self.problems) < self.max_problems:
            self.problems.append(Problem(kind, str(v.name), v.version, v.revision, detail))

    def feed(self, batch: Iterable[Version]) -> None:
        """Check the next versions (revision order); their problems are recorded."""
        self.feed_rows(map(row_of, batch))

    def feed_rows(self, rows: Iterable[Row]) -> int:
        """Check the next versions, as rows (revision order); their problems are recorded.
        Returns how many rows it took (`rows` may be an iterator, such as a database cursor)."""
        # The hot loop of `casledger verify`: state lives in locals while the rows run, and the
        # only call per row is compute_hash_row. A row that is not plainly fine goes to _slow
        # (problems are rare and may be slow): the condition below is _judge's, with the
        # content's hash and length at hand.
        if self._gave_up:
            return 0
        heads = self._heads
        head_of = heads.get
        revision, last_hash, last_time = self._revision, self._hash, self._time
        last_row: Row | None = None
        # In a slice, a resource not seen yet in it links to a version before it: pending.
        in_slice, pending = self._in_slice, self._pending
        snapshot_at = self._snapshot_at()
        hash_row = compute_hash_row
        count = 0
        for count, row in enumerate(rows, 1):
            try:
                (name, number, rev, content, content_type, _, update_time, _, _, deleted,
                 previous, ledger_previous, stored, size) = row
                fine = not (
                    hash_row(row) != stored or rev != revision + 1
                    or ledger_previous != last_hash or size != len(content)
                    or update_time <= last_time
                    or (deleted and (deleted != 1 or content or content_type)))
                if not fine:
                    pass
                elif (head := head_of(name)) is not None:
                    fine = not (number != head[0] + 1 or previous != head[1]
                                or (deleted and head[2]))
                elif not in_slice:
                    fine = number == 1 and not previous
                elif fine := (type(name) is str and type(number) is int and type(rev) is int
                              and type(update_time) is int and type(stored) is bytes):
                    # The resource's first row in the slice: what _slow_in_slice leaves to the
                    # parent (its links to the rows before the slice), as it would leave it.
                    last = self._last if last_row is None else (last_row[0], last_row[1])
                    pending.append((name, number, rev, content_type, update_time, deleted,
                                    previous, ledger_previous, size, False, len(content),
                                    (revision, last_hash, last_time, *last)))
            except Exception:  # a value of the wrong type: _slow says which
                fine = False
            if fine:
                # deleted is 0, 1 (or False, True) here: `== 1` is bool(deleted).
                heads[name] = (number, stored, deleted == 1)
                revision, last_hash, last_time, last_row = rev, stored, update_time, row
                if rev >= snapshot_at:
                    self._revision, self._hash = revision, last_hash
                    self._take_snapshot()
                    snapshot_at = _NEVER
                continue
            self._revision, self._hash, self._time = revision, last_hash, last_time
            if last_row is not None:
                self._last = (last_row[0], last_row[1])
                last_row = None
            self._slow(row)
            if self.gave_up:
                self.versions += count
                return count
            revision, last_hash, last_time = self._revision, self._hash, self._time
            snapshot_at = self._snapshot_at()
        self._revision, self._hash, self._time = revision, last_hash, last_time
        if last_row is not None:
            self._last = (last_row[0], last_row[1])
        self.versions += count
        return count

    def _snapshot_at(self) -> int:
        taken = self._slice_snapshot is not None if self._in_slice else self._digest is not None
        return _NEVER if self._digest_at is None or taken else self._digest_at

    def _take_snapshot(self) -> None:
        if self._in_slice:
            self._slice_snapshot = (self._revision, self._hash, {
                name: (head[0], head[1]) for name, head in self._heads.items()})
        else:
            self._digest = self._snapshot()

    # --- the slow path ---------------------------------------------------------------------

    def _slow(self, row: Row) -> None:
        v = Version(*row)
        if self._in_slice:
            self._slow_in_slice(v)
        else:
            self._check(v)

    def _check(self, v: Version) -> bool:
        """Check `v` against the state, report what is wrong and, unless it is malformed, make
        it the state. False if it is malformed (a column value of the wrong type)."""
        try:
            self._heads.get(v.name)  # an unhashable name is malformed, and is so first
            hash_differs = compute_hash(v) != v.hash
            length = len(v.content)
        except _UNREADABLE as exc:
            self._report(ProblemKind.MALFORMED, v, f"unreadable column value: {exc}")
            good = False
        else:
            good = self._judge(v, hash_differs, length)
        if not good:
            self.versions -= 1
            if isinstance(v.revision, int):
                self._revision = v.revision
            return False
        self._advance(v)
        return True

    def _advance(self, v: Version) -> None:
        """Make the good version `v` the state."""
        self._heads[v.name] = (v.version, v.hash, bool(v.deleted))
        self._revision, self._hash, self._time = v.revision, v.hash, v.update_time_us
        self._last = (v.name, v.version)
        if not (type(v.revision) is int and type(v.version) is int and type(v.hash) is bytes):
            self._tainted = True
        try:
            due = v.revision >= self._snapshot_at()
        except TypeError:  # a revision that is not a number reaches no digest's revision
            due = False
        if due:
            self._take_snapshot()

    def _judge(self, v: Version, hash_differs: bool, length: int) -> bool:
        """Check `v` against the state before it, given what its content decides (whether
        compute_hash differs from its stored hash; its content's length), and report what is
        wrong. False if a value of the wrong type stopped the checks: then `v` is malformed
        (reported), and what was found before stays reported. Changes no state."""
        revision, last_hash, last_time = self._revision, self._hash, self._time
        try:
            number = v.version
            # Rows read from SQLite carry the stored integer, which a hand edit can make 2.
            deleted: object = v.deleted
            head = self._heads.get(v.name)
            if (hash_differs or v.revision != revision + 1
                    or v.ledger_previous_hash != last_hash or v.size != length
                    or v.update_time_us <= last_time
                    or (number != 1 or v.previous_hash if head is None
                        else number != head[0] + 1 or v.previous_hash != head[1]
                        or (deleted and head[2]))
                    or (deleted and ((deleted is not True and deleted != 1) or length
                                     or v.content_type))):
                self._diagnose(v, head, hash_differs, length)
        except _UNREADABLE as exc:
            self._report(ProblemKind.MALFORMED, v, f"unreadable column value: {exc}")
            return False
        return True

    def _diagnose(self, v: Version, head: tuple[int, bytes, bool] | None, hash_differs: bool,
                  length: int) -> None:
        """Say what is wrong with `v`, given the state before it (something is)."""
        revision, last_hash, last_time = self._revision, self._hash, self._time
        last_name, last_number = self._last
        report = self._report
        if hash_differs:
            report(ProblemKind.HASH_MISMATCH, v, "the stored hash is not the hash of the stored "
                   "fields: its content or metadata was edited")
        if v.revision != revision + 1:
            report(ProblemKind.REVISION_GAP, v, f"revision {v.revision} follows revision "
                   f"{revision}: a version was dropped, inserted or moved")
        if v.ledger_previous_hash != last_hash:
            before = (f"{last_name} version {last_number}" if last_name
                      else "the start of the ledger")
            report(ProblemKind.LEDGER_CHAIN_BROKEN, v, f"ledger_previous_hash "
                   f"{_hex8(v.ledger_previous_hash)} is not the hash {_hex8(last_hash)} of "
                   f"revision {revision} ({before})")
        name = v.name
        if head is None:
            if v.version != 1:
                report(ProblemKind.VERSION_GAP, v, f"the first version of {name} in the ledger "
                       f"is {v.version}, not 1")
            if v.previous_hash:
                report(ProblemKind.RESOURCE_CHAIN_BROKEN, v, "previous_hash is set on the "
                       "resource's first version")
        else:
            if v.version != head[0] + 1:
                report(ProblemKind.VERSION_GAP, v, f"version {v.version} follows version "
                       f"{head[0]}: a version of {name} was dropped or moved")
            if v.previous_hash != head[1]:
                report(ProblemKind.RESOURCE_CHAIN_BROKEN, v, f"previous_hash "
                       f"{_hex8(v.previous_hash)} is not the hash {_hex8(head[1])} of {name} "
                       f"version {head[0]}")
            if v.deleted and head[2]:
                report(ProblemKind.BAD_TOMBSTONE, v, f"a tombstone follows the tombstone at "
                       f"version {head[0]}")
        if v.deleted:
            # Rows read from SQLite carry the stored integer, which a hand edit can make 2.
            flag: object = v.deleted
            if flag is not True and flag != 1:
                report(ProblemKind.BAD_TOMBSTONE, v, f"deleted is {flag!r}, not 0 or 1")
            if length or v.content_type:
                report(ProblemKind.BAD_TOMBSTONE, v, f"a tombstone holds content "
                       f"({length} bytes, media type {v.content_type!r})")
        if v.size != length:
            report(ProblemKind.SIZE_MISMATCH, v, f"size is {v.size}, the content holds "
                   f"{length} bytes")
        if v.update_time_us <= last_time:
            report(ProblemKind.TIME_ORDER, v, "update_time does not follow the previous "
                   "revision's")

    # --- slices ----------------------------------------------------------------------------

    def _slow_in_slice(self, v: Version) -> None:
        if self._ledger_known and not (type(v.revision) is int and v.revision > self._revision):
            # The summary's problems are merged with the parent's by revision. (A reader of a
            # file gives strictly increasing revisions: it orders them by the primary key.)
            self._gave_up = f"revision {v.revision} is out of order"
            return
        if self._ledger_known and isinstance(v.name, str) and v.name in self._heads:
            # Everything it links to lies in the slice: the single pass's checks.
            if not self._check(v):
                self._gave_up = f"revision {v.revision} is malformed"
            elif self._tainted:
                self._gave_up = f"revision {v.revision} holds a value of an unusual type"
            return
        # It links to rows before the slice: settle what its content decides here and leave the
        # links to the parent. It is good (not malformed) whatever came before, as long as the
        # state before it holds ordinary values (which absorb makes sure of) and it does too.
        if not (type(v.name) is str and type(v.version) is int and type(v.revision) is int
                and type(v.update_time_us) is int and type(v.hash) is bytes):
            self._gave_up = f"revision {v.revision} holds a value of an unusual type"
            return
        try:
            hash_differs = compute_hash(v) != v.hash
            length = len(v.content)
        except _UNREADABLE:
            self._gave_up = f"revision {v.revision} is malformed"
            return
        before = ((self._revision, self._hash, self._time, *self._last) if self._ledger_known
                  else None)
        self._pending.append((
            v.name, v.version, v.revision, v.content_type, v.update_time_us, v.deleted,
            v.previous_hash, v.ledger_previous_hash, v.size, hash_differs, length, before))
        self._ledger_known = True
        self._advance(v)

    def summary(self) -> SliceSummary:
        """Slice mode: what the parent's :meth:`absorb` needs of the slice fed."""
        last = ((self._revision, self._hash, self._time, *self._last) if self._ledger_known
                else None)
        return SliceSummary(self._gave_up, self.versions, self.problem_count,
                            tuple(self.problems), tuple(self._pending), last, self._heads,
                            self._slice_snapshot)

    def absorb(self, summary: SliceSummary) -> bool:
        """Take in the summary of the slice that follows what was fed, as if its rows had been
        fed: the same problems, in the same order, and the same state. False, changing nothing,
        when it cannot — the worker gave up on the slice, or the rows fed so far left a value
        of an unusual type in the state: then feed the slice's rows instead.

        A slice verifier (:meth:`resume`) absorbs the next slice too: the rows of it that link
        to rows of its own are judged, those that link to rows before it stay pending."""
        if summary.gave_up or self._gave_up or self._tainted:
            return False
        if self._in_slice and summary.pending and not (
                self._ledger_known and type(summary.pending[0][2]) is int
                and summary.pending[0][2] > self._revision):
            # The joined slice's problems are merged by revision with those the parent finds:
            # its revisions must go up all along (within a slice they do, or its worker gave up).
            return False
        digest = snapshot = None
        if summary.snapshot is not None and self._digest_at is not None and (
                self._slice_snapshot is None if self._in_slice else self._digest is None):
            revision, revision_hash, local = summary.snapshot
            heads = {name: (head[0], head[1]) for name, head in self._heads.items()}
            heads.update(local)
            if self._in_slice:
                snapshot = (revision, revision_hash, heads)
            else:
                digest = ledger_digest(revision, revision_hash,
                                       ((name, *heads[name]) for name in sorted(heads)))
        saved = (self._revision, self._hash, self._time, self._last)
        kept, count = self.problems, self.problem_count
        self.problems, self.problem_count = [], 0
        head_of, in_slice = self._heads.get, self._in_slice
        carried: list[Pending] = []
        try:
            for pending in summary.pending:
                (name, number, rev, content_type, update_time, deleted, previous,
                 ledger_previous, size, hash_differs, length, before) = pending
                if in_slice and name not in self._heads:
                    # It links to a row before this slice too: still pending, now with the
                    # ledger state before it known.
                    carried.append(pending if before is not None else (
                        *pending[:-1], (saved[0], saved[1], saved[2], *saved[3])))
                    continue
                if before is not None:
                    self._revision, self._hash, self._time, *last = before
                    self._last = (last[0], last[1])
                else:
                    self._revision, self._hash, self._time, self._last = saved
                # _judge's condition, without building a Version for the rows that pass it (the
                # summary of a slice holds one row per resource).
                try:
                    head = head_of(name)
                    fine = not (
                        hash_differs or rev != self._revision + 1
                        or ledger_previous != self._hash or size != length
                        or update_time <= self._time
                        or (number != 1 or previous if head is None
                            else number != head[0] + 1 or previous != head[1]
                            or (deleted and head[2]))
                        or (deleted and ((deleted is not True and deleted != 1) or length
                                         or content_type)))
                except Exception:  # _judge says what
                    fine = False
                if not fine and not self._judge(_stand_in(pending), hash_differs, length):
                    # Cannot happen after the checks above; if it did, one pass decides.
                    self._revision, self._hash, self._time, self._last = saved
                    return False
            found, found_count = self.problems, self.problem_count
        finally:
            self.problems, self.problem_count = kept, count
        # Rows are in revision order, and each row's problems all come from one side.
        merged = heapq.merge(summary.problems, found, key=lambda problem: problem.revision)
        self.problems.extend(itertools.islice(merged, max(0, self.max_problems
                                                          - len(self.problems))))
        self.problem_count += summary.problem_count + found_count
        if summary.last is not None:
            self._revision, self._hash, self._time, *last = summary.last
            self._last = (last[0], last[1])
        else:
            self._revision, self._hash, self._time, self._last = saved
        self._heads.update(summary.heads)
        self._pending += carried
        self.versions += summary.versions
        if digest is not None:
            self._digest = digest
        if snapshot is not None:
            self._slice_snapshot = snapshot
        return True

    # --- after the pass --------------------------------------------------------------------

    def _snapshot(self) -> Digest:
        heads = self._heads
        return ledger_digest(self._revision, self._hash,
                             ((name, heads[name][0], heads[name][1]) for name in sorted(heads)))

    def digest(self) -> Digest:
        """The digest at the last revision fed."""
        return self._snapshot()

    @property
    def target_digest(self) -> Digest | None:
        """The digest at `digest_at`, once the pass has reached that revision."""
        return self._digest

    def check_digest(self, expected: Digest) -> None:
        """After the pass: does the ledger fed still extend `expected`? (Built with
        ``digest_at=expected.revision``.)"""
        blank = Version("", 0, expected.revision, b"", "", 0, 0, "", "", False, b"", b"", b"", 0)
        if self._revision < expected.revision:
            self._report(ProblemKind.TRUNCATED, blank, f"the ledger ends at revision "
                         f"{self._revision}, before the digest's revision {expected.revision}: "
                         "its tail was cut off")
        elif self._digest != expected:
            self._report(ProblemKind.DIGEST_MISMATCH, blank, f"the ledger up to revision "
                         f"{expected.revision} is not the one digested as {expected}: its "
                         f"history was rewritten (now {self._digest})")

    def check_heads(self, stored: Iterable[tuple[str, int, bool]]) -> None:
        """After the pass: does the derived heads table (name, version, deleted, by name) agree
        with the versions? A head pointing elsewhere would make the service serve the wrong
        version as current."""
        expected = self.heads()
        pending = next(expected, None)
        for name, version, deleted in stored:
            while pending is not None and pending[0] < name:
                self._head_problem(pending[0], pending[1], "has no row in the heads table")
                pending = next(expected, None)
            if pending is None or pending[0] != name:
                self._head_problem(name, version, "has a heads row but no versions")
                continue
            if (version, deleted) != (pending[1], pending[2]):
                self._head_problem(name, version, f"the heads table says version {version} "
                                   f"(deleted={deleted}); the versions end at {pending[1]} "
                                   f"(deleted={pending[2]})")
            pending = next(expected, None)
        while pending is not None:
            self._head_problem(pending[0], pending[1], "has no row in the heads table")
            pending = next(expected, None)

    def _head_problem(self, name: str, version: int, detail: str) -> None:
        blank = Version(name, version, 0, b"", "", 0, 0, "", "", False, b"", b"", b"", 0)
        self._report(ProblemKind.HEAD_MISMATCH, blank, detail)

    def heads(self) -> Iterator[tuple[str, int, bool]]:
        """Every resource's last (name, version, deleted) so far, sorted by name."""
        heads = self._heads
        for name in sorted(heads):
            version, _, deleted = heads[name]
            yield name, version, deleted
