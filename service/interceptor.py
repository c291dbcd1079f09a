"""What happens around every RPC: its request id, load shedding, metrics and an access line.

:class:`CallInterceptor` wraps each method handler the server finds. Per call it

1. takes the caller's request id from the ``x-request-id`` metadata (the bridge sends the HTTP
   request's; another caller may send its own) or makes one, and sets it in
   :data:`casledger.service.logs.request_id` for every line logged while serving the call;
2. admits the call through a :class:`~casledger.service.limits.Gate` — unary calls of the Ledger
   service through one (a Batch takes a slot per operation: it is that many calls' work, and so
   does each batch of a BatchStream, admitted by the servicer through :meth:`admit`), its
   long-lived streams (Watch, BatchStream) through another — or refuses it at once with
   RESOURCE_EXHAUSTED, reason OVERLOADED and ``retry_after_s`` (health checks and reflection are
   not limited: they must answer while the service is busy);
3. records its status code (and the ErrorInfo reason of a refusal) and duration in
   :class:`~casledger.service.metrics.ServiceMetrics`, and logs one line to
   ``casledger.access.grpc``.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing, suppress
from contextvars import Token
from typing import Any, TypeAlias

import grpc

from . import errors, logs
from .api.casledger.v1 import ledger_pb2 as pb
from .client import LedgerCallError
from .limits import RETRY_AFTER_S, Gate
from .metrics import ServiceMetrics
from .servicer import peer_of, to_status

LIMITED_PREFIX = "/casledger.v1.Ledger/"
BATCH_STREAM = "casledger.v1.Ledger/BatchStream"
_SERVER_FAULTS = frozenset({grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL,
                            grpc.StatusCode.DATA_LOSS})

access_log = logging.getLogger(logs.GRPC_ACCESS)

Context: TypeAlias = grpc.aio.ServicerContext


class CallInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Request id, load shedding, metrics and the access log of every call (module docstring)."""

    def __init__(self, metrics: ServiceMetrics, *, max_in_flight: int,
                 max_watchers: int) -> None:
        self.metrics = metrics
        self.unary = Gate(max_in_flight)
        self.streams = Gate(max_watchers)

    def record(self, rpc: str, code: grpc.StatusCode, reason: str, duration: float, peer: str,
               request_id: str) -> None:
        """Count a call (or one operation of a Batch) and write its access-log line."""
        self.metrics.observe(rpc, code.name, reason, duration)
        level = logging.ERROR if code in _SERVER_FAULTS else logging.INFO
        if access_log.isEnabledFor(level):
            access_log.log(level, "%s %s", rpc, code.name, extra={
                "rpc": rpc, "code": code.name, "reason": reason or None,
                "duration_ms": round(duration * 1000, 3), "peer": peer or None,
                "request_id": request_id})

    def refusal(self, rpc: str, gate: Gate, units: int) -> errors.Overloaded:
        """Count a call (or a BatchStream's batch) refused for want of `units` slots of `gate`,
        and say why."""
        self.metrics.shed.labels(rpc).inc()
        what = "Watch and BatchStream streams" if gate is self.streams else "calls"
        if units > 1:
            what += f" (a Batch takes one per operation: this one {gate.weight(units)})"
        return errors.Overloaded(limit=gate.limit, what=what, retry_after_s=RETRY_AFTER_S)

    def admit(self, units: int) -> None:
        """Take `units` slots of the unary calls' gate for one batch of a BatchStream (the
        servicer's BatchSlots); raise Overloaded when they are not free."""
        if not self.unary.try_enter(units):
            raise self.refusal(BATCH_STREAM, self.unary, units)

    def leave(self, units: int) -> None:
        """Give back the slots of a BatchStream's batch."""
        self.unary.leave(units)

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]],
                                details: Any) -> Any:
        handler = await continuation(details)
        if handler is None:  # not a method this server has: gRPC answers UNIMPLEMENTED
            return None
        method: str = details.method
        call = _Call(self, method.lstrip("/"), _request_id(details.invocation_metadata))
        limited = method.startswith(LIMITED_PREFIX)
        if handler.unary_unary is not None:
            return handler._replace(unary_unary=call.unary(
                handler.unary_unary, self.unary if limited else None))
        if handler.unary_stream is not None:
            return handler._replace(unary_stream=call.stream(
                handler.unary_stream, self.streams if limited else None))
        if handler.stream_stream is not None:  # BatchStream: long-lived, held like a Watch
            return handler._replace(stream_stream=call.stream(
                handler.stream_stream, self.streams if limited else None))
        return handler


def _request_id(metadata: Any) -> str:
    for key, value in metadata or ():
        if key == logs.REQUEST_ID_KEY and isinstance(value, str):
            return logs.accept_request_id(value)
    return logs.new_request_id()


