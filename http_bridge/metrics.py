"""The bridge's Prometheus metrics, in a registry of its own, served at ``GET /metrics``.

Each app gets its own :class:`~prometheus_client.CollectorRegistry`, so two bridges in one
process (tests) do not collide. Labels have bounded values only: the route *template*
(``/v1/{name}``, never the path itself), the method (the ones the bridge serves, else OTHER),
the status code, and a problem's reason from the bridge's own table.

    casledger_http_requests_total{method, route, status}        requests answered
    casledger_http_request_duration_seconds{method, route}      latency (an SSE stream: its life)
    casledger_http_in_flight                                    requests being served
    casledger_http_sse_streams                                  SSE streams open
    casledger_http_shed_total{kind}                             refused with 503 OVERLOADED
                                                                (kind: request or stream)
    casledger_http_precondition_outcomes_total{status, reason}  304, 412 and 428 answers, by
                                                                reason (NOT_MODIFIED for 304)
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.requests import Request
from starlette.responses import Response

from casledger.service.metrics import LATENCY_BUCKETS

from .errors import HTTP_STATUS

METHODS = frozenset({"GET", "HEAD", "PUT", "PATCH", "DELETE", "POST", "OPTIONS"})
# The answers a conditional request can get for its preconditions.
PRECONDITION_STATUSES = frozenset({304, 412, 428})
# Reasons the bridge itself gives a 412 or 428, besides the service's (HTTP_STATUS).
_OWN_REASONS = frozenset({"NOT_MODIFIED", "VERSION_MISMATCH", "ALREADY_EXISTS"})


class BridgeMetrics:
    """The metrics of one bridge app."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter("casledger_http_requests", "HTTP requests answered, by method, "
                                "route template and status", ("method", "route", "status"),
                                registry=r)
        self.latency = Histogram("casledger_http_request_duration_seconds", "Time from a "
                                 "request's arrival to the end of its response (an SSE stream: "
                                 "how long it was open)", ("method", "route"),
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("casledger_http_in_flight", "HTTP requests being served (SSE "
                               "streams apart)", registry=r)
        self.sse_streams = Gauge("casledger_http_sse_streams", "Server-Sent Events streams open",
                                 registry=r)
        self.shed = Counter("casledger_http_shed", "Requests refused with 503 OVERLOADED (the "
                            "in-flight or stream bound was reached)", ("kind",), registry=r)
        self.preconditions = Counter("casledger_http_precondition_outcomes", "Answers to "
                                     "preconditions: 304 Not Modified, 412 Precondition Failed, "
                                     "428 Precondition Required, by reason",
                                     ("status", "reason"), registry=r)

    def track(self, *, in_flight: Callable[[], float], sse_streams: Callable[[], float]) -> None:
        """Read the gauges from the gates that hold the numbers, at scrape time."""
        self.in_flight.set_function(in_flight)
        self.sse_streams.set_function(sse_streams)

    def observe(self, method: str, route: str, status: int, duration_s: float,
                reason: str = "") -> None:
        method = method if method in METHODS else "OTHER"
        self.requests.labels(method, route, str(status)).inc()
        self.latency.labels(method, route).observe(duration_s)
        if status in PRECONDITION_STATUSES:
            if status == 304:
                reason = "NOT_MODIFIED"
            elif reason not in HTTP_STATUS and reason not in _OWN_REASONS:
                reason = "OTHER"
            self.preconditions.labels(str(status), reason).inc()

    async def endpoint(self, request: Request) -> Response:
        """``GET /metrics``: the Prometheus text exposition of this bridge's registry."""
        return Response(generate_latest(self.registry),
                        headers={"Content-Type": CONTENT_TYPE_LATEST})
