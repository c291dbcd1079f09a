"""The inspection commands of `casledger`: what auditors and operators run against a ledger.

This module knows where the ledger is (online or offline), runs a command (turning every failure
into a message and an exit code) and holds the commands that read resources and the log: get,
history, diff, log, tail. The ledger-wide ones (verify, digest, export, import, stats) are in
:mod:`casledger.service.audit`; ``cli.py`` declares them all.

Online commands talk gRPC to a running service (``--target``, ``CASLEDGER_TARGET``, default
``127.0.0.1:50051``); offline commands read a SQLite ledger file directly and read-only (``--db``,
``CASLEDGER_DB``), so a copy of the file is all an auditor needs. ``--db`` picks offline, an
explicit ``--target`` online; with neither, offline if ``CASLEDGER_DB`` is set, else online.

=========  ======  =======  ===============================================================
command    online  offline  notes
=========  ======  =======  ===============================================================
get        yes     yes      ``--version N``; ``--raw`` writes the stored bytes alone
history    yes     yes      every version, tombstones included
diff       yes     yes      structural for JSON (a JSON Patch with ``--json``), else unified
log        yes     yes      revision order; online: Watch replay up to the revision at start
tail       yes     no       follows; resumes after lost connections without a gap
verify     yes     yes      both chains, one streaming pass; offline also the heads table
digest     yes     yes      ``R:hex`` at ``--revision R`` (default: the latest)
export     yes     yes      JSON Lines (see :mod:`casledger.service.transfer`)
import     no      yes      into an empty file, verified as it loads, all or nothing
stats      no      yes      counts, bytes and the recent write rate
=========  ======  =======  ===============================================================

Exit codes: 0 ok, 1 verification failed, 2 usage error, 3 not found or service unavailable;
130 when interrupted (Ctrl-C), except for `tail`, whose normal end that is (0, as on SIGTERM).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import threading
from collections.abc import Awaitable, Callable, Iterable, Iterator
from contextlib import aclosing, contextmanager
from typing import Any, TypeVar

import grpc
from rich.json import JSON
from rich.text import Text

from . import content as content_rules
from . import errors, model
from .client import DEFAULT_TARGET, LedgerCallError, LedgerClient, call_metadata, connect
from .follow import follow, from_resource, replay
from .jsondiff import diff_json, diff_text
from .model import Version
from .report import Output, format_time, version_view
from .storage import LedgerReader, is_postgres
from .storage import open_reader as open_ledger_reader
from .storage.sqlite import sqlite_path
from .storage.sqlite_offline import (
    LedgerFileError,
    StoreBusy,
    StoreNotEmpty,
)

EXIT_OK, EXIT_VERIFY_FAILED, EXIT_USAGE, EXIT_UNAVAILABLE = 0, 1, 2, 3
# Interrupted (Ctrl-C) before it finished: the shell's convention, 128 + SIGINT.
EXIT_INTERRUPTED = 130
TARGET_ENV, DB_ENV = "CASLEDGER_TARGET", "CASLEDGER_DB"
TOKEN_ENV, TLS_CA_ENV = "CASLEDGER_TOKEN", "CASLEDGER_TLS_CA"
ONLINE, OFFLINE = "online", "offline"
# (online, offline) per command.
MODES: dict[str, tuple[bool, bool]] = {
    "get": (True, True), "history": (True, True), "diff": (True, True), "log": (True, True),
    "tail": (True, False), "verify": (True, True), "digest": (True, True),
    "export": (True, True), "import": (False, True), "stats": (False, True),
}
T = TypeVar("T")


class CommandFailed(Exception):
    """A command cannot do what was asked; `code` is its exit status."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


# --- where the ledger is -------------------------------------------------------------------


def mode_of(args: argparse.Namespace) -> str:
    online, offline = MODES[args.command]
    if getattr(args, "db", None):
        return OFFLINE
    if getattr(args, "target", None):
        return ONLINE
    if offline and (os.environ.get(DB_ENV) or not online):
        return OFFLINE
    return ONLINE


def db_path(args: argparse.Namespace) -> str:
    """The ledger of an offline command: the path of ``sqlite:///path`` (or a plain path), or
    a ``postgresql://`` URL as given."""
    url = getattr(args, "db", None) or os.environ.get(DB_ENV, "")
    if not url:
        raise CommandFailed(f"{args.command} reads a ledger file: give --db sqlite:///path "
                            f"(or set {DB_ENV})", EXIT_USAGE)
    if is_postgres(url):
        return url
    if url.startswith("sqlite:"):
        try:
            return sqlite_path(url)
        except ValueError as exc:
            raise CommandFailed(str(exc), EXIT_USAGE) from None
    if "://" in url:
        raise CommandFailed(f"offline commands read SQLite ledger files (sqlite:///path or a "
                            f"path) or PostgreSQL databases (postgresql://...), not "
                            f"{url.split('://', 1)[0]}", EXIT_USAGE)
    return url


