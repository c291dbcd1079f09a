"""The `casledger` command.

``casledger serve`` runs the gRPC service and, in a process of its own, the HTTP bridge;
``casledger bridge`` runs a bridge alone. Every flag has a ``CASLEDGER_*`` variable.

Exit codes: 0 ok, 1 verification failed, 2 usage error, 3 not found or service unavailable.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import fields
from typing import Any

from ..http_bridge.app import BridgeSettings
from .config import Settings, SettingsError, env_name, flag_name, load
from .server import serve

EXIT_OK, EXIT_VERIFY_FAILED, EXIT_USAGE, EXIT_UNAVAILABLE = 0, 1, 2, 3

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
    "log_level": "debug, info, warning or error",
    "target": "HOST:PORT of the gRPC service the bridge talks to (default 127.0.0.1:50051)",
    "max_body_bytes": "largest HTTP request body, in bytes (default 1048576)",
    "call_timeout_s": "deadline of each gRPC call the bridge makes, in seconds (default 5)",
    "cors_allow_origin": "allow browser code from ORIGIN (repeatable; off by default)",
    "heartbeat_s": "seconds between SSE heartbeat comments (default 15)",
}
# Bridge settings `serve` takes too (it derives `target` from its own gRPC port).
_SERVE_BRIDGE_FIELDS = ("max_body_bytes", "call_timeout_s", "cors_allow_origins", "heartbeat_s")


def _add_flags(parser: argparse.ArgumentParser, cls: type[Any],
               only: Sequence[str] | None = None) -> None:
    for field in fields(cls):
        if only is not None and field.name not in only:
            continue
        flag = flag_name(field.name)
        help_text = f"{_HELP[flag[2:].replace('-', '_')]} [env {env_name(field.name)}]"
        if isinstance(field.default, bool):
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
    return parser


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


def bridge_command(bridge: BridgeSettings, log_level: str) -> list[str]:
    command = [sys.executable, "-m", "casledger.http_bridge", "--target", bridge.target,
               "--http-listen", bridge.http_listen, "--max-body-bytes",
               str(bridge.max_body_bytes), "--call-timeout-s", str(bridge.call_timeout_s),
               "--heartbeat-s", str(bridge.heartbeat_s), "--parent-pid", str(os.getpid()),
               "--log-level", log_level]
    for origin in bridge.cors_allow_origins:
        command += ["--cors-allow-origin", origin]
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
            "target": local_target(settings.grpc_listen, running.port)})
        child = await asyncio.create_subprocess_exec(
            *bridge_command(bridge, settings.log_level), stdin=subprocess.DEVNULL)
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


def _configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "serve":
            settings = load(Settings, os.environ, **_given(args, Settings))
            bridge = None if settings.no_http else load(
                BridgeSettings, os.environ, **{k: v for k, v in _given(args, BridgeSettings)
                                               .items() if k in _SERVE_BRIDGE_FIELDS},
                http_listen=settings.http_listen)
            _configure_logging(settings.log_level)
            coroutine = run_service(settings, bridge)
        else:
            bridge = load(BridgeSettings, os.environ, **_given(args, BridgeSettings))
            _configure_logging(args.log_level)
            coroutine = run_bridge(bridge, args.parent_pid)
    except SettingsError as exc:
        parser.error(str(exc))
    try:
        return asyncio.run(coroutine)
    except (OSError, RuntimeError, ValueError) as exc:
        print(f"casledger: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except KeyboardInterrupt:
        return EXIT_OK


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
