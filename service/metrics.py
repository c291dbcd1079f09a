"""The service's Prometheus metrics, in a registry of its own, and the HTTP port that serves them.

Each server gets its own :class:`~prometheus_client.CollectorRegistry` (never the global one), so
two servers in one process (tests) do not collide. Labels have bounded values only: the RPC's
full method name (only methods the server implements), the status code name, the reason of a
compare-and-swap refusal.

    casledger_grpc_requests_total{rpc, code}          calls finished, by method and status code
    casledger_grpc_request_duration_seconds{rpc}      latency (a Watch: how long it stayed open)
    casledger_grpc_in_flight                          unary calls being served (a Batch: one
                                                      per operation)
    casledger_grpc_watch_streams                      Watch and BatchStream streams admitted
    casledger_grpc_shed_total{rpc}                    calls refused as OVERLOADED
    casledger_cas_conflicts_total{reason}             writes refused: VERSION_MISMATCH,
                                                      MODIFIED_SINCE, ALREADY_EXISTS,
                                                      PRECONDITION_REQUIRED
    casledger_watchers                                watchers subscribed to the ledger's commits
    casledger_watchers_too_slow                       of which fell watch_queue versions behind:
                                                      no longer queued for, ended at their next
                                                      read (a stalled consumer stays here)
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Callable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

from .watch import WatchHub

# The refusals of a write that a compare-and-swap client acts on (HTTP 412, 428, 409/412).
CAS_REASONS = frozenset({"VERSION_MISMATCH", "MODIFIED_SINCE", "ALREADY_EXISTS",
                         "PRECONDITION_REQUIRED"})
# Seconds; a ledger call is a SQLite transaction away, so most land in the first buckets.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                   5.0, 10.0)


class Children:
    """The labelled children of one metric, each looked up once: prometheus_client's
    ``labels()`` validates and takes a lock on every call, and these are counted per request.
    Only for label values from a bounded set (methods, routes, status codes)."""

    def __init__(self, metric: Counter | Histogram) -> None:
        self._metric = metric
        self._children: dict[tuple[str, ...], Any] = {}

    def __call__(self, *values: str) -> Any:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self._metric.labels(*values)
        return child


class ServiceMetrics:
    """The metrics of one gRPC server."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter("casledger_grpc_requests", "gRPC calls finished, by method and "
                                "status code", ("rpc", "code"), registry=r)
        self.latency = Histogram("casledger_grpc_request_duration_seconds", "Time from the start "
                                 "of a gRPC call to its status (a Watch: how long it was open)",
                                 ("rpc",), buckets=LATENCY_BUCKETS, registry=r)
        self._count, self._time = Children(self.requests), Children(self.latency)
        self.in_flight = Gauge("casledger_grpc_in_flight", "Unary gRPC calls being served (a "
                               "Batch counts one per operation)", registry=r)
        self.watch_streams = Gauge("casledger_grpc_watch_streams",
                                   "Watch and BatchStream streams admitted", registry=r)
        self.shed = Counter("casledger_grpc_shed", "gRPC calls refused as OVERLOADED (the "
                            "in-flight or watcher bound was reached)", ("rpc",), registry=r)
        self.cas_conflicts = Counter("casledger_cas_conflicts", "Writes refused by the "
                                     "compare-and-swap rules, by reason", ("reason",), registry=r)
        self.watchers = Gauge("casledger_watchers", "Watchers subscribed to the ledger's commits",
                              registry=r)
        self.too_slow = Gauge("casledger_watchers_too_slow", "Watchers that fell too far behind: "
                              "nothing more is queued for them, they end at their next read",
                              registry=r)

    def track(self, *, in_flight: Callable[[], float], watch_streams: Callable[[], float],
              hub: WatchHub) -> None:
        """Read the gauges from the things they describe, at scrape time."""
        self.in_flight.set_function(in_flight)
        self.watch_streams.set_function(watch_streams)
        self.watchers.set_function(lambda: hub.watchers)
        self.too_slow.set_function(lambda: hub.overflowed)

    def observe(self, rpc: str, code: str, reason: str, duration_s: float) -> None:
        self._count(rpc, code).inc()
        self._time(rpc).observe(duration_s)
        if reason in CAS_REASONS:
            self.cas_conflicts.labels(reason).inc()


def split_listen(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


class MetricsServer:
    """Serves a registry at ``http://HOST:PORT/metrics`` (any path answers) from a thread of its
    own, so a scrape never waits for the event loop. ``start`` binds (port 0: any free port, see
    `port`); ``close`` stops it."""

    def __init__(self, httpd: WSGIServer) -> None:
        self._httpd = httpd
        self.port: int = httpd.server_port
        # A short poll: close() waits for the serving loop to notice.
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="casledger-metrics", daemon=True)
        self._thread.start()

    @classmethod
    def start(cls, listen: str, registry: CollectorRegistry) -> MetricsServer:
        host, port = split_listen(listen)
        server_class = _IPv6Server if ":" in host else ThreadingWSGIServer
        try:
            httpd = make_server(host, port, make_wsgi_app(registry), server_class,
                                handler_class=_QuietHandler)
        except OSError as exc:
            raise OSError(f"cannot serve metrics on {listen}: {exc}") from None
        return cls(httpd)

    async def close(self) -> None:
        await asyncio.to_thread(self._stop)

    def _stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()


class _IPv6Server(ThreadingWSGIServer):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    """No line on stderr per scrape."""

    def log_message(self, format: str, *args: Any) -> None:
        pass
