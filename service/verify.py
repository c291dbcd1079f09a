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

Digest. ``R:hex``, where hex is the SHA-256 over the digest format tag, R, the hash of revision R
and every resource's head as of R (name, version, hash; sorted by name), each length-prefixed.
The hash of revision R already commits to the whole ledger up to R through the ledger chain, so a
store that still *extends* a digest printed earlier cannot have rewritten anything up to R — not
even one resource's whole history with every hash recomputed, which the chains alone would not
reveal. The heads make the digest say what the ledger held at R.
"""

from __future__ import annotations

import hashlib
import re
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from enum import Enum

from .model import Version, compute_hash

DIGEST_FORMAT = b"casledger-digest/v1"
_DIGEST = re.compile(r"(0|[1-9][0-9]{0,18}):([0-9a-f]{64})")
_NEVER = sys.maxsize


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
    for part in (DIGEST_FORMAT, str(revision).encode(), revision_hash):
        h.update(len(part).to_bytes(4, "big") + part)
    for name, version, digest in heads:
        for part in (name.encode(), str(version).encode(), digest):
            h.update(len(part).to_bytes(4, "big") + part)
    return Digest(revision, h.digest())


def _hex8(value: bytes) -> str:
    return value[:8].hex() if value else "(none)"


class Verifier:
    """Checks a ledger fed in revision order, in one pass; see the module docstring.

    ``digest_at``: also compute the digest at that revision (else at the last one fed).
    Problems are counted; the first ``max_problems`` are kept (memory stays bounded)."""

    def __init__(self, *, digest_at: int | None = None, max_problems: int = 1000) -> None:
        self.versions = 0
        self.problem_count = 0
        self.problems: list[Problem] = []
        self.max_problems = max_problems
        self._heads: dict[str, tuple[int, bytes, bool]] = {}
        self._revision = 0
        self._hash = b""
        self._time = -1
        self._last = ("", 0)
        self._digest_at = digest_at
        self._digest: Digest | None = None

    @property
    def revision(self) -> int:
        """The last revision fed (0 before any)."""
        return self._revision

    @property
    def resources(self) -> int:
        return len(self._heads)

    @property
    def ok(self) -> bool:
        return self.problem_count == 0

    def _report(self, kind: ProblemKind, v: Version, detail: str) -> None:
        self.problem_count += 1
        if len(self.problems) < self.max_problems:
            self.problems.append(Problem(kind, str(v.name), v.version, v.revision, detail))

    def feed(self, batch: Iterable[Version]) -> None:
        """Check the next versions (revision order); their problems are recorded."""
        # The hot loop of `casledger verify`: state lives in locals while a batch runs, and the
        # only call per version is compute_hash (problems are rare and may be slow).
        heads = self._heads
        revision, last_hash, last_time = self._revision, self._hash, self._time
        last_name, last_number = self._last
        snapshot_at = _NEVER if self._digest_at is None or self._digest is not None \
            else self._digest_at
        count = 0
        for v in batch:
            try:
                stored = v.hash
                name = v.name
                number = v.version
                # Rows read from SQLite carry the stored integer, which a hand edit can make 2.
                deleted: object = v.deleted
                head = heads.get(name)
                if (compute_hash(v) != stored or v.revision != revision + 1
                        or v.ledger_previous_hash != last_hash or v.size != len(v.content)
                        or v.update_time_us <= last_time
                        or (number != 1 or v.previous_hash if head is None
                            else number != head[0] + 1 or v.previous_hash != head[1]
                            or (deleted and head[2]))
                        or (deleted and ((deleted is not True and deleted != 1) or v.content
                                         or v.content_type))):
                    self._diagnose(v, head, revision, last_hash, last_time,
                                   f"{last_name} version {last_number}" if last_name
                                   else "the start of the ledger")
                heads[name] = (number, stored, bool(deleted))
            except (TypeError, ValueError, AttributeError, OverflowError) as exc:
                # A row whose columns hold values of the wrong type: only a hand edit does that.
                self._report(ProblemKind.MALFORMED, v, f"unreadable column value: {exc}")
                if isinstance(v.revision, int):
                    revision = v.revision
                continue
            revision, last_hash, last_time = v.revision, stored, v.update_time_us
            last_name, last_number = name, number
            count += 1
            if revision >= snapshot_at:
                self._revision, self._hash = revision, last_hash
                self._digest = self._snapshot()
                snapshot_at = _NEVER
        self.versions += count
        self._revision, self._hash, self._time = revision, last_hash, last_time
        self._last = (last_name, last_number)

    def _diagnose(self, v: Version, head: tuple[int, bytes, bool] | None, revision: int,
                  last_hash: bytes, last_time: int, before: str) -> None:
        """Say what is wrong with `v`, given the state before it (something is)."""
        report = self._report
        if compute_hash(v) != v.hash:
            report(ProblemKind.HASH_MISMATCH, v, "the stored hash is not the hash of the stored "
                   "fields: its content or metadata was edited")
        if v.revision != revision + 1:
            report(ProblemKind.REVISION_GAP, v, f"revision {v.revision} follows revision "
                   f"{revision}: a version was dropped, inserted or moved")
        if v.ledger_previous_hash != last_hash:
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
            if v.content or v.content_type:
                report(ProblemKind.BAD_TOMBSTONE, v, f"a tombstone holds content "
                       f"({len(v.content)} bytes, media type {v.content_type!r})")
        if v.size != len(v.content):
            report(ProblemKind.SIZE_MISMATCH, v, f"size is {v.size}, the content holds "
                   f"{len(v.content)} bytes")
        if v.update_time_us <= last_time:
            report(ProblemKind.TIME_ORDER, v, "update_time does not follow the previous "
                   "revision's")

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
