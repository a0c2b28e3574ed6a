"""A TCP fault proxy for outage tests: a service under test talks to PostgreSQL (or Redis, or
another service) through it, and the test cuts, refuses or slows the link.

The machine's PostgreSQL and Redis are shared, so tests never stop them: they break the path
to them instead. Runs on the test's event loop::

    proxy = await FaultProxy.start("127.0.0.1", 5432)
    url = proxy.rewrite(db_url)          # the same database, through the proxy
    proxy.cut()                          # every open connection dies, new ones are refused
    proxy.restore()                      # connections go through again
    proxy.latency_s = 0.2                # each chunk waits this long each way
"""

from __future__ import annotations

import asyncio
import contextlib
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit


class FaultProxy:
    """Forwards 127.0.0.1:<port> to an upstream host:port (or a Unix socket, as the embedded
    PostgreSQL listens on), with faults on demand."""

    def __init__(self, upstream_host: str, upstream_port: int,
                 upstream_socket: str | None = None) -> None:
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self.upstream_socket = upstream_socket
        self.latency_s = 0.0
        self.refusing = False
        self.accepted = 0
        """Connections accepted (and forwarded) so far."""
        self._server: asyncio.Server | None = None
        self._links: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0

    @classmethod
    async def start(cls, upstream_host: str, upstream_port: int,
                    upstream_socket: str | None = None) -> FaultProxy:
        """A proxy listening on an ephemeral port of 127.0.0.1."""
        proxy = cls(upstream_host, upstream_port, upstream_socket)
        proxy._server = await asyncio.start_server(proxy._accept, "127.0.0.1", 0)
        proxy.port = proxy._server.sockets[0].getsockname()[1]
        return proxy

    @classmethod
    async def for_url(cls, url: str) -> FaultProxy:
        """A proxy to the host and port of `url` (postgresql://, redis://); a PostgreSQL URL
        whose `host` parameter is a directory names a Unix socket there."""
        parts = urlsplit(url)
        port = parts.port or 5432
        directory = dict(parse_qsl(parts.query)).get("host", "")
        socket_path = f"{directory}/.s.PGSQL.{port}" if directory.startswith("/") else None
        return await cls.start(parts.hostname or "127.0.0.1", port, socket_path)

    def rewrite(self, url: str) -> str:
        """`url` with its host and port replaced by this proxy's."""
        parts = urlsplit(url)
        auth = parts.netloc.rpartition("@")[0]
        netloc = f"{auth}@127.0.0.1:{self.port}" if auth else f"127.0.0.1:{self.port}"
        query = urlencode([(k, v) for k, v in parse_qsl(parts.query) if k != "host"])
        return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))

    def cut(self) -> None:
        """Kills every open connection (a reset, as when the server dies) and refuses new ones
        until `restore`."""
        self.refusing = True
        self.drop()

    def drop(self) -> None:
        """Kills every open connection; new ones are still accepted."""
        for writer in list(self._links):
            transport = writer.transport
            with contextlib.suppress(Exception):
                transport.abort()
        self._links.clear()

    def restore(self) -> None:
        """New connections go through again; no latency."""
        self.refusing = False
        self.latency_s = 0.0

    async def close(self) -> None:
        """Stops listening and kills every connection."""
        self.drop()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refusing:
            writer.transport.abort()
            return
        try:
            if self.upstream_socket is not None:
                up_reader, up_writer = await asyncio.open_unix_connection(self.upstream_socket)
            else:
                up_reader, up_writer = await asyncio.open_connection(self.upstream_host,
                                                                     self.upstream_port)
        except OSError:
            writer.transport.abort()
            return
        self.accepted += 1
        self._links.update((writer, up_writer))
        pumps = [asyncio.create_task(self._pump(reader, up_writer)),
                 asyncio.create_task(self._pump(up_reader, writer))]
        self._tasks.update(pumps)
        try:
            await asyncio.gather(*pumps, return_exceptions=True)
        finally:
            self._tasks.difference_update(pumps)
            for end in (writer, up_writer):
                self._links.discard(end)
                end.transport.abort()

    async def _pump(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        try:
            while True:
                chunk = await source.read(65536)
                if not chunk:
                    break
                if self.latency_s:
                    await asyncio.sleep(self.latency_s)
                sink.write(chunk)
                await sink.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            sink.transport.abort()
