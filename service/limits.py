"""Load shedding: bounds on in-flight work that refuse at once instead of queueing.

A :class:`Gate` admits up to `limit` units of work and refuses the next one immediately: past
the bound, a caller is told to come back (RESOURCE_EXHAUSTED / OVERLOADED with
``retry_after_s`` over gRPC, 503 with ``Retry-After`` over HTTP) rather than made to wait in a
queue that grows with the load and answers everyone late. The service keeps one gate for unary
calls and one for its long-lived streams (Watch, BatchStream); the bridge one for requests and
one for SSE streams.
"""

from __future__ import annotations

# What a refused caller is told to wait before retrying, in seconds.
RETRY_AFTER_S = 1
# Room above the interceptor's bounds for what it does not limit (health checks, reflection,
# the refusals themselves) before gRPC's own `maximum_concurrent_rpcs` backstop refuses.
BACKSTOP_HEADROOM = 64


class Gate:
    """Admits up to `limit` concurrent units of work; never queues. Event-loop confined."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("a gate's limit must be at least 1")
        self.limit = limit
        self.in_flight = 0

    def try_enter(self, units: int = 1) -> bool:
        """Take `units` slots and return True, or return False at once when they are not all
        free. Work larger than the whole limit is admitted only alone (as `limit` units)."""
        units = self.weight(units)
        if self.in_flight + units > self.limit:
            return False
        self.in_flight += units
        return True

    def leave(self, units: int = 1) -> None:
        units = self.weight(units)
        if self.in_flight < units:
            raise RuntimeError("Gate.leave() without a matching try_enter()")
        self.in_flight -= units

    def weight(self, units: int) -> int:
        """The slots `units` of work take: at least 1, at most the limit."""
        return max(1, min(units, self.limit))


def backstop(max_in_flight: int, max_watchers: int) -> int:
    """The process-wide hard limit behind the gates (gRPC's `maximum_concurrent_rpcs`,
    uvicorn's `limit_concurrency`): it only acts when something bypasses them."""
    return max_in_flight + max_watchers + BACKSTOP_HEADROOM
