"""Bootstrap of the gRPC service: ``serve(settings)`` opens the store and runs the server.

``serve`` is an async context manager yielding the running server (its bound port too, so tests
can listen on port 0). Leaving it stops accepting calls, lets in-flight calls finish within the
grace period, then closes the store.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from .api.casledger.v1 import ledger_pb2 as pb
from .config import Settings
from .servicer import LedgerServicer, add_to_server
from .storage import Store, open_store

log = logging.getLogger("casledger.server")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Ledger"].full_name
# Room for the largest content or patch plus the rest of the request.
MESSAGE_OVERHEAD = 64 * 1024


@dataclass(frozen=True, slots=True)
class RunningServer:
    server: grpc.aio.Server
    port: int
    store: Store
    health: health.aio.HealthServicer

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"


def grpc_options(settings: Settings) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", settings.max_content_bytes + MESSAGE_OVERHEAD),
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.keepalive_permit_without_calls", 1),
        # gRPC sets SO_REUSEPORT by default: a second server on a busy port would bind and
        # silently share its connections instead of failing.
        ("grpc.so_reuseport", 0),
    ]


@asynccontextmanager
async def serve(settings: Settings) -> AsyncIterator[RunningServer]:
    """Run the Ledger service (plus health and reflection) on ``settings.grpc_listen``."""
    async with open_store(settings.db, settings.store_options) as store:
        server = grpc.aio.server(options=grpc_options(settings))
        add_to_server(LedgerServicer(store, max_content_bytes=settings.max_content_bytes),
                      server)
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        try:
            port = server.add_insecure_port(settings.grpc_listen)
        except RuntimeError as exc:
            raise OSError(f"cannot listen on {settings.grpc_listen}: {exc}") from None
        await server.start()
        for name in ("", SERVICE_NAME):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("casledger serving gRPC on %s (store %s)", settings.grpc_listen, settings.db)
        try:
            yield RunningServer(server=server, port=port, store=store, health=health_servicer)
        finally:
            await health_servicer.enter_graceful_shutdown()
            # Watch streams never end by themselves: end them now, each with the revision to
            # resume from, so only unary calls use the grace period.
            store.hub.close()
            await server.stop(settings.shutdown_grace_s)
            log.info("casledger stopped")
