"""The `casledger` command.

``casledger serve`` runs the gRPC service and, in a process of its own, the HTTP bridge;
``casledger bridge`` runs a bridge alone. Every flag has a ``CASLEDGER_*`` variable. The
inspection commands (get, history, diff, log, tail, verify, digest, export, import, stats) and
``migrate`` are declared here and run by :mod:`casledger.service.inspect`,
:mod:`casledger.service.audit` and :mod:`casledger.service.migrate`.

Exit codes: 0 ok, 1 verification failed, 2 usage error, 3 not found or service unavailable.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import fields
from typing import Any

import uvloop

from ..http_bridge.app import BridgeSettings
from . import audit, auth, inspect, logs, migrate
from .client import KEEPALIVE_S
from .config import Settings, SettingsError, env_name, flag_name, load
from .inspect import EXIT_OK, EXIT_UNAVAILABLE, EXIT_USAGE, EXIT_VERIFY_FAILED
from .server import serve
from .verify import Digest

__all__ = ["EXIT_OK", "EXIT_UNAVAILABLE", "EXIT_USAGE", "EXIT_VERIFY_FAILED", "main"]

log = logging.getLogger("casledger")

_HELP = {
    "db": "database URL (default sqlite:///./casledger.db)",
    "grpc_listen": "HOST:PORT for the gRPC service (default 127.0.0.1:50051)",
    "http_listen": "HOST:PORT for the HTTP bridge (default 127.0.0.1:8080)",
    "no_http": "run the gRPC service alone, without the HTTP bridge",
    "max_content_bytes": "largest content accepted, in bytes (default 1048576)",
    "durability": "full: a reply means the write is on disk (default); normal: faster, the "
                  "last writes may be lost on power loss or an OS crash",
    "request_id_ttl_s": "how long request ids are remembered, in seconds (>= 86400)",
    "watch_queue": "live versions a watcher may have queued before it is ended as too slow",
    "shutdown_grace_s": "seconds in-flight calls get to finish on SIGTERM/SIGINT",
    "grpc_keepalive_min_s": "shortest interval at which clients may send keepalive pings on "
                            "an idle connection; faster pingers are cut off (default 5)",
    "log_level": "debug, info, warning or error",
    "target": "HOST:PORT of the gRPC service the bridge talks to (default 127.0.0.1:50051)",
    "max_body_bytes": "largest HTTP request body, in bytes (default 1048576)",
    "call_timeout_s": "deadline of each gRPC call the bridge makes, in seconds (default 5)",
    "cors_allow_origin": "allow browser code from ORIGIN (repeatable; off by default)",
    "heartbeat_s": "seconds between SSE heartbeat comments (default 15)",
    "log_format": "auto (text on a terminal, JSON lines otherwise), json or text",
    "max_in_flight": "requests (bridge) and unary calls (service) each process serves at once; "
                     "past it, refused at once with 503 / RESOURCE_EXHAUSTED (default 256)",
    "max_watchers": "SSE streams (bridge) and Watch and BatchStream streams (service) each "
                    "process keeps open; "
                    "past it, refused the same way (default 512)",
    "metrics_listen": "HOST:PORT where the service serves Prometheus metrics (default: off; "
                      "the bridge always serves GET /metrics)",
    "auth_tokens_file": "require bearer tokens: this TOML file holds their hashes, scopes and "
                        "prefixes (add one with `casledger token create`); off by default",
    "insecure": "serve without access control even on a non-loopback address",
    "tls_cert": "serve gRPC over TLS with this PEM certificate (chain); needs --tls-key",
    "tls_key": "the PEM private key of --tls-cert",
    "http_tls_cert": "serve HTTPS with this PEM certificate (chain); needs --http-tls-key",
    "http_tls_key": "the PEM private key of --http-tls-cert",
    "target_tls_ca": "reach the service over TLS, trusting these PEM certificates (serve: "
                     "default --tls-cert itself)",
    "target_tls_name": "the name to check in the service's certificate instead of the "
                       "target's host",
    "read_cache": "answer GETs of current versions from a cache of heads kept by one Watch, "
                  "linearizably (a read index: one GetRevision per batch of reads); "
                  "--no-read-cache: every GET calls the service (default on)",
    "batch_calls": "carry concurrent GET/PUT/PATCH/DELETE/POST calls to the service together "
                   "in Batch calls (fewer gRPC calls, same answers); --no-batch-calls: one "
                   "unary call per request (default on)",
    "read_cache_entries": "resource heads the read cache keeps at most (default 10000)",
    "read_cache_bytes": "bytes the read cache keeps at most (default 67108864)",
    "read_cache_idle_s": "seconds without a read the cache can serve before its Watch pauses "
                         "(the next such read restarts it); 0: never pause (default 2)",
}
# Bridge settings `serve` takes too (it derives `target` from its own gRPC port).
_SERVE_BRIDGE_FIELDS = ("max_body_bytes", "call_timeout_s", "cors_allow_origins", "heartbeat_s",
                        "http_tls_cert", "http_tls_key", "target_tls_ca", "target_tls_name",
                        "read_cache", "read_cache_entries", "read_cache_bytes", "read_cache_idle_s",
                        "batch_calls")


def _add_flags(parser: argparse.ArgumentParser, cls: type[Any],
               only: Sequence[str] | None = None) -> None:
    for field in fields(cls):
        if only is not None and field.name not in only:
            continue
        flag = flag_name(field.name)
        help_text = f"{_HELP[flag[2:].replace('-', '_')]} [env {env_name(field.name)}]"
        if isinstance(field.default, bool) and field.default:
            # On by default: --flag / --no-flag (the help names both).
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                                dest=field.name, help=help_text)
        elif isinstance(field.default, bool):
            parser.add_argument(flag, action="store_const", const=True, default=None,
                                dest=field.name, help=help_text)
        elif isinstance(field.default, tuple):
            parser.add_argument(flag, action="append", default=None, dest=field.name,
                                metavar="ORIGIN", help=help_text)
        else:
            parser.add_argument(flag, default=None, dest=field.name, help=help_text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="casledger",
        description="A versioned resource ledger with compare-and-swap writes.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve_parser = commands.add_parser(
        "serve", help="run the gRPC service and the HTTP bridge",
        description="Run the gRPC service and, in its own process, the HTTP bridge.")
    _add_flags(serve_parser, Settings)
    _add_flags(serve_parser, BridgeSettings, _SERVE_BRIDGE_FIELDS)
    bridge_parser = commands.add_parser(
        "bridge", help="run an HTTP bridge alone, in front of a running service")
    _add_flags(bridge_parser, BridgeSettings)
    bridge_parser.add_argument("--parent-pid", type=int, default=None, help=argparse.SUPPRESS)
    bridge_parser.add_argument("--log-level", default=os.environ.get(env_name("log_level"),
                                                                     "info"),
                               help=_HELP["log_level"])
    bridge_parser.add_argument("--log-format", choices=("auto", "json", "text"),
                               default=os.environ.get(env_name("log_format"), "auto"),
                               help=_HELP["log_format"])
    _add_inspection_commands(commands)
    migrate.add_command(commands)
    _add_token_commands(commands)
    return parser


def _add_token_commands(commands: Any) -> None:
    token = commands.add_parser("token", help="manage access tokens (see --auth-tokens-file)")
    actions = token.add_subparsers(dest="token_command", required=True, metavar="ACTION")
    create = actions.add_parser(
        "create", help="make a new token, print it once and add its hash to the tokens file",
        description="Make a new random bearer token, print it once on stdout and append its "
                    "SHA-256, principal, scopes and prefixes to the tokens file (created with "
                    "mode 0600). The token itself is stored nowhere.")
    create.add_argument("--principal", required=True,
                        help="who the token is: recorded as the actor of what it writes")
    create.add_argument("--scope", action="append", required=True, dest="scopes",
                        choices=[scope.value for scope in auth.Scope],
                        help="read, write or admin (all of them); repeatable")
    create.add_argument("--prefix", action="append", default=[], dest="prefixes",
                        metavar="PREFIX", help="limit the token to names under this "
                        "whole-segment prefix; repeatable (default: the whole ledger)")
    listing = actions.add_parser(
        "list", help="show the tokens in the tokens file (never the tokens themselves)",
        description="Show each entry of the tokens file: the start of its hash (its id), "
                    "principal, scopes, prefixes and creation time.")
    listing.add_argument("--json", action="store_true", help="one JSON array, for scripts")
    revoke = actions.add_parser(
        "revoke", help="remove a token from the tokens file",
        description="Remove the entry whose hash starts with ID (as `casledger token list` "
                    "shows it) from the tokens file. A running service stops accepting the "
                    "token within a second, when it reads the file again.")
    revoke.add_argument("id", metavar="ID", help="the token's id: at least 8 hex digits of "
                        "its hash")
    env_file = os.environ.get(env_name("auth_tokens_file"))
    for action in (create, listing, revoke):
        action.add_argument("--file", default=env_file, required=not env_file, metavar="PATH",
                            help=f"the tokens file [env {env_name('auth_tokens_file')}]")


def run_token(args: argparse.Namespace) -> int:
    if args.token_command == "create":
        return run_token_create(args)
    try:
        if args.token_command == "list":
            tokens = auth.list_tokens(args.file)
            if args.json:
                print(json.dumps([{"id": t.id, "hash": auth.HASH_SCHEME + t.digest,
                                   "principal": t.grant.principal,
                                   "scopes": sorted(t.grant.scopes),
                                   "prefixes": list(t.grant.prefixes),
                                   "created": t.created or None} for t in tokens], indent=2))
            else:
                for t in tokens:
                    print(f"{t.id}  {t.grant.describe()}"
                          + (f"  created {t.created}" if t.created else ""))
                print(f"casledger: {len(tokens)} token(s) in {args.file}", file=sys.stderr)
            return EXIT_OK
        revoked = auth.revoke_token(args.file, args.id)
    except (ValueError, OSError) as exc:
        print(f"casledger: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(f"casledger: revoked token {revoked.id} of {revoked.grant.describe()}; a running "
          "service refuses it once it reads the file again (within a second)", file=sys.stderr)
    return EXIT_OK


def run_token_create(args: argparse.Namespace) -> int:
    try:
        token = auth.create_token(args.file, principal=args.principal, scopes=args.scopes,
                                  prefixes=args.prefixes)
    except (ValueError, OSError) as exc:
        print(f"casledger: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(token)
    print(f"casledger: added a token for {args.principal} to {args.file}; it is shown only "
          "this once", file=sys.stderr)
    return EXIT_OK


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, not {value}")
    return value


def _revision(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, not {value}")
    return value


def _seconds(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 86400:
        raise argparse.ArgumentTypeError(f"must be between 0 and 86400 seconds, not {text}")
    return value


def _digest(text: str) -> Digest:
    try:
        return Digest.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_inspection_commands(commands: Any) -> None:
    """The inspection commands; which modes each has is :data:`inspect.MODES`."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true",
                        help="machine-readable output: JSON Lines for lists and logs, one JSON "
                             "document otherwise")

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        online, offline = inspect.MODES[name]
        modes = " and ".join(m for m, on in (("online", online), ("offline", offline)) if on)
        parser: argparse.ArgumentParser = commands.add_parser(
            name, parents=[common], help=f"{help_text} ({modes})",
            description=f"{help_text[0].upper()}{help_text[1:]}. Modes: {modes}.")
        if online:
            parser.add_argument("--target", default=None, metavar="HOST:PORT",
                                help="the gRPC service to ask (default 127.0.0.1:50051) "
                                     f"[env {inspect.TARGET_ENV}]")
            parser.add_argument("--token", default=None, metavar="TOKEN",
                                help="bearer token for a service with access control (the "
                                     f"variable keeps it out of ps) [env {inspect.TOKEN_ENV}]")
            parser.add_argument("--tls-ca", default=None, metavar="FILE",
                                help="reach the service over TLS, trusting these PEM "
                                     f"certificates [env {inspect.TLS_CA_ENV}]")
        if offline:
            parser.add_argument("--db", default=None, metavar="URL",
                                help="read this ledger file instead, read-only (sqlite:///path "
                                     "or a path; or a database, postgresql://...) "
                                     f"[env {inspect.DB_ENV}]")
        return parser

    get = add("get", "print a resource, or one of its versions")
    get.add_argument("name")
    get.add_argument("--version", type=_count, default=0, help="a past version (0 = current)")
    get.add_argument("--raw", action="store_true", help="write the stored bytes alone")
    add("history", "list every version of a resource").add_argument("name")
    diff = add("diff", "show what changed between two versions of a resource")
    diff.add_argument("name")
    diff.add_argument("a", type=_revision, metavar="A", help="the older version")
    diff.add_argument("b", type=_revision, metavar="B", help="the newer version")
    log = add("log", "list the ledger's versions in revision order")
    log.add_argument("--prefix", default="", help="only resources under this path")
    log.add_argument("--since", type=_revision, default=1, metavar="REV",
                     help="from this revision on (inclusive; default 1)")
    log.add_argument("--limit", type=_count, default=0, help="stop after N versions")
    tail = add("tail", "follow new versions as they are written, resuming after lost "
                       "connections without a gap")
    tail.add_argument("--prefix", default="", help="only resources under this path")
    tail.add_argument("--from", dest="start", type=_revision, default=0, metavar="REV",
                      help="replay from this revision (inclusive) first; default: from now")
    tail.add_argument("--limit", type=_count, default=0, help="stop after N versions")
    tail.add_argument("--max-backoff", type=_seconds, default=5.0, metavar="S",
                      help="longest wait between reconnection attempts (default 5)")
    tail.add_argument("--keepalive-s", type=_seconds, default=KEEPALIVE_S, metavar="S",
                      help="ping the service after S seconds without traffic and reconnect "
                           "when it does not answer; 0: never (default 30)")
    verify = add("verify", "recompute every hash and both chains; exit 1 on any broken link")
    verify.add_argument("--digest", type=_digest, default=None, metavar="R:HEX",
                        help="also prove the ledger still extends this earlier digest")
    digest = add("digest", "print the ledger digest (R:hex) at a revision")
    digest.add_argument("--revision", type=_count, default=None, metavar="R",
                        help="default: the latest")
    for parser in (verify, digest):
        parser.add_argument("--jobs", "-j", type=_revision, default=None, metavar="N",
                            help="offline: check a ledger file in N processes at once (default: "
                                 "one per CPU for ledgers big enough to gain; 1: one pass)")
    export = add("export", "write every version with its hash as JSON Lines")
    export.add_argument("--output", "-o", default=None, metavar="FILE",
                        help="write here (default: stdout)")
    load_parser = add("import", "load an export into an empty ledger file, verifying it")
    load_parser.add_argument("file", metavar="FILE", help="the export (- for stdin)")
    add("stats", "count resources, versions, tombstones, bytes and recent writes")


