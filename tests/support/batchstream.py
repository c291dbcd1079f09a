"""Raw BatchStream calls for tests of the service: batches written with the ids given, the
replies collected by id."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc

from casledger.service.api.casledger.v1 import ledger_pb2 as pb
from casledger.service.api.casledger.v1 import ledger_pb2_grpc as pb_grpc
from casledger.service.client import LedgerCallError, LedgerClient, call_metadata


async def stream_batches(channel: grpc.aio.Channel,
                         batches: Sequence[tuple[int, Sequence[pb.BatchOperation]]],
                         metadata: Sequence[tuple[str, str]] = ()
                         ) -> dict[int, pb.BatchStreamResponse]:
    """Write every batch on one new stream, half-close it, and return the replies by id."""
    call: Any = pb_grpc.LedgerStub(channel).BatchStream(metadata=tuple(metadata), timeout=10)
    for batch_id, operations in batches:
        await call.write(pb.BatchStreamRequest(id=batch_id, operations=operations))
    await call.done_writing()
    replies: dict[int, pb.BatchStreamResponse] = {}
    while (reply := await call.read()) is not grpc.aio.EOF:
        assert reply.id not in replies, f"batch {reply.id} answered twice"
        replies[reply.id] = reply
    assert await call.code() == grpc.StatusCode.OK
    return replies


def outcomes(reply: pb.BatchStreamResponse) -> list[pb.Resource | LedgerCallError]:
    """A batch's results as LedgerClient.batch gives them (the batch must have been taken)."""
    assert not reply.HasField("status"), reply.status
    return [result.resource if result.HasField("resource")
            else LedgerCallError.from_status_message(result.status) for result in reply.results]


async def stream_one(client: LedgerClient, operations: Sequence[pb.BatchOperation]
                     ) -> list[pb.Resource | LedgerCallError]:
    """One batch on a new stream, with this task's call metadata (its token): its outcomes,
    or the batch's refusal raised as the LedgerCallError its Batch call would have raised."""
    replies = await stream_batches(client.channel, [(1, operations)], call_metadata.get())
    if replies[1].HasField("status"):
        raise LedgerCallError.from_status_message(replies[1].status)
    return outcomes(replies[1])
