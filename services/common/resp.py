"""One pipelined Redis connection, for a call made on every request.

redis-py's asyncio client borrows a pooled connection for each call, packs
the command and parses the reply in Python, and wraps each call in its own
retry, timeout and instrumentation: about 150 us of CPU per script call on
the 2-core development machine. ``RespConnection`` writes every call at once
on one socket, as it comes: Redis answers in order, so concurrent calls need
neither a pool nor a lock, and a burst of calls shares the socket's reads.
hiredis packs the commands and parses the replies in C: about 60 us a call.

It speaks only what a hot path needs: commands, and Lua scripts run by
their SHA (loaded when Redis does not know them). Failures are redis-py's
exceptions (``ConnectionError``, ``TimeoutError``, ``ResponseError``), so
callers catch one family whichever client they use. A lost or timed-out
connection fails every call waiting on it and is opened again by the next
call.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import ssl
from dataclasses import dataclass, field
from typing import Any, cast

import hiredis
import redis.asyncio as aioredis
import redis.exceptions

_NOSCRIPT = "NOSCRIPT"


@dataclass(frozen=True)
class Script:
    """A Lua script, run by its SHA."""

    source: str
    sha: str = field(init=False)

    def __post_init__(self) -> None:
        # SHA-1 names a script in Redis (EVALSHA); no security rests on it.
        sha = hashlib.sha1(self.source.encode(), usedforsecurity=False).hexdigest()
        object.__setattr__(self, "sha", sha)


class _Replies(asyncio.Protocol):
    """The socket's side: each command written gets the next reply."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._reader = hiredis.Reader()  # error replies come back as ReplyError values
        self._waiting: collections.deque[asyncio.Future[Any]] = collections.deque()

    @property
    def open(self) -> bool:
        return self.transport is not None and not self.transport.is_closing()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are asyncio's in behaviour, not by class.
        self.transport = cast(asyncio.Transport, transport)

    def send(self, args: tuple[Any, ...]) -> asyncio.Future[Any]:
        assert self.transport is not None
        reply: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting.append(reply)
        self.transport.write(hiredis.pack_command(args))
        return reply

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        try:
            while (reply := self._reader.gets()) is not False:
                waiter = self._waiting.popleft()
                if not waiter.done():  # its caller may have given up
                    waiter.set_result(reply)
        except (hiredis.ProtocolError, IndexError) as exc:
            self.close(redis.exceptions.ConnectionError(f"Redis reply out of step: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(redis.exceptions.ConnectionError(f"Redis connection lost: {exc or 'closed'}"))

    def close(self, reason: Exception) -> None:
        self._fail(reason)
        if self.transport is not None:
            self.transport.abort()

    def _fail(self, reason: Exception) -> None:
        while self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.done():
                waiter.set_exception(reason)


def _expire(replies: _Replies, waiter: asyncio.Future[Any]) -> None:
    """A Redis this slow is treated as gone: every call waiting on it fails
    now, and the next call connects again."""
    if not waiter.done():
        replies.close(redis.exceptions.TimeoutError("Redis did not answer in time"))


class RespConnection:
    """One connection to Redis (opened on first use) on which calls are
    pipelined. ``timeout`` bounds each call, ``connect_timeout`` each
    connection attempt, as redis-py's socket timeouts do."""

    def __init__(
        self,
        host: str,
        port: int = 6379,
        *,
        db: int = 0,
        username: str | None = None,
        password: str | None = None,
        tls: ssl.SSLContext | None = None,
        timeout: float = 0.5,
        connect_timeout: float = 0.5,
    ) -> None:
        self._host, self._port, self._db = host, port, db
        self._credentials = (username, password) if password else None
        self._tls = tls
        self._timeout = timeout
        self._connect_timeout = connect_timeout
        self._replies: _Replies | None = None
        self._connecting = asyncio.Lock()

    @classmethod
    def like(cls, client: aioredis.Redis) -> RespConnection:
        """A connection to the server and database of a redis-py client,
        with its credentials, TLS settings and timeouts."""
        kw = client.connection_pool.connection_kwargs
        tls = None
        if issubclass(client.connection_pool.connection_class, aioredis.SSLConnection):
            tls = ssl.create_default_context(cafile=kw.get("ssl_ca_certs"))
            if kw.get("ssl_certfile"):
                tls.load_cert_chain(kw["ssl_certfile"], kw.get("ssl_keyfile"))
            if kw.get("ssl_cert_reqs") in ("none", ssl.CERT_NONE):
                tls.check_hostname = False
                tls.verify_mode = ssl.CERT_NONE
        return cls(
            kw.get("host", "localhost"),
            int(kw.get("port", 6379)),
            db=int(kw.get("db") or 0),
            username=kw.get("username"),
            password=kw.get("password"),
            tls=tls,
            timeout=kw.get("socket_timeout") or 5.0,
            connect_timeout=kw.get("socket_connect_timeout") or 5.0,
        )

    async def call(self, *args: Any) -> Any:
        """Runs one command; its reply as hiredis gives it (bytes, ints,
        lists)."""
        replies = self._replies
        if replies is None or not replies.open:
            replies = await self._connect()
        waiter = replies.send(args)
        # A bare timer: asyncio.timeout, a context manager in Python around a
        # timer of its own, cost about 6 us a call more (uvloop, measured here).
        expiry = asyncio.get_running_loop().call_later(self._timeout, _expire, replies, waiter)
        try:
            reply = await waiter
        finally:
            expiry.cancel()
        if isinstance(reply, hiredis.ReplyError):
            message = str(reply)
            if message.startswith(_NOSCRIPT):
                raise redis.exceptions.NoScriptError(message)
            raise redis.exceptions.ResponseError(message)
        return reply

    async def run(self, script: Script, keys: list[str], args: list[Any]) -> Any:
        """Runs a Lua script by its SHA, loading it first when Redis does
        not know it (a restarted or flushed Redis)."""
        try:
            return await self.call("EVALSHA", script.sha, len(keys), *keys, *args)
        except redis.exceptions.NoScriptError:
            await self.call("SCRIPT", "LOAD", script.source)
            return await self.call("EVALSHA", script.sha, len(keys), *keys, *args)

    async def close(self) -> None:
        if self._replies is not None:
            self._replies.close(redis.exceptions.ConnectionError("connection closed"))
            self._replies = None

    async def _connect(self) -> _Replies:
        async with self._connecting:  # one attempt at a time; the others wait for it
            if self._replies is not None and self._replies.open:
                return self._replies
            loop = asyncio.get_running_loop()
            replies: _Replies | None = None
            try:
                async with asyncio.timeout(self._connect_timeout):
                    _, replies = await loop.create_connection(
                        _Replies, self._host, self._port, ssl=self._tls
                    )
                    await self._prepare(replies)
            except BaseException as exc:
                if replies is not None:
                    replies.close(redis.exceptions.ConnectionError(f"cannot use Redis: {exc!r}"))
                if isinstance(exc, TimeoutError):  # before OSError, of which it is one
                    raise redis.exceptions.TimeoutError("Redis did not accept in time") from None
                if isinstance(exc, OSError):
                    raise redis.exceptions.ConnectionError(f"cannot reach Redis: {exc}") from exc
                raise
            self._replies = replies
            return replies

    async def _prepare(self, replies: _Replies) -> None:
        commands: list[tuple[Any, ...]] = []
        if self._credentials is not None:
            username, password = self._credentials
            commands.append(("AUTH", username, password) if username else ("AUTH", password))
        if self._db:
            commands.append(("SELECT", self._db))
        for command in commands:
            reply = await replies.send(command)
            if isinstance(reply, hiredis.ReplyError):
                raise redis.exceptions.AuthenticationError(str(reply))