def _given(args: argparse.Namespace, cls: type[Any]) -> dict[str, Any]:
    given: dict[str, Any] = {}
    for field in fields(cls):
        value = getattr(args, field.name, None)
        if isinstance(value, list):
            value = tuple(value)
        given[field.name] = value
    return given


def local_target(grpc_listen: str, port: int) -> str:
    """Where a bridge on this machine reaches a service listening on `grpc_listen`."""
    host = grpc_listen.rpartition(":")[0]
    if host in ("0.0.0.0", "[::]", "::", ""):
        host = "127.0.0.1"
    return f"{host}:{port}"


def bridge_command(bridge: BridgeSettings, log_level: str, log_format: str = "auto"
                   ) -> list[str]:
    command = [sys.executable, "-m", "casledger.http_bridge", "--target", bridge.target,
               "--http-listen", bridge.http_listen, "--max-body-bytes",
               str(bridge.max_body_bytes), "--call-timeout-s", str(bridge.call_timeout_s),
               "--heartbeat-s", str(bridge.heartbeat_s), "--parent-pid", str(os.getpid()),
               "--log-level", log_level, "--log-format", log_format,
               "--max-in-flight", str(bridge.max_in_flight),
               "--max-watchers", str(bridge.max_watchers),
               "--read-cache" if bridge.read_cache else "--no-read-cache",
               "--read-cache-entries", str(bridge.read_cache_entries),
               "--read-cache-bytes", str(bridge.read_cache_bytes),
               "--read-cache-idle-s", str(bridge.read_cache_idle_s),
               "--batch-calls" if bridge.batch_calls else "--no-batch-calls"]
    for origin in bridge.cors_allow_origins:
        command += ["--cors-allow-origin", origin]
    for name in ("http_tls_cert", "http_tls_key", "target_tls_ca", "target_tls_name"):
        if getattr(bridge, name):
            command += [flag_name(name), getattr(bridge, name)]
    return command


