"""One connection to one Redis node for the store's script batches and cache range reads: RESP
written as batches come, replies parsed by hiredis in order, each to the batch that waits for it.

redis-py spends more than the round trip on both: a pool checkout and release, a task per
write under ``wait_for``, a timer per reply, its observability hooks, and two more copies of a
big reply (its stream reader's buffer, then a read out of it). Measured (bench ``cache``): a 2K
image's hit read its 3.75 MB entry for ~2.7 ms of CPU through redis-py, ~1 ms here (the hit
8.3 -> 6.8 ms of CPU); a small request's two scripts cost ~3 % less (bench ``full``).
Everything else still goes through redis-py, and so do the connection parameters: they are read
from its client (``connection_pool.connection_kwargs``: host and port or a unix path, db,
username and password, TLS), so a URL means the same to both.

Batches share the connection: a batch written while another waits for its replies gets the
replies that follow (Redis answers in order). A batch whose caller gave up leaves its futures
in line; their replies are read and dropped when they come, so the order holds. A connection
that fails, or stays silent past ``socket_timeout``, is closed and fails every batch on it; the
next batch connects afresh.
"""
from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

import hiredis
from redis.asyncio.connection import RedisSSLContext, SSLConnection
from redis.exceptions import AuthenticationError, DataError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError


class _Protocol(asyncio.Protocol):
    """The socket's side: replies to the futures in line, in order; a loss fails them all."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.waiting: deque[asyncio.Future] = deque()
        self._reader = hiredis.Reader(replyError=ResponseError)
        self.lost: BaseException | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        try:
            while (reply := self._reader.gets()) is not False:
                future = self.waiting.popleft()
                if not future.done():  # its batch gave up: the reply only keeps the order
                    future.set_result(_error(reply) if isinstance(reply, ResponseError) else reply)
        except (hiredis.ProtocolError, IndexError) as e:  # not RESP, or a reply nobody asked for
            self.fail(RedisConnectionError(f"Redis sent what it should not: {e!r}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = RedisConnectionError(f"Connection to Redis lost{f': {exc}' if exc else ''}")
        self._fail_waiting(self.lost)

    def fail(self, exc: BaseException) -> None:
        """Close the connection and fail what waits on it with ``exc``."""
        self.lost = self.lost or exc
        if self.transport is not None:
            self.transport.abort()
        self._fail_waiting(exc)

    def _fail_waiting(self, exc: BaseException) -> None:
        while self.waiting:
            future = self.waiting.popleft()
            if not future.done():
                future.set_exception(exc)


def _error(reply: ResponseError) -> ResponseError:
    """A script's error reply as redis-py names it (NOSCRIPT makes the batcher send the script)."""
    return NoScriptError(str(reply)) if str(reply).startswith("NOSCRIPT") else reply


