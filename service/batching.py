"""Many concurrent calls, few gRPC calls: single-resource calls travel in ``Batch`` calls.

A unary gRPC call costs the client and the service each about as much CPU as the HTTP request
the bridge serves with it, so one call per request caps the bridge near the raw unary rate.
:class:`BatchingClient` (what ``connect(..., batching=True)`` gives; the HTTP bridge uses it) is a
:class:`~casledger.service.client.LedgerClient` whose single-resource calls (GetResource,
CreateResource, UpdateResource, DeleteResource) are carried in ``Batch`` calls:

- calls wait in a queue per caller identity (the call metadata, ``call_metadata``, without the
  request id: in the bridge, each HTTP request's Authorization), one principal per ``Batch``
  call, as the service authorizes it;
- a queue sends at once while fewer than ``max_calls`` of its ``Batch`` calls are in flight;
  otherwise its calls wait, and the next ``Batch`` call carries every call waiting then (up to
  ``max_ops`` and ``max_bytes``);
- each call keeps its own outcome: the Resource, or exactly the error its unary call would
  have raised. The service runs the operations of a ``Batch`` as independent calls made at the
  same moment (no transaction, no order among them), each inside its HTTP request's lifetime,
  so batching changes no answer a client can see;
- a call larger than ``max_bytes`` goes unary, and so does everything once the service answers
  ``Batch`` with UNIMPLEMENTED (an older service).

A failure of the ``Batch`` call itself (UNAVAILABLE, a deadline) is every operation's failure,
as it would have been for each unary call.

Each call keeps its own deadline, ``call_timeout`` from when it was made, however long it waited
in the queue: a ``Batch`` call's deadline is the latest of its calls', and a call whose deadline
passes first fails then with DEADLINE_EXCEEDED, as its unary call would have (like that one, its
operation may still have been applied).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import grpc

from .api.casledger.v1 import ledger_pb2 as pb
from .client import LedgerCallError, LedgerClient, R, call_metadata
from .logs import REQUEST_ID_KEY

log = logging.getLogger("casledger.client")

# The unary methods a Batch carries, by the BatchOperation field that holds each request.
BATCHED = {"GetResource": "get", "CreateResource": "create", "UpdateResource": "update",
           "DeleteResource": "delete"}

Identity = tuple[tuple[str, str], ...]


@dataclass(slots=True)
class _Call:
    method: str
    request: Any
    size: int
    call_id: str
    outcome: asyncio.Future[pb.Resource]
    deadline: float  # loop time


@dataclass(slots=True)
class _Queue:
    calls: deque[_Call] = field(default_factory=deque)
    in_flight: int = 0


class BatchingClient(LedgerClient):
    """A :class:`LedgerClient` whose single-resource calls are batched (module docstring)."""

    def __init__(self, channel: grpc.aio.Channel, *, call_timeout: float, max_ops: int = 64,
                 max_bytes: int = 256 << 10, max_calls: int = 2) -> None:
        super().__init__(channel, call_timeout=call_timeout)
        self.max_ops, self.max_bytes, self.max_calls = max_ops, max_bytes, max_calls
        self._queues: dict[Identity, _Queue] = {}
        self._unsupported = False
        self._runners: set[asyncio.Task[None]] = set()
        self.batches = 0
        self.batched_calls = 0

    async def _call(self, method: str, request: Any, returns: type[R]) -> R:
        size = request.ByteSize()
        if method not in BATCHED or self._unsupported or size > self.max_bytes:
            return await super()._call(method, request, returns)
        # The request id stays out of the identity (it differs per request): each operation
        # carries its own, and the service logs the operation's line with it.
        metadata = call_metadata.get()
        identity = tuple(pair for pair in metadata if pair[0] != REQUEST_ID_KEY)
        call_id = next((value for key, value in metadata if key == REQUEST_ID_KEY), "")
        queue = self._queues.get(identity)
        if queue is None:
            queue = self._queues[identity] = _Queue()
        loop = asyncio.get_running_loop()
        outcome: asyncio.Future[pb.Resource] = loop.create_future()
        call = _Call(method, request, size, call_id, outcome, loop.time() + self.call_timeout)
        queue.calls.append(call)
        if queue.in_flight < self.max_calls:
            queue.in_flight += 1
            runner = asyncio.create_task(self._run(identity, queue))
            self._runners.add(runner)
            runner.add_done_callback(self._runners.discard)
        timer = loop.call_at(call.deadline, _expire, outcome)
        try:
            response = await outcome
        finally:
            timer.cancel()
        assert isinstance(response, returns)
        return response

    async def _run(self, identity: Identity, queue: _Queue) -> None:
        """Send what the queue holds, again and again until it is empty."""
        try:
            while queue.calls:
                await self._send(identity, self._take(queue))
        finally:
            queue.in_flight -= 1
            if not queue.in_flight and not queue.calls:
                self._queues.pop(identity, None)

    def _take(self, queue: _Queue) -> list[_Call]:
        calls: list[_Call] = []
        size = 0
        while queue.calls and len(calls) < self.max_ops and (
                not calls or size + queue.calls[0].size <= self.max_bytes):
            call = queue.calls.popleft()
            if not call.outcome.done():  # its request went away before it was sent
                calls.append(call)
                size += call.size
        return calls

    async def _send(self, identity: Identity, calls: list[_Call]) -> None:
        if not calls:
            return
        request = pb.BatchRequest(operations=[
            pb.BatchOperation(call_id=call.call_id, **{BATCHED[call.method]: call.request})
            for call in calls])
        self.batches += 1
        self.batched_calls += len(calls)
        try:
            reply = await self.stub.Batch(
                request, timeout=_remaining(max(call.deadline for call in calls)),
                metadata=identity)
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.UNIMPLEMENTED:
                self._unsupported = True
                await asyncio.gather(*(self._unary(call, identity) for call in calls))
                return
            _fail(calls, LedgerCallError.from_rpc_error(error))
            return
        except asyncio.CancelledError:  # at shutdown: no caller is left waiting
            for call in calls:
                call.outcome.cancel()
            raise
        except Exception as exc:  # a bug: every caller gets it rather than hanging
            log.error("a Batch call failed unexpectedly", exc_info=exc)
            _fail(calls, exc)
            return
        if len(reply.results) != len(calls):
            _fail(calls, LedgerCallError(grpc.StatusCode.INTERNAL, "the service answered a "
                                         "Batch with the wrong number of results", "", {}))
            return
        for call, result in zip(calls, reply.results, strict=True):
            if call.outcome.done():
                continue
            if result.HasField("resource"):
                call.outcome.set_result(result.resource)
            else:
                call.outcome.set_exception(LedgerCallError.from_status_message(result.status))

    async def _unary(self, call: _Call, identity: Identity) -> None:
        try:
            response = await getattr(self.stub, call.method)(
                call.request, timeout=_remaining(call.deadline),
                metadata=(*identity, (REQUEST_ID_KEY, call.call_id)) if call.call_id
                else identity)
        except grpc.aio.AioRpcError as error:
            _fail([call], LedgerCallError.from_rpc_error(error))
        else:
            if not call.outcome.done():
                call.outcome.set_result(response)

    async def aclose(self) -> None:
        """Wait for the Batch calls in flight (at shutdown, before the channel closes)."""
        while self._runners:
            await asyncio.wait(set(self._runners))


def _remaining(deadline: float) -> float:
    """Seconds to `deadline` (loop time), for a gRPC timeout (which must be positive)."""
    return max(deadline - asyncio.get_running_loop().time(), 0.001)


def _expire(outcome: asyncio.Future[pb.Resource]) -> None:
    """A call's deadline passed before its Batch answered: it fails as a unary call would."""
    if not outcome.done():
        outcome.set_exception(LedgerCallError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                              "Deadline Exceeded"))


def _fail(calls: list[_Call], exc: BaseException) -> None:
    for call in calls:
        if not call.outcome.done():
            call.outcome.set_exception(exc)
