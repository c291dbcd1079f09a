"""The gRPC servicer: requests in, domain calls, resources out; domain errors -> gRPC status.

Every ``LedgerError`` leaves this module as a gRPC status whose details carry a
``google.rpc.ErrorInfo`` (domain ``casledger.dev``) with the error's reason and metadata; the code
comes from :data:`GRPC_CODES`, the one table for this boundary.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextvars import ContextVar
from typing import Any, Protocol, TypeVar

import grpc
from google.protobuf import any_pb2, timestamp_pb2
from google.protobuf.message import Message
from google.protobuf.unknown_fields import UnknownFieldSet
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from . import auth, errors, logs, model
from . import content as content_rules
from . import patch as patch_rules
from .api.casledger.v1 import ledger_pb2 as pb
from .api.casledger.v1 import ledger_pb2_grpc as pb_grpc
from .client import WATCH_REVISION_KEY
from .storage import Store
from .watch import watch

log = logging.getLogger("casledger.server")

ERROR_DOMAIN = "casledger.dev"

# Most specific first is not needed: every concrete error class is listed (a test checks it).
GRPC_CODES: dict[type[errors.LedgerError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.InvalidName: grpc.StatusCode.INVALID_ARGUMENT,
    errors.InvalidContent: grpc.StatusCode.INVALID_ARGUMENT,
    errors.InvalidPageToken: grpc.StatusCode.INVALID_ARGUMENT,
    errors.InvalidPrecondition: grpc.StatusCode.INVALID_ARGUMENT,
    errors.InvalidPatch: grpc.StatusCode.INVALID_ARGUMENT,
    errors.UnsupportedPatchType: grpc.StatusCode.INVALID_ARGUMENT,
    errors.UnknownField: grpc.StatusCode.INVALID_ARGUMENT,
    errors.ContentTooLarge: grpc.StatusCode.INVALID_ARGUMENT,
    errors.IdempotencyKeyReused: grpc.StatusCode.INVALID_ARGUMENT,
    errors.PreconditionRequired: grpc.StatusCode.FAILED_PRECONDITION,
    errors.VersionMismatch: grpc.StatusCode.ABORTED,
    errors.ModifiedSince: grpc.StatusCode.ABORTED,
    errors.ResourceAlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.ResourceNotFound: grpc.StatusCode.NOT_FOUND,
    errors.PatchConflict: grpc.StatusCode.FAILED_PRECONDITION,
    errors.WatcherTooSlow: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.ShuttingDown: grpc.StatusCode.UNAVAILABLE,
    errors.StorageUnavailable: grpc.StatusCode.UNAVAILABLE,
    errors.Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
}

# The authenticated principal of the call being handled (each RPC runs in a task of its own).
_principal: ContextVar[str] = ContextVar("casledger_principal", default=model.ANONYMOUS)


def grpc_code(error: errors.LedgerError) -> grpc.StatusCode:
    return GRPC_CODES.get(type(error), grpc.StatusCode.INTERNAL)


# The status travels in trailers, and clients refuse metadata past 8-16 KiB (the call then fails
# with RESOURCE_EXHAUSTED and no ErrorInfo): what an error quotes of its input is cut short.
MAX_MESSAGE_BYTES = 1000
MAX_BATCH_OPERATIONS = 256
WRITE_KINDS = {"CreateResource": model.WriteKind.CREATE, "UpdateResource": model.WriteKind.UPDATE,
               "DeleteResource": model.WriteKind.DELETE}
WriteRequest = pb.CreateResourceRequest | pb.UpdateResourceRequest | pb.DeleteResourceRequest
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Ledger"].full_name
# rpc, code, ErrorInfo reason, seconds, peer, request id: how a Batch operation is recorded.
Observe = Callable[[str, grpc.StatusCode, str, float, str, str], None]


class BatchSlots(Protocol):
    """The slots of the unary calls' gate a BatchStream's batch takes (the interceptor's)."""

    def admit(self, units: int) -> None:
        """Take `units` slots, or raise errors.Overloaded."""

    def leave(self, units: int) -> None:
        """Give back slots `admit` took."""


# The unary method each BatchOperation field holds.
BATCH_METHODS = {"get": "GetResource", "create": "CreateResource", "update": "UpdateResource",
                 "delete": "DeleteResource"}
MAX_METADATA_VALUE_BYTES = 600


def bounded(text: str, limit: int) -> str:
    """`text`, cut to at most `limit` bytes of UTF-8 (ending in "...") when longer."""
    data = text.encode()
    if len(data) <= limit:
        return text
    return data[:limit - 3].decode(errors="ignore") + "..."


def to_status(error: errors.LedgerError) -> grpc.Status:
    """The gRPC status of a domain error, ErrorInfo in its details."""
    return rpc_status.to_status(status_message(error))


def status_message(error: errors.LedgerError) -> status_pb2.Status:
    """The google.rpc.Status of a domain error (what a Batch result carries)."""
    metadata = {key: bounded(value, MAX_METADATA_VALUE_BYTES)
                for key, value in error.metadata().items()}
    info = error_details_pb2.ErrorInfo(reason=error.reason, domain=ERROR_DOMAIN, metadata=metadata)
    detail = any_pb2.Any()
    detail.Pack(info)
    code = grpc_code(error)
    return status_pb2.Status(code=code.value[0], message=bounded(error.message,
                                                                 MAX_MESSAGE_BYTES),
                             details=[detail])


def timestamp(us: int) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=us // 1_000_000, nanos=us % 1_000_000 * 1000)


def to_resource(v: model.Version, *, content: bool = True) -> pb.Resource:
    return pb.Resource(
        name=v.name, version=v.version, revision=v.revision,
        content=v.content if content else b"", content_type=v.content_type,
        create_time=timestamp(v.create_time_us), update_time=timestamp(v.update_time_us),
        deleted=v.deleted, etag=v.etag, actor=v.actor, reason=v.reason, hash=v.hash.hex(),
        previous_hash=v.previous_hash.hex(), ledger_previous_hash=v.ledger_previous_hash.hex(),
        size_bytes=v.size,
    )


class Unparseable:
    """What the tolerant deserializer hands the servicer for bytes that are not the request."""

    def __init__(self, problem: str) -> None:
        self.problem = problem


def tolerant(cls: type[Message]) -> Callable[[bytes], Message | Unparseable]:
    """A request deserializer that never raises: gRPC would answer UNKNOWN, without ErrorInfo,
    for an exception raised while parsing; the servicer turns Unparseable into
    INVALID_ARGUMENT instead."""

    def deserialize(data: bytes) -> Message | Unparseable:
        try:
            return cls.FromString(data)
        except Exception as exc:  # DecodeError, or a RuntimeError from upb
            return Unparseable(str(exc) or type(exc).__name__)

    return deserialize


def check_request(request: Message | Unparseable) -> None:
    """Refuse requests that did not parse, or that carry fields this server does not know."""
    if isinstance(request, Unparseable):
        raise errors.InvalidArgument(
            f"the request could not be parsed ({request.problem})", field="request"
        )
    reject_unknown_fields(request)


def add_to_server(servicer: LedgerServicer, server: grpc.aio.Server) -> None:
    """Register the Ledger service with tolerant deserializers (see :func:`tolerant`)."""
    service = pb.DESCRIPTOR.services_by_name["Ledger"]
    handlers = {}
    for method in service.methods:
        request_cls = getattr(pb, method.input_type.name)
        response_cls = getattr(pb, method.output_type.name)
        make = (grpc.stream_stream_rpc_method_handler if method.client_streaming
                else grpc.unary_stream_rpc_method_handler if method.server_streaming
                else grpc.unary_unary_rpc_method_handler)
        handlers[method.name] = make(
            getattr(servicer, method.name), request_deserializer=tolerant(request_cls),
            response_serializer=response_cls.SerializeToString,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name,
                                                                          handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)


def reject_unknown_fields(message: Message, path: str = "") -> None:
    """Unknown fields mean a client speaks a contract this server does not: refuse, loudly."""
    unknown = UnknownFieldSet(message)
    if len(unknown):
        where = f" in {path}" if path else ""
        raise errors.UnknownField(
            f"unknown field number {unknown[0].field_number}{where}: this server does not "
            "understand it", field=path or "request",
        )
    for descriptor, value in message.ListFields():
        if descriptor.message_type is None:
            continue
        child = f"{path}.{descriptor.name}" if path else descriptor.name
        items = value if descriptor.is_repeated else [value]
        for item in items:
            if isinstance(item, Message):
                reject_unknown_fields(item, child)


def fingerprint(method: str, request: Message) -> bytes:
    """What identifies a request for idempotency: the method and every field but request_id."""
    copy = type(request)()
    copy.CopyFrom(request)
    copy.ClearField("request_id")
    return hashlib.sha256(method.encode() + b"\0" + copy.SerializeToString(deterministic=True)
                          ).digest()


def precondition(request: pb.UpdateResourceRequest | pb.DeleteResourceRequest
                 ) -> model.Precondition | None:
    if not request.HasField("precondition"):
        return None
    pre = request.precondition
    which = pre.WhichOneof("condition")
    if which is None:
        return None
    if which == "etag":
        return model.Precondition.of_etag(pre.etag)
    if which == "version":
        return model.Precondition.of_version(pre.version)
    if which == "exists":
        return model.Precondition.of_exists(pre.exists)
    since = pre.unmodified_since
    if not 0 <= since.nanos < 1_000_000_000 or not -62135596800 <= since.seconds <= 253402300799:
        raise errors.InvalidPrecondition(
            "precondition.unmodified_since is not a valid timestamp",
            field="precondition.unmodified_since",
        )
    return model.Precondition.of_unmodified_since(since.seconds)


Request = TypeVar("Request", bound=Message)
Response = TypeVar("Response", bound=Message)


def _unary(
    method: Callable[[LedgerServicer, Request, grpc.aio.ServicerContext], Awaitable[Response]],
) -> Callable[[LedgerServicer, Request, grpc.aio.ServicerContext], Awaitable[Response]]:
    async def handler(self: LedgerServicer, request: Request,
                      context: grpc.aio.ServicerContext) -> Response:
        try:
            principal = _principal.set(self._admit(method.__name__, request, context))
            check_request(request)
            try:
                return await method(self, request, context)
            finally:
                _principal.reset(principal)
        except errors.LedgerError as error:
            await context.abort_with_status(to_status(error))
            raise AssertionError("abort_with_status returns only by raising") from error

    handler.__name__ = method.__name__
    handler.__doc__ = method.__doc__
    handler.__wrapped__ = method  # type: ignore[attr-defined]  # what Batch runs per operation
    return handler


class LedgerServicer(pb_grpc.LedgerServicer):
    """The `casledger.v1.Ledger` service over a :class:`~casledger.service.storage.Store`."""

    def __init__(self, store: Store, *, max_content_bytes: int,
                 tokens: auth.TokenFile | None = None, observe: Observe | None = None,
                 batch_slots: BatchSlots | None = None) -> None:
        self._store = store
        self._limit = max_content_bytes
        self._tokens = tokens
        # Counts and logs each operation of a Batch as its own call (the interceptor's record).
        self._observe = observe
        # Admits each batch of a BatchStream as a Batch call is admitted (the interceptor's).
        self._batch_slots = batch_slots
        # The BatchStream handlers waiting for their next batch; close_streams ends them.
        self._reading: set[asyncio.Task[Any]] = set()
        self._closing = asyncio.Event()

    def close_streams(self) -> None:
        """At shutdown: every BatchStream takes no more batches, answers those it took, and
        ends (OK), so that its client sees at once that the rest were not taken."""
        self._closing.set()
        for task in self._reading:
            task.cancel()
        self._reading.clear()

    def _actor(self, context: grpc.aio.ServicerContext) -> str:
        return _principal.get()

    def _admit(self, method: str, request: Message | Unparseable,
               context: grpc.aio.ServicerContext) -> str:
        """The caller's principal, once its bearer token proves who it is and that it may make
        this call (anonymous without access control); Unauthenticated / PermissionDenied."""
        if self._tokens is None:
            return model.ANONYMOUS
        grant = self._tokens.authenticate(context.invocation_metadata())
        auth.authorize(grant, method, None if isinstance(request, Unparseable) else request)
        return grant.principal

    @_unary
    async def GetResource(self, request: pb.GetResourceRequest,
                          context: grpc.aio.ServicerContext) -> pb.Resource:
        model.validate_name(request.name)
        if request.version < 0:
            raise errors.InvalidArgument("version must be >= 0 (0 = current)", field="version")
        return to_resource(await self._store.get(request.name, request.version))

    @_unary
    async def ListResources(self, request: pb.ListResourcesRequest,
                            context: grpc.aio.ServicerContext) -> pb.ListResourcesResponse:
        parent = model.validate_collection(request.parent)
        size = model.page_size(request.page_size)
        scope = f"resources:{parent}"
        after = model.decode_name_token(request.page_token, scope)
        found = await self._store.list_resources(parent, size + 1, after)
        token = model.encode_page_token(scope, found[size - 1].name) if len(found) > size else ""
        return pb.ListResourcesResponse(
            resources=[to_resource(v) for v in found[:size]], next_page_token=token
        )

    @_unary
    async def CreateResource(self, request: pb.CreateResourceRequest,
                             context: grpc.aio.ServicerContext) -> pb.Resource:
        parent = model.validate_collection(request.parent)
        if request.resource_id:
            model.validate_name(f"x/{request.resource_id}", field="resource_id")
            name = model.validate_name(f"{parent}/{request.resource_id}", field="resource_id")
            scope = name
        else:
            name = f"{parent}/{model.new_resource_id()}"
            scope = f"{parent}/"
        content_type = content_rules.validate_content(
            request.content, request.content_type, limit=self._limit
        )
        return await self._write("CreateResource", request, context, name=name, scope=scope,
                                 content=request.content, content_type=content_type)

    @_unary
    async def UpdateResource(self, request: pb.UpdateResourceRequest,
                             context: grpc.aio.ServicerContext) -> pb.Resource:
        name = model.validate_name(request.name)
        which = request.WhichOneof("change")
        content, content_type, patch = b"", "", None
        if which == "content":
            content = request.content.data
            content_type = content_rules.validate_content(
                content, request.content.content_type, limit=self._limit
            )
        elif which == "patch":
            patch = self._patch(request.patch)
        else:
            raise errors.InvalidArgument(
                "set either content (a whole new content) or patch", field="change"
            )
        return await self._write("UpdateResource", request, context, name=name, scope=name,
                                 content=content, content_type=content_type, patch=patch,
                                 precondition=precondition(request))

    async def _write(self, method: str, request: WriteRequest, context: grpc.aio.ServicerContext,
                     *, name: str, scope: str, **change: Any) -> pb.Resource:
        """Record the write's actor, reason and request id (its fingerprint only when it has
        one: nothing else reads it), and append it."""
        request_id = model.validate_request_id(request.request_id)
        write = model.Write(
            kind=WRITE_KINDS[method], name=name, actor=self._actor(context),
            reason=model.validate_reason(request.reason), request_id=request_id,
            request_scope=scope, fingerprint=fingerprint(method, request) if request_id else b"",
            **change)
        return to_resource(await self._store.write(write))

    def _patch(self, patch: pb.Patch) -> model.PatchSpec:
        media_type = patch.media_type.split(";", 1)[0].strip().lower()
        if media_type not in patch_rules.SUPPORTED:
            raise errors.UnsupportedPatchType(patch.media_type)
        if len(patch.document) > self._limit:
            raise errors.ContentTooLarge(len(patch.document), self._limit,
                                         field="patch.document")
        # Malformed JSON is an argument error, found before any precondition is looked at.
        content_rules.parse_json(patch.document, field="patch.document",
                                 error=errors.InvalidPatch)
        return model.PatchSpec(media_type=media_type, document=patch.document)

    @_unary
    async def DeleteResource(self, request: pb.DeleteResourceRequest,
                             context: grpc.aio.ServicerContext) -> pb.Resource:
        name = model.validate_name(request.name)
        return await self._write("DeleteResource", request, context, name=name, scope=name,
                                 precondition=precondition(request))

    @_unary
    async def ListVersions(self, request: pb.ListVersionsRequest,
                           context: grpc.aio.ServicerContext) -> pb.ListVersionsResponse:
        name = model.validate_name(request.name)
        size = model.page_size(request.page_size)
        scope = f"versions:{name}"
        after = model.decode_version_token(request.page_token, scope)
        found = await self._store.list_versions(name, size + 1, after, request.include_content)
        token = model.encode_page_token(scope, found[size - 1].version) if len(found) > size else ""
        return pb.ListVersionsResponse(
            versions=[to_resource(v, content=request.include_content) for v in found[:size]],
            next_page_token=token,
        )

    @_unary
    async def GetRevision(self, request: pb.GetRevisionRequest,
                          context: grpc.aio.ServicerContext) -> pb.GetRevisionResponse:
        return pb.GetRevisionResponse(revision=await self._store.current_revision())

    async def Batch(self, request: pb.BatchRequest,
                    context: grpc.aio.ServicerContext) -> pb.BatchResponse:
        """Each operation as its own unary call, all at once (see the proto)."""
        try:
            grant = self._batch_grant(request, context)
        except errors.LedgerError as error:
            await context.abort_with_status(to_status(error))
            raise AssertionError("abort_with_status returns only by raising") from error
        return pb.BatchResponse(results=await self._batch(request.operations, grant, context))

    # The generated base class declares a response iterator; this handler writes its answers
    # with context.write() instead, the other form grpc.aio takes, as they finish.
    async def BatchStream(  # type: ignore[override]
            self, requests: Any, context: grpc.aio.ServicerContext) -> None:
        """Batch calls as the messages of one stream, each answered as it finishes (see the
        proto): read, run and answer concurrently; one write on the stream at a time."""
        writing = asyncio.Lock()
        running: set[asyncio.Task[None]] = set()

        async def answer(message: pb.BatchStreamRequest) -> None:
            reply = pb.BatchStreamResponse(id=message.id)
            try:
                reply.results.extend(await self._stream_batch(message, context))
            except errors.LedgerError as error:
                reply.status.CopyFrom(status_message(error))
            async with writing:
                try:
                    await context.write(reply)
                except Exception:  # the stream has ended (the client went away): nowhere to go
                    log.debug("a BatchStream reply could not be written", exc_info=True)

        me = asyncio.current_task()
        assert me is not None
        try:
            if not self._closing.is_set():
                self._reading.add(me)
            while not self._closing.is_set():
                try:
                    message = await context.read()
                except asyncio.CancelledError:
                    if not self._closing.is_set():
                        raise  # the client went away
                    me.uncancel()  # close_streams: stop reading, finish what was taken
                    break
                if message is grpc.aio.EOF:
                    break
                if isinstance(message, Unparseable):
                    raise errors.InvalidArgument(
                        f"a BatchStream message could not be parsed ({message.problem})",
                        field="request")
                task = asyncio.ensure_future(answer(message))
                running.add(task)
                task.add_done_callback(running.discard)
            self._reading.discard(me)
            if running:
                await asyncio.gather(*running)
        except errors.LedgerError as error:
            await context.abort_with_status(to_status(error))
            raise AssertionError("abort_with_status returns only by raising") from error
        finally:
            self._reading.discard(me)
            for task in running:  # the stream failed: its answers have nowhere to go
                task.cancel()

    async def _stream_batch(self, message: pb.BatchStreamRequest,
                            context: grpc.aio.ServicerContext) -> list[pb.BatchResult]:
        """One batch of a BatchStream: refused whole (LedgerError) as its Batch call would be,
        or run with as many slots taken as its Batch call would take."""
        grant = self._batch_grant(message, context)
        units = len(message.operations)  # the gate counts an empty batch as one
        if self._batch_slots is None:
            return await self._batch(message.operations, grant, context)
        self._batch_slots.admit(units)
        try:
            return await self._batch(message.operations, grant, context)
        finally:
            self._batch_slots.leave(units)

    def _batch_grant(self, request: pb.BatchRequest | pb.BatchStreamRequest,
                     context: grpc.aio.ServicerContext) -> auth.Grant | None:
        """The caller's grant for a batch (None without access control), once the batch itself
        may be taken; LedgerError when it may not."""
        grant = (None if self._tokens is None
                 else self._tokens.authenticate(context.invocation_metadata()))
        check_request(request)
        if len(request.operations) > MAX_BATCH_OPERATIONS:
            raise errors.InvalidArgument(
                f"a Batch holds at most {MAX_BATCH_OPERATIONS} operations, not "
                f"{len(request.operations)}", field="operations")
        return grant

    async def _batch(self, operations: Any, grant: auth.Grant | None,
                     context: grpc.aio.ServicerContext) -> list[pb.BatchResult]:
        return await asyncio.gather(*(self._operation(operation, grant, context)
                                      for operation in operations))

    async def _operation(self, operation: pb.BatchOperation, grant: auth.Grant | None,
                         context: grpc.aio.ServicerContext) -> pb.BatchResult:
        started = time.perf_counter()
        which = operation.WhichOneof("operation")
        method = BATCH_METHODS.get(which or "", "Batch")
        # A task of its own (gather): what is set here is this operation's alone.
        call_id = logs.accept_request_id(operation.call_id)
        logs.request_id.set(call_id)
        code, reason = grpc.StatusCode.OK, ""
        try:
            if which is None:
                raise errors.InvalidArgument("a Batch operation holds no call",
                                             field="operations.operation")
            request = getattr(operation, which)
            if grant is not None:
                auth.authorize(grant, method, request)
            _principal.set(model.ANONYMOUS if grant is None else grant.principal)
            run = getattr(LedgerServicer, method).__wrapped__
            return pb.BatchResult(resource=await run(self, request, context))
        except errors.LedgerError as error:
            code, reason = grpc_code(error), error.reason
            return pb.BatchResult(status=status_message(error))
        except BaseException:
            code = grpc.StatusCode.UNKNOWN
            raise
        finally:
            if self._observe is not None:
                self._observe(f"{SERVICE_NAME}/{method}", code, reason,
                              time.perf_counter() - started, peer_of(context), call_id)

    async def Watch(self, request: pb.WatchRequest,
                    context: grpc.aio.ServicerContext) -> AsyncIterator[pb.WatchEvent]:
        try:
            self._admit("Watch", request, context)
            check_request(request)
            prefix = model.validate_prefix(request.prefix)
            if request.start_revision < 0:
                raise errors.InvalidArgument(
                    "start_revision must be >= 0 (0 = from now on)", field="start_revision"
                )
            # "From now on" is fixed here, not when `stream` is first iterated (after the await
            # below): a commit landing while the metadata is sent is then replayed, not skipped.
            accepted = self._store.hub.revision
            stream = watch(self._store.hub, self._store.read_revisions, prefix,
                           request.start_revision or accepted + 1)
            # Tells the client the watch was accepted (it can still answer errors before it).
            await context.send_initial_metadata(((WATCH_REVISION_KEY, str(accepted)),))
            async for version in stream:
                yield pb.WatchEvent(type=_event_type(version), resource=to_resource(version))
        except errors.LedgerError as error:
            await context.abort_with_status(to_status(error))


def peer_of(context: grpc.aio.ServicerContext) -> str:
    """The caller's address. Read it while the call is alive: after it ended (a stream finalized
    late) the C call behind ``peer()`` may be gone, and reading it then crashes the process."""
    peer = context.peer()
    return peer if isinstance(peer, str) else ""


def _event_type(version: model.Version) -> Any:
    if version.deleted:
        return pb.WatchEvent.DELETED
    return pb.WatchEvent.CREATED if version.creates else pb.WatchEvent.UPDATED
