"""Access control: bearer tokens with scopes and name-prefix limits, kept as hashes in a file.

A token is a random string, ``cl_`` and 43 base64url characters (256 bits from :mod:`secrets`),
shown once by ``casledger token create`` and never stored: the tokens file (TOML) keeps only its
SHA-256, with what the token may do::

    [[tokens]]
    principal = "alice"                 # recorded as the actor of every version it writes
    scopes = ["read", "write"]          # read, write, admin (admin implies read and write)
    prefixes = ["documents"]            # optional: whole-segment name prefixes; none = all
    hash = "sha256:9f86d081884c7d65..."  # SHA-256 of the token, hex
    created = "2025-01-01T00:00:00Z"    # optional, for people

**Why a plain SHA-256, unsalted and unpeppered.** A salt or a slow hash (bcrypt, argon2) makes
guessing a *low-entropy* secret from a leaked hash expensive; these tokens carry 256 random bits,
so there is nothing to guess: no table or brute force reaches 2^256, and a fast hash costs the
service a microsecond per call (GitHub and Stripe keep their API tokens the same way). A pepper
would only protect a leaked file whose pepper did not leak with it, at the price of a second
secret to manage; an unsalted hash also lets an operator find a token's entry with
``printf %s "$TOKEN" | sha256sum``. The ``sha256:`` prefix leaves room for another scheme later.
The presented token's hash is compared with *every* stored hash by :func:`hmac.compare_digest`,
without stopping at a match, so the time taken says nothing about the stored hashes.

Everything here is pure except :class:`TokenFile` (reads the file, and reads it again when it
changes, so a new or revoked token takes effect without a restart) and :func:`create_token`
(appends to it). The gRPC servicer calls :meth:`TokenFile.authenticate` and :func:`authorize`.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import re
import secrets
import stat
import time
import tomllib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from . import errors, model

log = logging.getLogger("casledger.auth")

TOKEN_PREFIX = "cl_"
HASH_SCHEME = "sha256:"
# Longer presented tokens are refused without hashing them.
MAX_TOKEN_LENGTH = 512
METADATA_KEY = "authorization"
_PRINCIPAL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@:+-]{0,127}")
_HASH = re.compile(r"sha256:[0-9a-f]{64}")
_ENTRY_KEYS = frozenset(("principal", "scopes", "prefixes", "hash", "created"))
FILE_HEADER = """\
# casledger access tokens (casledger token create appends here).
# Only SHA-256 hashes of the tokens are stored; a token is shown once, when it is created.
# Remove an entry to revoke its token: a running service reads this file again when it changes.
"""


class Scope(enum.StrEnum):
    READ = "read"
    WRITE = "write"
    ADMIN = "admin"


class TokenFileError(ValueError):
    """The tokens file cannot be used; the message names the file and the entry."""


@dataclass(frozen=True, slots=True)
class Grant:
    """What a valid token allows: who it is, its scopes, and the names it may touch."""

    principal: str
    scopes: frozenset[Scope]
    prefixes: tuple[str, ...] = ()

    def allows(self, scope: Scope) -> bool:
        return scope in self.scopes or Scope.ADMIN in self.scopes

    def covers(self, path: str) -> bool:
        """Whether `path` (a name, a collection or a watch prefix; "" = the whole ledger) lies
        within the prefixes, by whole segments: `documents` covers `documents/1`, not
        `documentsX/1`, and no prefix covers the whole ledger."""
        if not self.prefixes:
            return True
        return bool(path) and any(path == p or path.startswith(p + "/") for p in self.prefixes)

    def describe(self) -> str:
        scopes = ", ".join(sorted(self.scopes))
        where = ", ".join(self.prefixes) if self.prefixes else "the whole ledger"
        return f"{self.principal} ({scopes}; {where})"


# --- tokens and their hashes ---------------------------------------------------------------


def new_token() -> str:
    """A fresh random token: 256 bits, URL- and header-safe."""
    return TOKEN_PREFIX + base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode()


def hash_token(token: str) -> str:
    """What the tokens file stores for `token`: ``sha256:`` and its hex digest."""
    return HASH_SCHEME + hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()


@dataclass(frozen=True, slots=True)
class TokenTable:
    """The parsed tokens file: each stored digest with its grant."""

    entries: tuple[tuple[bytes, Grant], ...] = ()

    def lookup(self, token: str) -> Grant | None:
        """The grant of `token`, or None. Compares against every entry, in constant time each,
        and does not stop at a match."""
        if len(token) > MAX_TOKEN_LENGTH:
            return None
        digest = hashlib.sha256(token.encode("utf-8", "replace")).digest()
        found: Grant | None = None
        for stored, grant in self.entries:
            if hmac.compare_digest(stored, digest):
                found = grant
        return found

    def __len__(self) -> int:
        return len(self.entries)


# --- the file ------------------------------------------------------------------------------


def validate_principal(principal: str) -> str:
    if not _PRINCIPAL.fullmatch(principal):
        raise ValueError(f"principal {principal!r} must be 1-128 characters of A-Z a-z 0-9 "
                         "._@:+- starting with a letter or digit")
    if principal == model.ANONYMOUS:
        raise ValueError(f"principal {model.ANONYMOUS!r} is reserved for calls without access "
                         "control")
    return principal


def validate_scopes(scopes: Iterable[str]) -> frozenset[Scope]:
    found = set()
    for scope in scopes:
        try:
            found.add(Scope(scope))
        except ValueError:
            raise ValueError(f"unknown scope {scope!r}: use read, write or admin") from None
    if not found:
        raise ValueError("a token needs at least one scope (read, write or admin)")
    return frozenset(found)


def validate_prefixes(prefixes: Iterable[str]) -> tuple[str, ...]:
    checked = []
    for prefix in prefixes:
        if not prefix:
            raise ValueError("a prefix must not be empty (leave prefixes out for the whole "
                             "ledger)")
        try:
            model.validate_prefix(prefix)
        except errors.InvalidArgument as exc:
            raise ValueError(f"prefix {prefix!r}: {exc.message}") from None
        checked.append(prefix)
    return tuple(dict.fromkeys(checked))


def _entry(raw: Any) -> tuple[bytes, Grant]:
    if not isinstance(raw, dict):
        raise ValueError("must be a table")
    unknown = set(raw) - _ENTRY_KEYS
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(sorted(unknown))}; the keys are "
                         f"{', '.join(sorted(_ENTRY_KEYS))}")
    principal, scopes, prefixes, digest = (raw.get("principal"), raw.get("scopes"),
                                           raw.get("prefixes", []), raw.get("hash"))
    if not isinstance(principal, str):
        raise ValueError("principal must be a string")
    if not isinstance(scopes, list) or not all(isinstance(s, str) for s in scopes):
        raise ValueError("scopes must be a list of strings")
    if not isinstance(prefixes, list) or not all(isinstance(p, str) for p in prefixes):
        raise ValueError("prefixes must be a list of strings")
    if not isinstance(digest, str) or not _HASH.fullmatch(digest):
        raise ValueError("hash must be 'sha256:' and 64 lowercase hex digits (the file stores "
                         "hashes, never tokens)")
    grant = Grant(validate_principal(principal), validate_scopes(scopes),
                  validate_prefixes(prefixes))
    return bytes.fromhex(digest.removeprefix(HASH_SCHEME)), grant


def parse_tokens(text: str, source: str = "the tokens file") -> TokenTable:
    """Parse a tokens file; any problem is a TokenFileError naming the entry."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise TokenFileError(f"{source} is not valid TOML: {exc}") from None
    unknown = set(document) - {"tokens"}
    if unknown:
        raise TokenFileError(f"{source}: unknown key(s) {', '.join(sorted(unknown))}; tokens "
                             "are [[tokens]] tables")
    raw_entries = document.get("tokens", [])
    if not isinstance(raw_entries, list):
        raise TokenFileError(f"{source}: tokens must be an array of tables ([[tokens]])")
    entries: list[tuple[bytes, Grant]] = []
    seen: dict[bytes, int] = {}
    for number, raw in enumerate(raw_entries, 1):
        try:
            digest, grant = _entry(raw)
        except ValueError as exc:
            raise TokenFileError(f"{source}: token {number}: {exc}") from None
        if digest in seen:
            raise TokenFileError(f"{source}: tokens {seen[digest]} and {number} have the same "
                                 "hash")
        seen[digest] = number
        entries.append((digest, grant))
    return TokenTable(tuple(entries))


