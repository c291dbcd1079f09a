"""Running the bridge: uvicorn (httptools) serving ``create_app(settings)``.

``casledger serve`` starts this in a process of its own beside the gRPC service (so each uses a
core) and passes its pid: when that parent is gone, the bridge shuts itself down instead of
lingering as an orphan. ``casledger bridge`` runs it alone in front of any service.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import ssl

import uvicorn

from casledger.service.limits import backstop

from .app import BridgeSettings, create_app

log = logging.getLogger("casledger.bridge")

# uvicorn's `limit_concurrency` counts open connections, idle keep-alive ones too: room for
# those above the bounds the app itself enforces (a backstop: the app refuses first, with a
# problem body and Retry-After; uvicorn's own 503 has neither).
IDLE_CONNECTIONS = 1024


def split_listen(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


async def _watch_parent(server: uvicorn.Server, parent_pid: int) -> None:
    while not server.should_exit:
        if os.getppid() != parent_pid:
            log.warning("the casledger service process is gone; stopping the bridge")
            server.should_exit = True
            return
        await asyncio.sleep(0.5)


def bridge_config(settings: BridgeSettings) -> uvicorn.Config:
    """The uvicorn configuration of a bridge: HTTPS when ``http_tls_cert``/``http_tls_key``."""
    host, port = split_listen(settings.http_listen)
    if settings.http_tls_cert:
        try:  # fail here, with the flags named, rather than inside uvicorn's startup
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(settings.http_tls_cert,
                                                                     settings.http_tls_key)
        except (OSError, ssl.SSLError) as exc:
            raise OSError(f"--http-tls-cert {settings.http_tls_cert} / --http-tls-key "
                          f"{settings.http_tls_key}: cannot use them "
                          f"({getattr(exc, 'reason', None) or exc})") from None
    return uvicorn.Config(
        create_app(settings), host=host, port=port, http="httptools", lifespan="on",
        access_log=False, server_header=False, log_level="warning",
        timeout_graceful_shutdown=5, timeout_keep_alive=30,
        limit_concurrency=backstop(settings.max_in_flight, settings.max_watchers)
        + IDLE_CONNECTIONS,
        # uvicorn's own lines go through the root logger too, in --log-format.
        log_config=None,
        ssl_certfile=settings.http_tls_cert or None, ssl_keyfile=settings.http_tls_key or None,
    )


def _stopped(signum: int, frame: object) -> None:
    """SIGTERM once uvicorn has shut down on it: nothing left to do but exit 0."""


async def serve_bridge(settings: BridgeSettings, *, parent_pid: int | None = None) -> None:
    """Serve HTTP on ``settings.http_listen`` until SIGTERM/SIGINT (or the parent exits)."""
    config = bridge_config(settings)
    server = uvicorn.Server(config)
    watchdog = (asyncio.create_task(_watch_parent(server, parent_pid))
                if parent_pid is not None else None)
    log.info("casledger bridge on %s://%s (service %s%s)",
             "https" if settings.http_tls_cert else "http", settings.http_listen,
             settings.target, " over TLS" if settings.target_tls_ca else "")
    # uvicorn re-raises the signal it stopped on after restoring the previous handler: with
    # SIGTERM's default action the drained bridge would then die by it instead of exiting 0.
    previous = signal.signal(signal.SIGTERM, _stopped)
    try:
        await server.serve()
    finally:
        signal.signal(signal.SIGTERM, previous)
        if watchdog is not None:
            watchdog.cancel()
    if not server.started:
        raise OSError(f"the bridge could not listen on {settings.http_listen}")