@contextmanager
def open_reader(args: argparse.Namespace) -> Iterator[LedgerReader]:
    with open_ledger_reader(db_path(args)) as reader:
        yield reader


def target_of(args: argparse.Namespace) -> str:
    return getattr(args, "target", None) or os.environ.get(TARGET_ENV) or DEFAULT_TARGET


def tls_ca_of(args: argparse.Namespace) -> bytes | None:
    """The PEM root certificates of --tls-ca / CASLEDGER_TLS_CA, or None (plaintext)."""
    path = getattr(args, "tls_ca", None) or os.environ.get(TLS_CA_ENV)
    if not path:
        return None
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError as exc:
        raise CommandFailed(f"cannot read --tls-ca {path}: {exc.strerror}", EXIT_USAGE) from None


def token_metadata(args: argparse.Namespace) -> tuple[tuple[str, str], ...]:
    """The authorization metadata of --token / CASLEDGER_TOKEN, if any."""
    token = getattr(args, "token", None) or os.environ.get(TOKEN_ENV)
    return (("authorization", f"Bearer {token.strip()}"),) if token else ()


def call_online(args: argparse.Namespace, call: Callable[[LedgerClient], Awaitable[T]]) -> T:
    async def run() -> T:
        call_metadata.set((*call_metadata.get(), *token_metadata(args)))  # this task's calls
        async with connect(target_of(args), tls_ca=tls_ca_of(args)) as client:
            return await call(client)

    return asyncio.run(run())


def _get(args: argparse.Namespace, name: str, version: int) -> Version:
    if mode_of(args) == OFFLINE:
        with open_reader(args) as reader:
            return reader.get(name, version)
    return from_resource(call_online(args, lambda client: client.get(name, version)))


# --- get, history, diff --------------------------------------------------------------------


def cmd_get(args: argparse.Namespace, out: Output) -> int:
    v = _get(args, model.validate_name(args.name), args.version)
    if args.raw:
        sys.stdout.flush()
        sys.stdout.buffer.write(v.content)
        sys.stdout.buffer.flush()
    elif out.json_mode:
        out.json(version_view(v, content=True))
    else:
        view = version_view(v)
        out.fields((key, view[key]) for key in (
            "name", "version", "revision", "etag", "content_type", "size", "create_time",
            "update_time", "actor", "reason", "deleted", "hash"))
        _show_content(out, v)
    return EXIT_OK


def _show_content(out: Output, v: Version) -> None:
    if v.deleted:
        out.out.print(Text("(a tombstone: no content)", style="dim"))
        return
    try:
        text = v.content.decode()
    except UnicodeDecodeError:
        out.out.print(Text(f"({v.size} bytes of binary content: use --raw)", style="dim"))
        return
    if out.terminal and content_rules.is_json_media_type(v.content_type):
        out.out.print(JSON(text))
    else:
        out.out.print(Text(text), soft_wrap=True)


def cmd_history(args: argparse.Namespace, out: Output) -> int:
    name = model.validate_name(args.name)
    if mode_of(args) == OFFLINE:
        with open_reader(args) as reader:
            versions = list(reader.history(name))
    else:
        async def fetch(client: LedgerClient) -> list[Version]:
            return [from_resource(r) async for r in client.history(name)]

        versions = call_online(args, fetch)
    if out.json_mode:
        for v in versions:
            out.json(version_view(v))
        return EXIT_OK
    out.table(("version", "revision", "time", "actor", "reason", "size", "etag", "deleted"), (
        (str(v.version), str(v.revision), format_time(v.update_time_us), v.actor, v.reason,
         str(v.size), v.etag, Text("deleted", style="red") if v.deleted else "")
        for v in versions), title=name)
    return EXIT_OK


def cmd_diff(args: argparse.Namespace, out: Output) -> int:
    name = model.validate_name(args.name)
    a, b = _get(args, name, args.a), _get(args, name, args.b)
    result: dict[str, Any] = {"name": name, "from": a.version, "to": b.version}
    documents = [_json_document(v) for v in (a, b)]
    lines: list[str] | None = None
    if documents[0] is not None and documents[1] is not None:
        changes = diff_json(documents[0][0], documents[1][0])
        result |= {"format": "json", "changes": [change.as_patch() for change in changes]}
    else:
        lines = diff_text(a.content, b.content, f"{name}@{a.version}", f"{name}@{b.version}")
        if lines is None:
            result |= {"format": "binary", "identical": a.content == b.content,
                       "from_size": a.size, "to_size": b.size}
        else:
            result |= {"format": "text", "lines": lines}
    if out.json_mode:
        out.json(result)
    else:
        _show_diff(out, result)
    return EXIT_OK


