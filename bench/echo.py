"""A no-op ``casledger.v1.Ledger`` server: the floor the gRPC benchmark compares casledger with.

``python -m bench.echo --listen 127.0.0.1:PORT`` runs a ``grpc.aio`` server in this process that
answers ``UpdateResource`` (and, so that a load generator can seed its keys the same way on both
targets, ``CreateResource``) with a :class:`Resource` built trivially from the request: no
storage, no checks, no interceptor. Every other method is UNIMPLEMENTED. What the benchmark
measures against it is the cost of gRPC, protobuf and asyncio themselves, for the same messages
on the same wire, with the same client.

The server prints ``serving on HOST:PORT`` once it listens and stops cleanly on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

import grpc

from casledger.service.api.casledger.v1 import ledger_pb2 as pb

SERVICE = pb.DESCRIPTOR.services_by_name["Ledger"].full_name


def _etag(version: int) -> str:
    return f'"{version}-0000000000000000"'


async def update_resource(request: pb.UpdateResourceRequest,
                          context: grpc.aio.ServicerContext) -> pb.Resource:
    """The version the precondition implies, with the request's content; nothing stored."""
    version = request.precondition.version + 1
    return pb.Resource(name=request.name, version=version, content=request.content.data,
                       content_type=request.content.content_type, etag=_etag(version),
                       size_bytes=len(request.content.data))


async def create_resource(request: pb.CreateResourceRequest,
                          context: grpc.aio.ServicerContext) -> pb.Resource:
    """Version 1 of the named resource, with the request's content; nothing stored."""
    return pb.Resource(name=f"{request.parent}/{request.resource_id}", version=1,
                       content=request.content, content_type=request.content_type,
                       etag=_etag(1), size_bytes=len(request.content))


def add_echo_handlers(server: grpc.aio.Server) -> None:
    """Register the two methods the way casledger's servicer registers its own (a generic
    handler and the registered-method fast path), with protobuf's plain deserializers."""
    handlers = {
        "UpdateResource": grpc.unary_unary_rpc_method_handler(
            update_resource, request_deserializer=pb.UpdateResourceRequest.FromString,
            response_serializer=pb.Resource.SerializeToString),
        "CreateResource": grpc.unary_unary_rpc_method_handler(
            create_resource, request_deserializer=pb.CreateResourceRequest.FromString,
            response_serializer=pb.Resource.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)


async def serve(listen: str) -> None:
    """Serve the echo on `listen` until SIGTERM or SIGINT."""
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    add_echo_handlers(server)
    port = server.add_insecure_port(listen)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print(f"serving on {listen.rpartition(':')[0]}:{port}", flush=True)
    await stop.wait()
    await server.stop(1.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.echo", description=__doc__.split(
        "\n", 1)[0])
    parser.add_argument("--listen", default="127.0.0.1:50061", help="HOST:PORT (port 0: any)")
    args = parser.parse_args(argv)
    asyncio.run(serve(args.listen))
    return 0


if __name__ == "__main__":
    sys.exit(main())