async def run_service(settings: Settings, bridge: BridgeSettings | None) -> int:
    """Serve until SIGTERM or SIGINT, then drain in-flight calls and return 0. With a bridge,
    both stop together: if the bridge process dies, the service stops too (exit 3)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with serve(settings) as running:
        if bridge is None:
            await stop.wait()
            return EXIT_OK
        bridge = BridgeSettings(**{
            **{f.name: getattr(bridge, f.name) for f in fields(BridgeSettings)},
            "target": local_target(settings.grpc_listen, running.port),
            # A TLS service: its bridge trusts the service's own certificate unless told.
            "target_tls_ca": bridge.target_tls_ca or settings.tls_cert})
        child = await asyncio.create_subprocess_exec(
            *bridge_command(bridge, settings.log_level, settings.log_format),
            stdin=subprocess.DEVNULL)
        child_exit = asyncio.ensure_future(child.wait())
        stopped = asyncio.ensure_future(stop.wait())
        await asyncio.wait({child_exit, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if child_exit.done():
            stopped.cancel()
            log.error("the HTTP bridge exited with status %s; stopping the service",
                      child_exit.result())
            return EXIT_UNAVAILABLE
        child.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.shield(child_exit), settings.shutdown_grace_s + 5)
        except TimeoutError:
            child.kill()
            await child_exit
        return EXIT_OK


async def run_bridge(bridge: BridgeSettings, parent_pid: int | None) -> int:
    from ..http_bridge.server import serve_bridge

    await serve_bridge(bridge, parent_pid=parent_pid)
    return EXIT_OK


def _configure_logging(level: str, fmt: str = "auto") -> None:
    logs.configure(level, fmt, sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    command = {**inspect.COMMANDS, **audit.COMMANDS, **migrate.COMMANDS}.get(args.command)
    if command is not None:
        return inspect.run(args, command)
    if args.command == "token":
        return run_token(args)
    try:
        if args.command == "serve":
            settings = load(Settings, os.environ, **_given(args, Settings))
            bridge = None if settings.no_http else load(
                BridgeSettings, os.environ, **{k: v for k, v in _given(args, BridgeSettings)
                                               .items() if k in _SERVE_BRIDGE_FIELDS},
                http_listen=settings.http_listen, max_in_flight=settings.max_in_flight,
                max_watchers=settings.max_watchers)
            _configure_logging(settings.log_level, settings.log_format)
            coroutine = run_service(settings, bridge)
        else:
            bridge = load(BridgeSettings, os.environ, **_given(args, BridgeSettings))
            _configure_logging(args.log_level, args.log_format)
            coroutine = run_bridge(bridge, args.parent_pid)
    except SettingsError as exc:
        parser.error(str(exc))
    # The bridge's HTTP server runs on uvloop (its transports are uvicorn's, written for it);
    # the service stays on asyncio's loop: grpc.aio does its own I/O and gains nothing there.
    loop_factory = uvloop.new_event_loop if args.command == "bridge" else None
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            return runner.run(coroutine)
    except (OSError, RuntimeError, ValueError) as exc:
        print(f"casledger: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except KeyboardInterrupt:
        return EXIT_OK


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