class Pipe:
    """The connection one ``RedisStore``'s batches and range reads share, opened on first use."""

    @classmethod
    def of(cls, client: Any) -> "Pipe":
        """The pipe to the node a redis-py client talks to, with the client's parameters."""
        pool = client.connection_pool
        return cls(pool.connection_kwargs, ssl=issubclass(pool.connection_class, SSLConnection))

    def __init__(self, connection_kwargs: dict[str, Any], *, ssl: bool) -> None:
        kw = connection_kwargs
        self._address = kw.get("path") or (kw.get("host", "localhost"), int(kw.get("port", 6379)))
        self._socket_timeout = kw.get("socket_timeout")
        self._connect_timeout = kw.get("socket_connect_timeout") or self._socket_timeout
        self._ssl = RedisSSLContext(**{k.removeprefix("ssl_"): v for k, v in kw.items() if k.startswith("ssl_")
                                       and k.removeprefix("ssl_") in _SSL_ARGS}).get() if ssl else None
        self._hello: list[tuple] = []  # what every new connection says first
        if kw.get("password") is not None:
            self._hello.append(("AUTH", *((kw["username"],) if kw.get("username") else ()), kw["password"]))
        if kw.get("db"):
            self._hello.append(("SELECT", kw["db"]))
        self._protocol: _Protocol | None = None
        self._connecting: asyncio.Task | None = None

    async def exchange(self, packed: list[bytes]) -> list[Any]:
        """Write ``packed`` (one RESP command each) and return their replies in order, each a
        value or that command's ``ResponseError``. Raises redis-py's ConnectionError or
        TimeoutError when the connection fails or Redis stays silent past the socket timeout
        (the connection is then closed)."""
        protocol = await self._connected()
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in packed]
        protocol.waiting.extend(futures)
        protocol.transport.writelines(packed)
        last = futures[-1]
        timer = (loop.call_later(self._socket_timeout, self._silent, protocol, last)
                 if self._socket_timeout else None)
        try:
            await last  # replies come in order: the last one ends the batch
        except BaseException:  # the connection failed, or the caller gave up
            for future in futures:
                if not future.done():
                    future.cancel()  # its reply, when it comes, is dropped: the order holds
                elif not future.cancelled():
                    future.exception()  # told through ``last``'s: not "never retrieved"
            raise
        finally:
            if timer is not None:
                timer.cancel()
        return [f.result() for f in futures]

    def close(self) -> None:
        """Close the connection (failing what still waits on it); a later batch connects afresh."""
        if self._protocol is not None:
            self._protocol.fail(RedisConnectionError("Connection to Redis closed by the gateway"))
            self._protocol = None

    def _silent(self, protocol: _Protocol, last: asyncio.Future) -> None:
        if not last.done():
            protocol.fail(RedisTimeoutError(f"Redis sent nothing for {self._socket_timeout} s"))

    async def _connected(self) -> _Protocol:
        protocol = self._protocol
        if protocol is not None and protocol.lost is None:
            return protocol
        self._protocol = None
        if self._connecting is None:  # one connect for every batch that needs one
            self._connecting = asyncio.ensure_future(self._connect())
            self._connecting.add_done_callback(self._connected_done)
        return await asyncio.shield(self._connecting)

    def _connected_done(self, task: asyncio.Task) -> None:
        self._connecting = None
        if not task.cancelled() and task.exception() is None:
            self._protocol = task.result()

    async def _connect(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._connect_timeout):
                if isinstance(self._address, str):
                    _, protocol = await loop.create_unix_connection(_Protocol, self._address, ssl=self._ssl)
                else:
                    _, protocol = await loop.create_connection(_Protocol, *self._address, ssl=self._ssl)
        except TimeoutError:
            raise RedisTimeoutError("Timeout connecting to Redis") from None
        except OSError as e:
            raise RedisConnectionError(f"Error connecting to Redis: {e}") from None
        if self._hello:
            futures = [loop.create_future() for _ in self._hello]
            protocol.waiting.extend(futures)
            protocol.transport.write(b"".join(pack(c) for c in self._hello))
            for reply in await asyncio.gather(*futures):
                if isinstance(reply, ResponseError):
                    refused = AuthenticationError(f"Redis refused the connection: {reply}")
                    protocol.fail(refused)
                    raise refused
        return protocol


# RedisSSLContext's parameters, as they appear (prefixed ssl_) in redis-py's connection kwargs
_SSL_ARGS = ("keyfile", "certfile", "cert_reqs", "ca_certs", "ca_data", "check_hostname", "min_version",
             "ciphers", "password", "include_verify_flags", "exclude_verify_flags", "ca_path")


def pack(command: tuple) -> bytes:
    """RESP for one command, its arguments as redis-py would send them (bytes, str, int, float);
    DataError for a value of no Redis type."""
    try:
        return hiredis.pack_command(command)
    except TypeError:  # a bytearray or memoryview (sent as its bytes), or a value of no Redis type
        return hiredis.pack_command(tuple(_arg(a) for a in command))


def _arg(value: Any) -> Any:
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    if type(value) in (bytes, str, int, float):
        return value
    raise DataError(f"Invalid input of type: {type(value).__name__!r}. Convert to a bytes, string, int or float first.")
