"""The `casledger` command: ``casledger serve`` runs the service.

Exit codes: 0 ok, 1 verification failed, 2 usage error, 3 not found or service unavailable.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import fields

from .config import ENV_PREFIX, Settings, SettingsError, parse
from .server import serve

EXIT_OK, EXIT_VERIFY_FAILED, EXIT_USAGE, EXIT_UNAVAILABLE = 0, 1, 2, 3

_HELP = {
    "db": "database URL (default sqlite:///./casledger.db)",
    "grpc_listen": "HOST:PORT for the gRPC service (default 127.0.0.1:50051)",
    "http_listen": "HOST:PORT for the HTTP bridge (default 127.0.0.1:8080)",
    "no_http": "run the gRPC service alone, without the HTTP bridge",
    "max_content_bytes": "largest content accepted, in bytes (default 1048576)",
    "durability": "full: a reply means the write is on disk (default); normal: faster, the "
                  "last writes may be lost on power loss",
    "request_id_ttl_s": "how long request ids are remembered, in seconds (>= 86400)",
    "watch_queue": "live versions a watcher may have queued before it is ended as too slow",
    "shutdown_grace_s": "seconds in-flight calls get to finish on SIGTERM/SIGINT",
    "log_level": "debug, info, warning or error",
}


def _add_settings_flags(parser: argparse.ArgumentParser) -> None:
    for field in fields(Settings):
        flag = "--" + field.name.replace("_", "-")
        env = ENV_PREFIX + field.name.upper()
        help_text = f"{_HELP[field.name]} [env {env}]"
        if field.type == "bool":
            parser.add_argument(flag, action="store_const", const="true", default=None,
                                dest=field.name, help=help_text)
        else:
            parser.add_argument(flag, default=None, dest=field.name, help=help_text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="casledger",
        description="A versioned resource ledger with compare-and-swap writes.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve_parser = commands.add_parser("serve", help="run the gRPC service (and HTTP bridge)")
    _add_settings_flags(serve_parser)
    return parser


def settings_from(args: argparse.Namespace) -> Settings:
    given = {f.name: parse(f.name, getattr(args, f.name)) for f in fields(Settings)
             if getattr(args, f.name, None) is not None}
    return Settings.from_env(os.environ, **given)


async def run_service(settings: Settings) -> int:
    """Serve until SIGTERM or SIGINT, then drain in-flight calls and return 0."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    if not settings.no_http:
        logging.getLogger("casledger").warning(
            "the HTTP bridge is not part of this build yet; ignoring --http-listen %s",
            settings.http_listen)
    async with serve(settings):
        await stop.wait()
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = settings_from(args)
    except (SettingsError, TypeError) as exc:
        parser.error(str(exc))
    logging.basicConfig(
        level=settings.log_level.upper(), stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    try:
        return asyncio.run(run_service(settings))
    except (OSError, RuntimeError, ValueError) as exc:
        print(f"casledger: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
