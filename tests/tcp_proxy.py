"""A TCP proxy for fault injection: put it between a client and PostgreSQL
or RabbitMQ, then cut every connection (as a broker restart or a network
fault does) or go dark for a while (an outage), without touching the shared
servers themselves."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field


@dataclass
class TcpProxy:
    target_host: str
    target_port: int
    port: int = 0
    _server: asyncio.Server | None = None
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)
    _dark: bool = False
    cuts: int = 0

    async def start(self) -> TcpProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    @property
    def connections(self) -> int:
        return len(self._writers) // 2

    def url(self, template: str) -> str:
        """``template`` (an URL with ``{host}:{port}``-shaped netloc)
        pointed at the proxy."""
        return template.replace(f"{self.target_host}:{self.target_port}", f"127.0.0.1:{self.port}")

    def cut(self) -> int:
        """Closes every connection through the proxy; returns how many."""
        writers = list(self._writers)
        for writer in writers:
            writer.transport.abort()
        self._writers.clear()
        self.cuts += 1
        return len(writers) // 2

    def go_dark(self) -> None:
        """Cuts every connection and refuses new ones until ``restore``."""
        self._dark = True
        self.cut()

    def restore(self) -> None:
        self._dark = False

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._dark:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(self.target_host, self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, up_writer))
        await asyncio.gather(
            self._pipe(reader, up_writer), self._pipe(up_reader, writer), return_exceptions=True
        )
        for w in (writer, up_writer):
            self._writers.discard(w)
            w.transport.abort()

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        finally:
            writer.transport.abort()