class _Call:
    """One call's observation: started when its handler runs; finished — recorded, its slot
    given back — as soon as its outcome is known, before gRPC sends it (an abort sends the
    status from inside ``abort``), so a client that has its answer sees it counted and logged
    and may call again at once."""

    def __init__(self, interceptor: CallInterceptor, rpc: str, request_id: str) -> None:
        self.interceptor = interceptor
        self.rpc = rpc
        self.request_id = request_id
        self.peer = ""
        self.started = 0.0
        self.slot: Gate | None = None
        self.units = 1
        self.finished = False

    def unary(self, behavior: Callable[[Any, Context], Awaitable[Any]], gate: Gate | None
              ) -> Callable[[Any, Context], Awaitable[Any]]:
        async def handle(request: Any, context: Context) -> Any:
            token = self._begin(context)
            observed = _ObservedContext(context, self)
            try:
                await self._admit(gate, observed, _units(request))
                response = await behavior(request, observed)
                self.finish(_code(context), "")
                return response
            except BaseException as exc:
                self.finish(*_outcome(context, exc))
                raise
            finally:
                logs.request_id.reset(token)

        return handle

    def stream(self, behavior: Callable[[Any, Context], Any], gate: Gate | None
               ) -> Callable[[Any, Context], AsyncIterator[Any]]:
        async def handle(request: Any, context: Context) -> AsyncIterator[Any]:
            token = self._begin(context)
            observed = _ObservedContext(context, self)
            try:
                await self._admit(gate, observed)
                result = behavior(request, observed)
                if inspect.isasyncgen(result):
                    async with aclosing(result):
                        async for response in result:
                            yield response
                else:  # a handler that writes with context.write() (grpc_health's Watch)
                    await result
                self.finish(_code(context), "")
            except BaseException as exc:
                self.finish(*_outcome(context, exc))
                raise
            finally:
                # A stream the client cancelled is closed from another context (GeneratorExit
                # via athrow), where the token cannot be reset: that context ends anyway.
                with suppress(ValueError):
                    logs.request_id.reset(token)

        return handle

    def _begin(self, context: Context) -> Token[str]:
        self.started = time.perf_counter()
        self.peer = peer_of(context)
        return logs.request_id.set(self.request_id)

    async def _admit(self, gate: Gate | None, context: _ObservedContext, units: int = 1) -> None:
        """Take `units` slots of `gate` (none to take: None), or refuse the call (raising)."""
        if gate is None:
            return
        if gate.try_enter(units):
            self.slot, self.units = gate, units
            return
        await context.abort_with_status(to_status(self.interceptor.refusal(self.rpc, gate,
                                                                           units)))
        raise AssertionError("abort_with_status returns only by raising")

    def finish(self, code: grpc.StatusCode, reason: str) -> None:
        """Give the slot back, count the call and log its line; only the first time."""
        if self.finished:
            return
        self.finished = True
        if self.slot is not None:
            self.slot.leave(self.units)
        self.interceptor.record(self.rpc, code, reason, time.perf_counter() - self.started,
                                self.peer, self.request_id)


class _ObservedContext:
    """The context the handler sees: the real one, except that an abort finishes the call's
    observation before it sends the status."""

    def __init__(self, context: Context, call: _Call) -> None:
        self._context = context
        self._call = call

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)

    async def abort(self, code: grpc.StatusCode, details: str = "",
                    trailing_metadata: Any = ()) -> None:
        self._call.finish(code, _reason(trailing_metadata))
        await self._context.abort(code, details, trailing_metadata)

    async def abort_with_status(self, status: grpc.Status) -> None:
        self._call.finish(status.code, _reason(status.trailing_metadata))
        await self._context.abort_with_status(status)


def _units(request: Any) -> int:
    """The slots a unary call takes: one, or a Batch's number of operations."""
    return len(request.operations) if isinstance(request, pb.BatchRequest) else 1


def _code(context: Context) -> grpc.StatusCode:
    code = context.code()
    return code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.OK


def _outcome(context: Context, exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status a call ends with when its handler raised, and its ErrorInfo reason."""
    if isinstance(exc, asyncio.CancelledError | GeneratorExit):
        return grpc.StatusCode.CANCELLED, ""
    code = context.code()
    if not isinstance(code, grpc.StatusCode) or code is grpc.StatusCode.OK:
        return grpc.StatusCode.UNKNOWN, ""  # gRPC's answer to an exception it did not expect
    return code, _reason(context.trailing_metadata())


def _reason(trailing: Any) -> str:
    """The ErrorInfo reason in a status's trailing metadata ("" without one), read the way the
    client reads it."""
    return LedgerCallError.from_status(grpc.StatusCode.UNKNOWN, "", trailing).reason