def _json_document(v: Version) -> tuple[content_rules.JSONValue] | None:
    if v.deleted or not content_rules.is_json_media_type(v.content_type):
        return None
    try:
        return (content_rules.parse_json(v.content, field="content"),)
    except errors.InvalidContent:
        return None


def _show_diff(out: Output, result: dict[str, Any]) -> None:
    out.out.print(Text(f"{result['name']}: version {result['from']} -> {result['to']}",
                       style="bold"))
    if result["format"] == "binary":
        same = "identical" if result["identical"] else "different"
        out.out.print(f"binary contents, {same} ({result['from_size']} -> {result['to_size']} "
                      "bytes)")
        return
    if result["format"] == "text":
        styles = {"+": "green", "-": "red", "@": "cyan"}
        for line in result["lines"]:
            out.out.print(Text(line, style=styles.get(line[:1], "")), soft_wrap=True)
        if not result["lines"]:
            out.out.print("no changes")
        return
    for change in result["changes"]:
        old, new = change.get("old"), change.get("value")
        if change["op"] == "add":
            line = Text(f"+ {change['path']}: {_short(new)}", style="green")
        elif change["op"] == "remove":
            line = Text(f"- {change['path']}: {_short(old)}", style="red")
        else:
            line = Text(f"~ {change['path']}: {_short(old)} -> {_short(new)}", style="yellow")
        out.out.print(line, soft_wrap=True)
    if not result["changes"]:
        out.out.print("no changes")


def _short(value: object, limit: int = 120) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[:limit - 3] + "..."


# --- log, tail -----------------------------------------------------------------------------


def cmd_log(args: argparse.Namespace, out: Output) -> int:
    prefix = model.validate_prefix(args.prefix)
    shown = 0

    def show(batch: Iterable[Version]) -> bool:
        nonlocal shown
        for v in batch:
            out.version_line(v)
            shown += 1
            if shown == args.limit:
                return False
        return True

    if mode_of(args) == OFFLINE:
        with open_reader(args) as reader:
            for batch in reader.versions(after=args.since - 1, prefix=prefix):
                if not show(batch):
                    break
    else:
        async def run(client: LedgerClient) -> None:
            async with aclosing(replay(client, args.since, prefix)) as batches:
                async for batch in batches:
                    if not show(batch):
                        return

        call_online(args, run)
    if not shown and not out.json_mode:
        out.message("no versions")
    return EXIT_OK


def cmd_tail(args: argparse.Namespace, out: Output) -> int:
    prefix = model.validate_prefix(args.prefix)

    def retrying(why: str, delay: float, revision: int) -> None:
        where = f"revision {revision}" if revision else "now"
        out.message(f"casledger: {why}; resuming from {where} in {delay:.1f} s", "yellow")

    async def run() -> None:
        if threading.current_thread() is threading.main_thread():
            # SIGTERM (a supervisor stopping it) ends a tail as cleanly as Ctrl-C does.
            task = asyncio.current_task()
            assert task is not None
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        call_metadata.set((*call_metadata.get(), *token_metadata(args)))  # this task's calls
        with contextlib.suppress(asyncio.CancelledError):
            await follow(target_of(args), out.version_line, prefix=prefix, start=args.start,
                         limit=args.limit, on_retry=retrying, max_backoff=args.max_backoff,
                         tls_ca=tls_ca_of(args), keepalive_s=args.keepalive_s)

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())
    return EXIT_OK


# --- running a command ---------------------------------------------------------------------

Command = Callable[[argparse.Namespace, Output], int]
COMMANDS: dict[str, Command] = {
    "get": cmd_get, "history": cmd_history, "diff": cmd_diff, "log": cmd_log, "tail": cmd_tail,
}


def run(args: argparse.Namespace, command: Command) -> int:
    """Run one inspection command; every failure becomes a message and an exit code."""
    out = Output(args.json)
    try:
        return command(args, out)
    except CommandFailed as failed:
        out.error(str(failed))
        return failed.code
    except LedgerCallError as error:
        if error.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            out.error(f"cannot reach the service at {target_of(args)}: {error.message}")
        elif error.code == grpc.StatusCode.UNAUTHENTICATED:
            out.error(f"{error.message} (give --token or set {TOKEN_ENV})")
        else:
            out.error(error.message or str(error))
        return EXIT_USAGE if error.code == grpc.StatusCode.INVALID_ARGUMENT else EXIT_UNAVAILABLE
    except errors.InvalidArgument as error:
        out.error(error.message)
        return EXIT_USAGE
    except errors.ResourceNotFound as error:
        out.error(error.message)
        return EXIT_UNAVAILABLE
    except StoreNotEmpty as error:
        out.error(str(error))
        return EXIT_USAGE
    except KeyboardInterrupt:
        out.error("interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader of our output went away (`casledger log | head`): not an error.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK
    except (LedgerFileError, StoreBusy, OSError) as error:
        out.error(str(error))
        return EXIT_UNAVAILABLE