Stamp = tuple[int, int, int, int]


def read_tokens(path: Path) -> tuple[TokenTable, Stamp]:
    """Read and parse the tokens file, refusing one that anybody may write to."""
    try:
        with path.open("rb") as file:
            info = os.fstat(file.fileno())
            data = file.read()
    except OSError as exc:
        raise TokenFileError(f"cannot read the tokens file {path}: {exc.strerror}") from None
    if info.st_mode & stat.S_IWOTH:
        raise TokenFileError(f"the tokens file {path} is writable by anybody (mode "
                             f"{stat.S_IMODE(info.st_mode):o}): whoever can write it can add a "
                             f"token; chmod o-w {path}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise TokenFileError(f"the tokens file {path} is not UTF-8") from None
    return parse_tokens(text, str(path)), _stamp(info)


def _stamp(info: os.stat_result) -> Stamp:
    return (info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)


class TokenFile:
    """The tokens file of a running service. Read when created (errors are fatal then); read
    again when it changes, checked at most every `recheck_s` seconds: a new version that does
    not parse is logged and the previous tokens stay in force."""

    def __init__(self, path: str | os.PathLike[str], *, recheck_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.path = Path(path)
        self._recheck_s = recheck_s
        self._clock = clock
        self._table, self._stamp = read_tokens(self.path)
        self._seen: Stamp | None = self._stamp
        self._checked = clock()
        if not self._table:
            log.warning("the tokens file %s holds no tokens: every call will be refused",
                        self.path)

    def table(self) -> TokenTable:
        now = self._clock()
        if now - self._checked >= self._recheck_s:
            self._checked = now
            self._refresh()
        return self._table

    def _refresh(self) -> None:
        try:
            stamp: Stamp | None = _stamp(self.path.stat())
        except OSError:
            stamp = None
        if stamp == self._seen:
            return
        self._seen = stamp  # whatever happens next, say it once per change
        try:
            table, self._stamp = read_tokens(self.path)
        except TokenFileError as exc:
            log.error("%s; the previous %d token(s) stay in force", exc, len(self._table))
            return
        self._table = table
        log.info("read the tokens file %s again: %d token(s)", self.path, len(table))

    def authenticate(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> Grant:
        """The grant of the bearer token in the call's metadata; Unauthenticated otherwise."""
        grant = self.table().lookup(bearer_token(metadata))
        if grant is None:
            raise errors.Unauthenticated("the bearer token is not valid (unknown or revoked)")
        return grant


def create_token(path: str | os.PathLike[str], *, principal: str, scopes: Sequence[str],
                 prefixes: Sequence[str] = (), now: datetime | None = None) -> str:
    """Make a new token, append its hash and grant to the tokens file (created with mode 0600
    if absent) and return the token: the only time it is ever seen."""
    file = Path(path)
    grant = Grant(validate_principal(principal), validate_scopes(scopes),
                  validate_prefixes(prefixes))
    if file.exists():
        read_tokens(file)  # never append to a file that does not parse
    token = new_token()
    created = (now or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")
    entry = "\n".join((
        "", "[[tokens]]",
        f"principal = {json.dumps(grant.principal)}",
        f"scopes = {json.dumps(sorted(grant.scopes))}",
        *([f"prefixes = {json.dumps(list(grant.prefixes))}"] if grant.prefixes else []),
        f"hash = {json.dumps(hash_token(token))}",
        f"created = {json.dumps(created)}", "",
    ))
    try:
        fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        entry = FILE_HEADER + entry
    except FileExistsError:
        fd = os.open(file, os.O_WRONLY | os.O_APPEND)
    with os.fdopen(fd, "a", encoding="utf-8") as out:
        out.write(entry)
    read_tokens(file)  # what was written parses, with the new token in it
    return token


@dataclass(frozen=True, slots=True)
class TokenInfo:
    """What ``casledger token list`` shows of an entry: never more than its hash."""

    digest: str  # the stored SHA-256, hex
    grant: Grant
    created: str  # "" when the entry has none

    @property
    def id(self) -> str:
        """How the token is named to people: the start of its hash."""
        return self.digest[:ID_LENGTH]


# How much of a hash `token list` shows and `token revoke` takes at least.
ID_LENGTH = 12
MIN_ID_LENGTH = 8


def list_tokens(path: str | os.PathLike[str]) -> list[TokenInfo]:
    """The entries of a tokens file, in file order (the file is checked as the service checks
    it first: a file the service would refuse is refused here too)."""
    file = Path(path)
    table, _ = read_tokens(file)
    raw = tomllib.loads(file.read_text(encoding="utf-8")).get("tokens", [])
    return [TokenInfo(digest.hex(), grant, str(entry.get("created", "")))
            for (digest, grant), entry in zip(table.entries, raw, strict=True)]


def revoke_token(path: str | os.PathLike[str], token_id: str) -> TokenInfo:
    """Remove from the tokens file the one entry whose hash starts with `token_id` (at least
    MIN_ID_LENGTH hex digits; ``sha256:`` may lead) and return it. The file is replaced whole
    (same mode, by rename), so a running service reads either the old file or the new one,
    never half of it; it stops accepting the token when it next reads the file (within a
    second). Only entries written as ``[[tokens]]`` tables can be removed this way."""
    file = Path(path)
    wanted = token_id.strip().lower().removeprefix(HASH_SCHEME)
    if len(wanted) < MIN_ID_LENGTH or not re.fullmatch(r"[0-9a-f]+", wanted):
        raise ValueError(f"a token id is at least {MIN_ID_LENGTH} hex digits of its hash (as "
                         f"`casledger token list` shows), not {token_id!r}")
    tokens = list_tokens(file)
    found = [info for info in tokens if info.digest.startswith(wanted)]
    if not found:
        raise ValueError(f"no token in {file} has a hash starting with {wanted}")
    if len(found) > 1:
        raise ValueError(f"{len(found)} tokens in {file} have a hash starting with {wanted}: "
                         "give more of it")
    [info] = found
    text = file.read_text(encoding="utf-8")
    kept = [block for block in _blocks(text)
            if not _block_hash(block).removeprefix(HASH_SCHEME).startswith(wanted)]
    new_text = "".join(kept)
    remaining = parse_tokens(new_text, str(file))
    if len(remaining) != len(tokens) - 1 or any(
            digest.hex() == info.digest for digest, _ in remaining.entries):
        raise ValueError(f"the entry of token {info.id} in {file} is not a [[tokens]] table of "
                         "its own: remove it by hand")
    mode = stat.S_IMODE(file.stat().st_mode)
    temporary = file.with_name(f".{file.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(new_text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, file)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return info


def _blocks(text: str) -> list[str]:
    """The file cut before each ``[[tokens]]`` line: the header, then one block per table."""
    blocks = [""]
    for line in text.splitlines(keepends=True):
        if line.strip() == "[[tokens]]":
            blocks.append("")
        blocks[-1] += line
    return blocks


def _block_hash(block: str) -> str:
    """The hash of the one [[tokens]] table `block` holds ("" for the header)."""
    if block.lstrip().startswith("[[tokens]]"):
        tokens = tomllib.loads(block).get("tokens", [])
        if len(tokens) == 1 and isinstance(tokens[0].get("hash"), str):
            return str(tokens[0]["hash"])
    return ""


# --- calls ---------------------------------------------------------------------------------


def bearer_token(metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
    """The token of the one ``authorization: Bearer <token>`` entry of a call's metadata."""
    values = [value for key, value in metadata or () if key.lower() == METADATA_KEY]
    if not values:
        raise errors.Unauthenticated(
            "this service requires a bearer token: send the metadata 'authorization: Bearer "
            "<token>' (HTTP: the Authorization header)")
    if len(values) > 1:
        raise errors.Unauthenticated("send one authorization, not several")
    value = values[0]
    scheme, _, token = (value if isinstance(value, str) else "").strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise errors.Unauthenticated("the authorization is not a bearer token: send "
                                     "'Bearer <token>'")
    return token


def _create_path(request: Any) -> str:
    # A server-generated id is not known yet: the parent collection must lie within a prefix.
    return f"{request.parent}/{request.resource_id}" if request.resource_id else request.parent


# What each Ledger method needs: a scope, and the paths of its request (names, parents, the
# watch prefix) that must lie within the token's prefixes. A test checks every method is here.
METHOD_ACCESS: dict[str, tuple[Scope, Callable[[Any], str]]] = {
    "GetResource": (Scope.READ, lambda request: request.name),
    "ListResources": (Scope.READ, lambda request: request.parent),
    "ListVersions": (Scope.READ, lambda request: request.name),
    "Watch": (Scope.READ, lambda request: request.prefix),
    # The revision counts every write of the ledger: as much as a Watch of the whole ledger says.
    "GetRevision": (Scope.READ, lambda request: ""),
    "CreateResource": (Scope.WRITE, _create_path),
    "UpdateResource": (Scope.WRITE, lambda request: request.name),
    "DeleteResource": (Scope.WRITE, lambda request: request.name),
}


# Methods that need only a valid token: each operation they carry is authorized under its own
# method's rule above (Batch; BatchStream, whose every batch is authenticated as it comes).
PER_OPERATION = frozenset({"Batch", "BatchStream"})


def authorize(grant: Grant, method: str, request: Any | None) -> None:
    """Raise PermissionDenied unless `grant` may call `method` with `request` (None: the
    request did not parse, so only the scope is checked)."""
    rule = METHOD_ACCESS.get(method)
    if rule is None:  # fail closed: a method nobody wrote a rule for is nobody's
        raise errors.PermissionDenied(f"{method} has no access rule", principal=grant.principal)
    scope, path_of = rule
    if not grant.allows(scope):
        raise errors.PermissionDenied(
            f"{grant.principal} may not call {method}: its token lacks the {scope} scope",
            principal=grant.principal, scope=str(scope))
    if request is None:
        return
    path = path_of(request)
    if not grant.covers(path):
        what = repr(path) if path else "the whole ledger (an empty prefix)"
        raise errors.PermissionDenied(
            f"{grant.principal} may not access {what}: its token is limited to "
            f"{', '.join(grant.prefixes)}", principal=grant.principal, name=path)


# --- who may serve without tokens ----------------------------------------------------------


def is_loopback(listen: str) -> bool:
    """Whether HOST:PORT binds a loopback address only (127.0.0.0/8, ::1, localhost)."""
    host = listen.rpartition(":")[0].strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a wildcard, another name: it may be reachable from elsewhere


def exposure_problem(*, listens: Iterable[tuple[str, str]], tokens: bool,
                     insecure: bool) -> str | None:
    """Why serving would expose an open ledger beyond this machine, or None. `listens` are
    (flag, HOST:PORT) pairs."""
    if tokens or insecure:
        return None
    exposed = [f"{flag} {listen}" for flag, listen in listens if not is_loopback(listen)]
    if not exposed:
        return None
    return (f"refusing to serve without access control on a non-loopback address "
            f"({'; '.join(exposed)}): give --auth-tokens-file FILE (create tokens with "
            "`casledger token create`), listen on 127.0.0.1, or pass --insecure to serve an "
            "open ledger anyway")
