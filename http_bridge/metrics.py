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
    casledger_http_read_cache_reads_total{outcome}              current-version reads: hit,
                                                                miss or fallback (readindex.py)
    casledger_http_read_cache_fallbacks_total{reason}           fallbacks, by why
    casledger_http_read_index_rounds_total                      GetRevision calls for reads
    casledger_http_read_cache_resets_total                      cache cleared (a gap, or
                                                                the ledger went back)
    casledger_http_read_cache_entries, _bytes                   what the cache holds
    casledger_http_read_cache_revision                          its applied revision
    casledger_http_read_cache_following                         1 while its watch is up
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

from casledger.service.metrics import LATENCY_BUCKETS, Children

from .errors import HTTP_STATUS

METHODS = frozenset({"GET", "HEAD", "PUT", "PATCH", "DELETE", "POST", "OPTIONS"})
# The answers a conditional request can get for its preconditions.
PRECONDITION_STATUSES = frozenset({304, 412, 428})
# Reasons the bridge itself gives a 412 or 428, besides the service's (HTTP_STATUS).
_OWN_REASONS = frozenset({"NOT_MODIFIED", "VERSION_MISMATCH", "ALREADY_EXISTS"})
READ_OUTCOMES = ("hit", "miss", "fallback")
# Why a read went to the service without the cache (readindex.py, ReadCache.get).
FALLBACK_REASONS = ("authorization", "paused", "not_following", "read_index_failed",
                    "wait_timeout", "lagging")


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
        self._count, self._time = Children(self.requests), Children(self.latency)
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

        self.read_cache_reads = Counter(
            "casledger_http_read_cache_reads", "Reads of current versions (GET/HEAD /v1/{name}) "
            "by how they were answered: hit (from the read cache), miss (GetResource, then "
            "cached), fallback (GetResource alone)", ("outcome",), registry=r)
        self.read_cache_fallbacks = Counter(
            "casledger_http_read_cache_fallbacks", "Reads answered by GetResource without the "
            "cache, by why: authorization (the request carries credentials), paused (no read "
            "came for a while: the watch was stopped; this read restarts it), not_following "
            "(the cache's watch is down), read_index_failed (GetRevision failed), wait_timeout "
            "(the cache did not catch up in time), lagging (it has not yet, since)",
            ("reason",), registry=r)
        self.read_index_rounds = Counter(
            "casledger_http_read_index_rounds", "GetRevision calls made for reads; each serves "
            "every read waiting when it starts", registry=r)
        self.read_cache_resets = Counter(
            "casledger_http_read_cache_resets", "Times the read cache was cleared: a gap in its "
            "watch, or the ledger's revision went back", registry=r)
        self.read_cache_entries = Gauge("casledger_http_read_cache_entries", "Resource heads "
                                        "in the read cache", registry=r)
        self.read_cache_bytes = Gauge("casledger_http_read_cache_bytes", "Bytes the read "
                                      "cache accounts for its heads", registry=r)
        self.read_cache_revision = Gauge("casledger_http_read_cache_revision", "The last "
                                         "revision the read cache applied", registry=r)
        self.read_cache_following = Gauge("casledger_http_read_cache_following", "1 while the "
                                          "read cache's watch of the ledger is up", registry=r)
        for outcome in READ_OUTCOMES:  # exported at 0 from the start
            self.read_cache_reads.labels(outcome)
        for reason in FALLBACK_REASONS:
            self.read_cache_fallbacks.labels(reason)

    def read_cache_read(self, outcome: str, reason: str = "") -> None:
        self.read_cache_reads.labels(outcome).inc()
        if reason:
            self.read_cache_fallbacks.labels(reason).inc()

    def track_read_cache(self, *, entries: Callable[[], float], size: Callable[[], float],
                         revision: Callable[[], float], following: Callable[[], float]) -> None:
        """Read the read cache's gauges from it, at scrape time."""
        self.read_cache_entries.set_function(entries)
        self.read_cache_bytes.set_function(size)
        self.read_cache_revision.set_function(revision)
        self.read_cache_following.set_function(following)

    def track(self, *, in_flight: Callable[[], float], sse_streams: Callable[[], float]) -> None:
        """Read the gauges from the gates that hold the numbers, at scrape time."""
        self.in_flight.set_function(in_flight)
        self.sse_streams.set_function(sse_streams)

    def observe(self, method: str, route: str, status: int, duration_s: float,
                reason: str = "") -> None:
        method = method if method in METHODS else "OTHER"
        self._count(method, route, str(status)).inc()
        self._time(method, route).observe(duration_s)
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
