"""Bootstrap of the gRPC service: ``serve(settings)`` opens the store and runs the server.

``serve`` is an async context manager yielding the running server (its bound port too, so tests
can listen on port 0). Leaving it stops accepting calls, lets in-flight calls finish within the
grace period, then closes the store.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from .auth import TokenFile
from .config import Settings
from .interceptor import CallInterceptor
from .limits import backstop
from .metrics import MetricsServer, ServiceMetrics
from .servicer import SERVICE_NAME, LedgerServicer, add_to_server
from .storage import Store, open_store

log = logging.getLogger("casledger.server")

# Room for the largest content or patch plus the rest of the request.
MESSAGE_OVERHEAD = 64 * 1024


@dataclass(frozen=True, slots=True)
class RunningServer:
    server: grpc.aio.Server
    port: int
    store: Store
    health: health.aio.HealthServicer
    metrics: ServiceMetrics | None = None
    # Where the metrics are served (settings.metrics_listen), None when they are not.
    metrics_port: int | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"


def grpc_options(settings: Settings) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", settings.max_content_bytes + MESSAGE_OVERHEAD),
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.keepalive_permit_without_calls", 1),
        # Clients ping idle connections (connect's keepalive_s) to notice a dead one; gRPC's
        # default would answer pings more often than every 5 minutes with GOAWAY too_many_pings.
        ("grpc.http2.min_ping_interval_without_data_ms",
         round(settings.grpc_keepalive_min_s * 1000)),
        # gRPC sets SO_REUSEPORT by default: a second server on a busy port would bind and
        # silently share its connections instead of failing.
        ("grpc.so_reuseport", 0),
    ]


def read_pem(path: str, flag: str) -> bytes:
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError as exc:
        raise OSError(f"cannot read {flag} {path}: {exc.strerror}") from None


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS credentials from ``settings.tls_cert``/``tls_key`` (PEM files), or None."""
    if not settings.tls_cert:
        return None
    cert, key = read_pem(settings.tls_cert, "--tls-cert"), read_pem(settings.tls_key, "--tls-key")
    try:  # gRPC would only say "Failed to bind" for a key that does not fit the certificate
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(settings.tls_cert,
                                                                 settings.tls_key)
    except ssl.SSLError as exc:
        raise OSError(f"--tls-cert {settings.tls_cert} / --tls-key {settings.tls_key}: not a "
                      f"PEM certificate and its private key ({exc.reason or exc})") from None
    return grpc.ssl_server_credentials([(key, cert)])


@asynccontextmanager
async def serve(settings: Settings) -> AsyncIterator[RunningServer]:
    """Run the Ledger service (plus health and reflection) on ``settings.grpc_listen``."""
    # Both read before anything opens: a wrong path fails the start, not the first call.
    tokens = TokenFile(settings.auth_tokens_file) if settings.auth_tokens_file else None
    credentials = server_credentials(settings)
    async with open_store(settings.db, settings.store_options) as store:
        metrics = ServiceMetrics()
        calls = CallInterceptor(metrics, max_in_flight=settings.max_in_flight,
                                max_watchers=settings.max_watchers)
        metrics.track(in_flight=lambda: calls.unary.in_flight,
                      watch_streams=lambda: calls.streams.in_flight,
                      hub=store.hub)
        server = grpc.aio.server(
            options=grpc_options(settings), interceptors=[calls],
            # A backstop only: the interceptor refuses first, with ErrorInfo OVERLOADED.
            maximum_concurrent_rpcs=backstop(settings.max_in_flight, settings.max_watchers))
        servicer = LedgerServicer(store, max_content_bytes=settings.max_content_bytes,
                                  tokens=tokens, observe=calls.record, batch_slots=calls)
        add_to_server(servicer, server)
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        try:
            port = (server.add_insecure_port(settings.grpc_listen) if credentials is None
                    else server.add_secure_port(settings.grpc_listen, credentials))
        except RuntimeError as exc:
            raise OSError(f"cannot listen on {settings.grpc_listen}: {exc}") from None
        await server.start()
        for name in ("", SERVICE_NAME):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("casledger serving gRPC on %s (store %s)", settings.grpc_listen, settings.db)
        log.info("gRPC %s; access control %s", "over TLS" if credentials else "in plaintext",
                 f"by the tokens in {tokens.path}" if tokens else "off: every caller is "
                 "anonymous")
        metrics_server: MetricsServer | None = None
        try:
            if settings.metrics_listen:
                metrics_server = MetricsServer.start(settings.metrics_listen, metrics.registry)
                log.info("casledger metrics on http://%s:%d/metrics",
                         settings.metrics_listen.rpartition(":")[0], metrics_server.port)
            yield RunningServer(server=server, port=port, store=store, health=health_servicer,
                                metrics=metrics,
                                metrics_port=metrics_server.port if metrics_server else None)
        finally:
            await health_servicer.enter_graceful_shutdown()
            # Watch streams never end by themselves: end them now, each with the revision to
            # resume from, so only unary calls use the grace period.
            store.hub.close()
            # BatchStreams take no more batches either: only the batches taken finish.
            servicer.close_streams()
            await server.stop(settings.shutdown_grace_s)
            if metrics_server is not None:
                await metrics_server.close()
            log.info("casledger stopped")
