"""A loopback TCP proxy whose connections can go silently dead: `freeze()` stops forwarding on
every connection open at that moment, in both directions, without closing anything. Neither end
learns of it: their writes still succeed (into the kernel's buffers) and nothing comes back, as
when a peer vanishes or a NAT or firewall drops the flow. Connections opened later are forwarded
again."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator


class Blackhole:
    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.server: asyncio.Server | None = None
        self.pumps: list[asyncio.Task[None]] = []
        self.writers: list[asyncio.StreamWriter] = []

    @property
    def port(self) -> int:
        assert self.server is not None
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            writer.close()
            return
        self.writers += [writer, up_writer]
        self.pumps += [asyncio.ensure_future(_pump(reader, up_writer)),
                       asyncio.ensure_future(_pump(up_reader, writer))]

    def freeze(self) -> None:
        """Stop forwarding on the open connections; their sockets stay open."""
        for task in self.pumps:
            task.cancel()
        self.pumps = []

    def close_all(self) -> None:
        """Close every connection, frozen ones too: both ends now see them end."""
        self.freeze()
        for writer in self.writers:
            writer.close()
        self.writers = []


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    writer.close()


@contextlib.asynccontextmanager
async def blackhole(upstream_port: int) -> AsyncIterator[Blackhole]:
    """A Blackhole on a free loopback port in front of 127.0.0.1:`upstream_port`."""
    hole = Blackhole(upstream_port)
    hole.server = await asyncio.start_server(hole._accept, "127.0.0.1", 0)
    try:
        yield hole
    finally:
        hole.close_all()
        hole.server.close()
        await hole.server.wait_closed()
