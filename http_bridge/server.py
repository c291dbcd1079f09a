"""Running the bridge: uvicorn (httptools) serving ``create_app(settings)``.

``casledger serve`` starts this in a process of its own beside the gRPC service (so each uses a
core) and passes its pid: when that parent is gone, the bridge shuts itself down instead of
lingering as an orphan. ``casledger bridge`` runs it alone in front of any service.
"""

from __future__ import annotations

import asyncio
import logging
import os

import uvicorn

from .app import BridgeSettings, create_app

log = logging.getLogger("casledger.bridge")


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


async def serve_bridge(settings: BridgeSettings, *, parent_pid: int | None = None) -> None:
    """Serve HTTP on ``settings.http_listen`` until SIGTERM/SIGINT (or the parent exits)."""
    host, port = split_listen(settings.http_listen)
    config = uvicorn.Config(
        create_app(settings), host=host, port=port, http="httptools", lifespan="on",
        access_log=False, server_header=False, log_level="warning",
        timeout_graceful_shutdown=5, timeout_keep_alive=30,
    )
    server = uvicorn.Server(config)
    watchdog = (asyncio.create_task(_watch_parent(server, parent_pid))
                if parent_pid is not None else None)
    log.info("casledger bridge on http://%s (service %s)", settings.http_listen, settings.target)
    try:
        await server.serve()
    finally:
        if watchdog is not None:
            watchdog.cancel()
    if not server.started:
        raise OSError(f"the bridge could not listen on {settings.http_listen}")
