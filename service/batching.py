"""Many concurrent calls, few gRPC messages: single-resource calls travel in batches.

A unary gRPC call costs the client and the service each about as much CPU as the HTTP request
the bridge serves with it, so one call per request caps the bridge near the raw unary rate.
:class:`BatchingClient` (what ``connect(..., batching=True)`` gives; the HTTP bridge uses it) is a
:class:`~casledger.service.client.LedgerClient` whose single-resource calls (GetResource,
CreateResource, UpdateResource, DeleteResource) are carried in batches:

- calls wait in a queue per caller identity (the call metadata, ``call_metadata``, without the
  request id: in the bridge, each HTTP request's Authorization), one principal per batch, as the
  service authorizes it;
- a queue sends at once while fewer than ``max_calls`` of its batches are in flight; otherwise
  its calls wait, and the next batch carries every call waiting then (up to ``max_ops`` and
  ``max_bytes``);
- each batch is a message of the identity's ``BatchStream``, a bidirectional stream opened with
  the first batch and kept while it is used (closed after STREAM_IDLE_S unused): a message costs
  both sides far less than a call. Replies come back by id, as each batch finishes. Against a
  service without BatchStream (UNIMPLEMENTED), each batch is a ``Batch`` call instead;
- each call keeps its own outcome: the Resource, or exactly the error its unary call would
  have raised. The service runs the operations of a batch as independent calls made at the
  same moment (no transaction, no order among them), each inside its HTTP request's lifetime,
  so batching changes no answer a client can see;
- a call larger than ``max_bytes`` goes unary, and so does everything once the service answers
  ``Batch`` with UNIMPLEMENTED too (an older service still).

A failure of the carrier (the stream or the Batch call: UNAVAILABLE, a deadline) is every
operation's failure, as it would have been for each unary call. A batch the service never read
(the stream ended, cleanly, before it; or it was never written) fails UNAVAILABLE and did not
run.

Each call keeps its own deadline, ``call_timeout`` from when it was made, however long it waited
in the queue: a batch waits for its reply until the latest of its calls' deadlines, and a call
whose deadline passes first fails then with DEADLINE_EXCEEDED, as its unary call would have
(like that one, its operation may still have been applied). A stream on which a batch went
unanswered that long is dropped; the next batch opens a new one.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any

import grpc

from .api.casledger.v1 import ledger_pb2 as pb
from .client import LedgerCallError, LedgerClient, R, call_metadata
from .logs import REQUEST_ID_KEY

log = logging.getLogger("casledger.client")

# A stream unused this long is closed (a caller identity that went quiet keeps none open).
STREAM_IDLE_S = 30.0
# How long closing a stream waits for the service to end it.
STREAM_CLOSE_S = 2.0

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


class _Stream:
    """One BatchStream call of one identity: each batch is written to it with an id, and its
    reader task hands each reply to the batch waiting for that id."""

    def __init__(self, call: Any) -> None:
        self.call = call
        self.writing = asyncio.Lock()  # one write at a time
        self.waiting: dict[int, asyncio.Future[pb.BatchStreamResponse]] = {}
        self.next_id = 0
        self.last_used = asyncio.get_running_loop().time()
        # Why the stream ended (every batch still waiting then failed with it), None while open.
        self.ended: BaseException | None = None
        self.reader = asyncio.ensure_future(self._read())

    async def send(self, operations: list[pb.BatchOperation], deadline: float
                   ) -> pb.BatchStreamResponse | None:
        """The reply to one batch; None when `deadline` (loop time) passed first. Raises the
        stream's failure (a LedgerCallError) when it ended before the reply."""
        self.next_id += 1
        batch_id = self.next_id
        loop = asyncio.get_running_loop()
        self.last_used = loop.time()
        waiter: asyncio.Future[pb.BatchStreamResponse] = loop.create_future()
        self.waiting[batch_id] = waiter
        try:
            async with asyncio.timeout_at(deadline):
                try:
                    async with self.writing:
                        await self.call.write(pb.BatchStreamRequest(id=batch_id,
                                                                    operations=operations))
                except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                    pass  # the stream has ended: the reader says how
                if self.ended is not None and not waiter.done():
                    raise self.ended  # ended before this batch was written: none of it ran
                return await waiter
        except TimeoutError:
            if self.ended is None:  # (the timeout cancelled `waiter`)
                # No answer in time, perhaps not even written (a service that does not answer,
                # or holds back the stream): drop the stream, the next batch takes a new one.
                self.ended = LedgerCallError(
                    grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded (a batch on the same "
                    "stream went unanswered, and the stream was dropped)")
                self.call.cancel()
            return None
        finally:
            self.waiting.pop(batch_id, None)

    async def _read(self) -> None:
        error: BaseException
        try:
            while (reply := await self.call.read()) is not grpc.aio.EOF:
                waiter = self.waiting.pop(reply.id, None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(reply)
            # The service ended the stream (shutting down): the batches it did not answer were
            # not taken.
            error = LedgerCallError(grpc.StatusCode.UNAVAILABLE, "the service closed the "
                                    "BatchStream before taking this batch (shutting down?)")
        except grpc.aio.AioRpcError as exc:
            error = LedgerCallError.from_rpc_error(exc)
        except asyncio.CancelledError:
            error = LedgerCallError(grpc.StatusCode.CANCELLED, "the client is closing")
        except Exception as exc:  # a bug: every waiting batch gets it rather than hanging
            log.error("a BatchStream failed unexpectedly", exc_info=exc)
            error = exc
        if self.ended is None:
            self.ended = error
        for waiter in self.waiting.values():
            if not waiter.done():
                waiter.set_exception(self.ended)

    async def close(self) -> None:
        """Half-close: the service answers what it took, then ends the stream (cut after
        STREAM_CLOSE_S)."""
        with suppress(TimeoutError, grpc.aio.AioRpcError, asyncio.InvalidStateError):
            async with asyncio.timeout(STREAM_CLOSE_S):
                await self.call.done_writing()
                await asyncio.shield(self.reader)
        self.call.cancel()
        self.reader.cancel()


@dataclass(slots=True)
class _Queue:
    calls: deque[_Call] = field(default_factory=deque)
    in_flight: int = 0


class BatchingClient(LedgerClient):
    """A :class:`LedgerClient` whose single-resource calls are batched (module docstring)."""

    def __init__(self, channel: grpc.aio.Channel, *, call_timeout: float, max_ops: int = 64,
                 max_bytes: int = 256 << 10, max_calls: int = 2, streams: bool = True) -> None:
        super().__init__(channel, call_timeout=call_timeout)
        self.max_ops, self.max_bytes, self.max_calls = max_ops, max_bytes, max_calls
        self._queues: dict[Identity, _Queue] = {}
        self._unsupported = False
        self._runners: set[asyncio.Task[None]] = set()
        self._streams: dict[Identity, _Stream] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self._no_streams = not streams
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
        operations = [
            pb.BatchOperation(call_id=call.call_id, **{BATCHED[call.method]: call.request})
            for call in calls]
        self.batches += 1
        self.batched_calls += len(calls)
        try:
            results = await (self._in_call(identity, calls, operations) if self._no_streams
                             else self._on_stream(identity, calls, operations))
        except LedgerCallError as error:
            _fail(calls, error)
            return
        except asyncio.CancelledError:  # at shutdown: no caller is left waiting
            for call in calls:
                call.outcome.cancel()
            raise
        except Exception as exc:  # a bug: every caller gets it rather than hanging
            log.error("a batch failed unexpectedly", exc_info=exc)
            _fail(calls, exc)
            return
        if results is not None:
            _deliver(calls, results)

    async def _on_stream(self, identity: Identity, calls: list[_Call],
                         operations: list[pb.BatchOperation]) -> Sequence[pb.BatchResult] | None:
        """The batch's results by the identity's stream; None once every call has been
        answered otherwise (its deadline, or unary calls); LedgerCallError for the batch."""
        stream = self._streams.get(identity)
        if stream is None or stream.ended is not None:
            stream = self._streams[identity] = _Stream(self.stub.BatchStream(metadata=identity))
            asyncio.get_running_loop().call_later(STREAM_IDLE_S, self._reap, identity, stream)
        try:
            reply = await stream.send(operations, max(call.deadline for call in calls))
        except LedgerCallError as error:
            if error.code == grpc.StatusCode.UNIMPLEMENTED:
                self._no_streams = True  # an older service: Batch calls
                self._streams.pop(identity, None)
            elif error.reason != "OVERLOADED":
                raise
            # The stream itself was refused (the service holds its most long-lived streams;
            # a refusal of the batch would have come as its reply's status): nothing ran, and
            # a Batch call is not bound by that limit.
            return await self._in_call(identity, calls, operations)
        if reply is None:
            return None  # every call's deadline has passed: each one's timer failed it
        if reply.HasField("status"):
            raise LedgerCallError.from_status_message(reply.status)
        return reply.results

    async def _in_call(self, identity: Identity, calls: list[_Call],
                       operations: list[pb.BatchOperation]) -> Sequence[pb.BatchResult] | None:
        """The batch's results by a Batch call (as _on_stream)."""
        try:
            reply: pb.BatchResponse = await self.stub.Batch(
                pb.BatchRequest(operations=operations),
                timeout=_remaining(max(call.deadline for call in calls)), metadata=identity)
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.UNIMPLEMENTED:
                raise LedgerCallError.from_rpc_error(error) from None
            self._unsupported = True  # older still: unary calls
            await asyncio.gather(*(self._unary(call, identity) for call in calls))
            return None
        return reply.results

    def _reap(self, identity: Identity, stream: _Stream) -> None:
        """Close `stream` once it has been idle STREAM_IDLE_S (check again later if not), and
        forget it once it has ended, so that an identity gone quiet keeps nothing."""
        if self._streams.get(identity) is not stream:
            return  # replaced, or the client is closing
        loop = asyncio.get_running_loop()
        idle = loop.time() - stream.last_used
        if stream.ended is None and (idle < STREAM_IDLE_S or stream.waiting):
            loop.call_later(STREAM_IDLE_S - min(idle, STREAM_IDLE_S / 2), self._reap,
                            identity, stream)
            return
        del self._streams[identity]
        if stream.ended is not None:
            return
        closing = asyncio.ensure_future(stream.close())
        self._closing.add(closing)
        closing.add_done_callback(self._closing.discard)

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
        """Wait for the batches in flight, then close the streams (at shutdown, before the
        channel closes)."""
        while self._runners:
            await asyncio.wait(set(self._runners))
        streams, self._streams = list(self._streams.values()), {}
        await asyncio.gather(*(stream.close() for stream in streams), *self._closing)


def _remaining(deadline: float) -> float:
    """Seconds to `deadline` (loop time), for a gRPC timeout (which must be positive)."""
    return max(deadline - asyncio.get_running_loop().time(), 0.001)


def _expire(outcome: asyncio.Future[pb.Resource]) -> None:
    """A call's deadline passed before its Batch answered: it fails as a unary call would."""
    if not outcome.done():
        outcome.set_exception(LedgerCallError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                              "Deadline Exceeded"))


def _deliver(calls: list[_Call], results: Any) -> None:
    if len(results) != len(calls):
        _fail(calls, LedgerCallError(grpc.StatusCode.INTERNAL, "the service answered a "
                                     "Batch with the wrong number of results", "", {}))
        return
    for call, result in zip(calls, results, strict=True):
        if call.outcome.done():
            continue
        if result.HasField("resource"):
            call.outcome.set_result(result.resource)
        else:
            call.outcome.set_exception(LedgerCallError.from_status_message(result.status))


def _fail(calls: list[_Call], exc: BaseException) -> None:
    for call in calls:
        if not call.outcome.done():
            call.outcome.set_exception(exc)
