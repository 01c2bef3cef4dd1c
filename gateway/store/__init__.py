"""connect(url) -> the one store interface used by limits, the usage ledger and the cache.

Backends, chosen by the URL scheme (gateway/store/url.py): memory:// (the embedded store,
gateway/store/embedded.py: plain structures in this process, the scripts run by in-process
Lua), redis:// and rediss:// (one node), redis+cluster:// and rediss+cluster://.
URL options (removed before the URL reaches redis-py):

    timeout=30                how long an operation waits by default (a caller may pass its own
                              ``timeout_s``); running out is a slow store, not an outage
    socket_timeout=5          how long a connection with a command pending may stay silent
                              before the store counts as down
    socket_connect_timeout=2  how long a TCP connect may take before the store counts as down
    max_connections=64        operations (or pipelines) in flight at once; the rest queue

All backends run the same Lua scripts (gateway/lua/<name>.lua), so the embedded default and
Redis cannot drift. This module is the one boundary to Redis: every redis, socket and timeout
error becomes ``StoreError`` here, once, and ``StoreError.down`` says which kind it is.

Latency is not an outage. A slow or busy store makes its caller wait, up to the caller's own
patience (``timeout_s``); giving up is ``down=False`` and leaves the store healthy. Only a store
that is really down is ``down=True``, the case for ``store.on_error``: connection refused,
reset or closed, no route, a cluster without its slots, or a connection silent for
``socket_timeout`` with a command pending. redis-py does no retries, so a refused connection
fails at once; while the store is down one operation at a time probes it and the others fail
at once; the pool reconnects by itself when Redis is back. A script's own error (Redis
answered) is ``down=False`` too.

On one Redis node, scripts issued in the same event-loop tick share one pipeline
(gateway/store/batch.py): one write on the store's own connection (gateway/store/pipe.py, which
also carries the cache's range reads), and each caller still gets its own answer or its own
StoreError, after its own patience. The scripts themselves stay separate, each atomic.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
from functools import lru_cache
from importlib import resources
from typing import Any, Awaitable, Callable, NoReturn, Protocol, Sequence

from redis.exceptions import (ClusterDownError, MaxConnectionsError, NoScriptError, RedisClusterException,
                              RedisError, ResponseError)

from gateway.store.batch import Batcher
from gateway.store.pipe import Pipe, pack
from gateway.store.url import MAX_INFLIGHT, TIMEOUT_S, open_client

log = logging.getLogger(__name__)

_ERRORS = (RedisError, RedisClusterException, OSError, EOFError)  # OSError covers TimeoutError
# Errors from a store that is up: Redis answering with an error (a script's own), our own pool
# full. A cluster that lost slots answers too, but it cannot serve: that is down.
_UP = (ResponseError, MaxConnectionsError)
_DOWN_ANSWERS = (ClusterDownError,)
_SLOW = "no answer in time (the store is slow or busy, not down)"


class Store(Protocol):
    healthy: bool
    last_error: str | None

    async def run_script(self, name: str, keys: Sequence[str], args: Sequence[Any], *,
                         timeout_s: float | None = None) -> Any:
        """EVALSHA the Lua script gateway/lua/<name>.lua (loading it on NOSCRIPT), waiting at
        most ``timeout_s`` (default: the store's ``timeout``)."""

    async def get(self, key: str, *, timeout_s: float | None = None) -> bytes | None: ...

    async def get_range(self, key: str, start: int, end: int, *, timeout_s: float | None = None) -> bytes:
        """GETRANGE: bytes ``start..end`` (inclusive) of a string value, b"" if absent."""

    async def get_ranges(self, key: str, ranges: Sequence[tuple[int, int]], *,
                         timeout_s: float | None = None) -> list[bytes]:
        """Several GETRANGEs of one key (each ``(start, end)``, inclusive) in one round trip,
        not atomic: each answer as ``get_range`` would give it, in order."""

    async def set(self, key: str, value: bytes, *, ttl_s: float, only_if_absent: bool = False,
                  timeout_s: float | None = None) -> bool: ...

    async def delete(self, key: str, *, timeout_s: float | None = None) -> None: ...

    async def ping(self, *, timeout_s: float | None = None) -> None:
        """Raise StoreError when the store does not answer."""

    async def close(self) -> None: ...


def as_text(value: Any) -> str:
    """A script's string answer as text: Redis answers bytes, the embedded store str."""
    return value.decode() if isinstance(value, bytes) else str(value)


class StoreError(Exception):
    """Any failure talking to the store. ``down``: True when the store is really down (refused,
    reset, closed, unreachable, silent), the case for ``store.on_error``; False when it is up
    but this caller gave up waiting (slow, busy) or its own command failed (a script error)."""

    def __init__(self, message: str, *, op: str = "", down: bool = True):
        super().__init__(message)
        self.op = op
        self.down = down


@lru_cache(maxsize=None)
def script(name: str) -> tuple[str, str]:
    """(source, sha1) of gateway/lua/<name>.lua, read once per process."""
    source = (resources.files("gateway") / "lua" / f"{name}.lua").read_text(encoding="utf-8")
    return source, hashlib.sha1(source.encode()).hexdigest()


class _Expired(Exception):
    """A pipelined caller's deadline passed before its batch answered."""


def _expire(future: asyncio.Future) -> None:
    if not future.done():
        future.set_exception(_Expired())


class _Failed(Exception):
    """An attempt that failed, before it becomes each caller's StoreError (counted once per caller)."""

    def __init__(self, reason: str, *, down: bool):
        super().__init__(reason)
        self.reason, self.down = reason, down


class RedisStore:
    """The Store interface over a redis-py asyncio client (one node, Cluster).

    ``healthy`` and ``last_error`` follow the last operation that reached a verdict, for /readyz.

    With ``pipelined`` (one Redis node), scripts issued in one event-loop tick share one
    pipeline (batch.Batcher), each batch guarded like one call and each caller still answered
    on its own. Without it (Cluster, whose redis-py pipeline refuses EVALSHA) every operation
    is its own call.
    """

    def __init__(
        self,
        client: Any,
        *,
        kind: str,
        timeout_s: float = TIMEOUT_S,
        max_inflight: int = MAX_INFLIGHT,
        on_error: Callable[[str], None] | None = None,
        pipelined: bool = False,
        pipe: Pipe | None = None,
    ) -> None:
        self.client = client
        self.kind = kind  # redis | cluster
        self.timeout_s = timeout_s  # a caller's patience unless it says otherwise
        self.on_error = on_error
        self.healthy = True
        self.last_error: str | None = None
        # bounds in-flight commands (or pipelines) below the pool size: the rest queue
        self._slots = asyncio.Semaphore(max_inflight)
        self._probing = False
        self.pipelined = pipelined
        self._batcher = Batcher(pipe or Pipe.of(client), guard=self._attempt, error=self._error) if pipelined else None

    def _deadline(self, timeout_s: float | None) -> float:
        return asyncio.get_running_loop().time() + (self.timeout_s if timeout_s is None else timeout_s)

    async def _call(self, op: str, fn: Callable[[], Awaitable[Any]], timeout_s: float | None) -> Any:
        try:
            return await self._attempt(op, fn, self._deadline(timeout_s))
        except _Failed as f:
            self._failed(op, f.reason, down=f.down)

    def _gave_up(self) -> _Failed:
        """A caller's patience ran out: slow or busy, not down (the store keeps its health),
        unless the store was already known to be down."""
        if self.healthy:
            return _Failed(_SLOW, down=False)
        return _Failed(f"unavailable ({self.last_error})", down=True)

    def _refusal(self) -> str | None:
        """Why to fail at once, untried: down, and another operation is already probing."""
        return f"unavailable ({self.last_error})" if not self.healthy and self._probing else None

    async def _attempt(self, op: str, fn: Callable[[], Awaitable[Any]], deadline: float) -> Any:
        """fn() (one call, or one whole batch) under the probe rule and a connection slot, until
        ``deadline`` (loop time). Raises only _Failed: the caller turns it into StoreErrors."""
        if (refusal := self._refusal()) is not None:
            raise _Failed(refusal, down=True)
        probe = not self.healthy  # down: this operation probes, the rest fail fast meanwhile
        if probe:
            self._probing = True
        task = asyncio.current_task()
        cancels = task.cancelling() if task is not None else 0
        patience = asyncio.timeout_at(deadline)
        try:
            async with patience:
                async with self._slots:
                    if self.kind == "cluster":
                        # (re)discover the slots before any command: redis-py's lazy discovery
                        # races when many commands trigger it at once. A no-op once known.
                        await self.client.initialize()
                    result = await fn()
        except Exception as e:  # the boundary: nothing from redis-py goes further up
            if patience.expired():
                raise self._gave_up() from None
            if isinstance(e, _UP) and not isinstance(e, _DOWN_ANSWERS):
                if isinstance(e, ResponseError):
                    self.healthy = True  # it answered
                raise _Failed(self._reason(op, e), down=False) from None
            self.healthy, self.last_error = False, self._reason(op, e)
            if not isinstance(e, ResponseError):  # Redis answered: its connections are fine
                await self._drop_idle_connections()
            raise _Failed(self.last_error, down=True) from None
        finally:
            if probe:
                self._probing = False
        self.healthy = True
        if task is not None and task.cancelling() > cancels:
            # redis-py writes under asyncio.wait_for, which on Python 3.11 drops a cancellation
            # that lands as the write completes (CPython gh-86296): raise it, or a handler whose
            # client left goes on (polls, waits, even calls the provider).
            raise asyncio.CancelledError
        return result

    async def _drop_idle_connections(self) -> None:
        """After a failure the pooled idle connections may be dead too (Redis restarted or went
        away), and redis-py only finds out by failing an operation on each, one by one, long
        after Redis is back. Close them now: the next operations connect afresh."""
        try:
            if self.kind == "cluster":
                await asyncio.gather(*(n.disconnect_free_connections() for n in self.client.get_nodes()))
            elif self.kind == "redis":
                await self.client.connection_pool.disconnect(inuse_connections=False)
        except Exception as e:  # closing a dead connection is not news
            log.debug("closing idle store connections: %s", e)

    @staticmethod
    def _reason(op: str, e: BaseException) -> str:
        if not isinstance(e, _ERRORS):
            log.error("unexpected error from the store client during %s", op, exc_info=e)
        return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__

    def _failure(self, op: str, reason: str, *, down: bool) -> StoreError:
        """One caller's StoreError, counted once (the store's health is the attempt's verdict)."""
        if self.on_error is not None:
            self.on_error(op)
        return StoreError(f"store {op} failed: {reason}", op=op, down=down)

    def _failed(self, op: str, reason: str, *, down: bool) -> NoReturn:
        raise self._failure(op, reason, down=down) from None

    def _error(self, op: str, e: Exception) -> StoreError:
        """A pipelined caller's StoreError: its batch's failure, or its own script's error."""
        if isinstance(e, _Failed):
            return self._failure(op, e.reason, down=e.down)
        return self._failure(op, self._reason(op, e), down=False)  # Redis answered (or it never left)

    # ---- the Store interface ----------------------------------------------------------------

    async def run_script(self, name: str, keys: Sequence[str], args: Sequence[Any], *,
                         timeout_s: float | None = None) -> Any:
        source, sha = script(name)
        if self._batcher is not None:
            if (refusal := self._refusal()) is not None:  # don't queue behind the probe
                self._failed(name, refusal, down=True)
            deadline = self._deadline(timeout_s)
            future = self._batcher.submit(name, ("EVALSHA", sha, len(keys), *keys, *args), source, deadline)
            # Giving up fails this caller's future only: the batch goes on for the others. A timer
            # on the future, not an asyncio.timeout (a context and a task cancellation per call).
            expiry = asyncio.get_running_loop().call_at(deadline, _expire, future)
            try:
                return await future
            except _Expired:
                f = self._gave_up()
                self._failed(name, f.reason, down=f.down)
            finally:
                expiry.cancel()

        async def run() -> Any:
            try:
                return await self.client.evalsha(sha, len(keys), *keys, *args)
            except NoScriptError:  # first use on this node: EVAL sends it and caches it
                return await self.client.eval(source, len(keys), *keys, *args)

        return await self._call(name, run, timeout_s)

    async def get(self, key: str, *, timeout_s: float | None = None) -> bytes | None:
        return await self._call("get", lambda: self.client.get(key), timeout_s)

    async def get_range(self, key: str, start: int, end: int, *, timeout_s: float | None = None) -> bytes:
        # A plain command, never a script: Redis hashes every byte of a string passed into Lua
        # (~1.5 ms of its CPU per MB), which big cache reads must not pay.
        return await self._call("get_range", lambda: self.client.getrange(key, start, end), timeout_s)

    async def get_ranges(self, key: str, ranges: Sequence[tuple[int, int]], *,
                         timeout_s: float | None = None) -> list[bytes]:
        # One non-transactional pipeline: one key, so one node (and one slot) on a cluster too.
        # On one node, on the store's own connection (pipe.py): a big range through redis-py's
        # reader is copied twice more (~2.7 ms of CPU for a 2K image's 3.75 MB, ~1 ms there).
        async def run() -> list[bytes]:
            if self._batcher is not None:
                replies = await self._batcher.pipe.exchange([pack(("GETRANGE", key, s, e)) for s, e in ranges])
                for reply in replies:
                    if isinstance(reply, Exception):
                        raise reply
                return replies
            pipe = self.client.pipeline(transaction=False)
            for start, end in ranges:
                pipe.getrange(key, start, end)
            return await pipe.execute()

        return await self._call("get_range", run, timeout_s)

    async def set(self, key: str, value: bytes, *, ttl_s: float, only_if_absent: bool = False,
                  timeout_s: float | None = None) -> bool:
        px = max(1, int(ttl_s * 1000))
        return bool(await self._call("set", lambda: self.client.set(key, value, px=px, nx=only_if_absent),
                                     timeout_s))

    async def delete(self, key: str, *, timeout_s: float | None = None) -> None:
        await self._call("delete", lambda: self.client.delete(key), timeout_s)

    async def ping(self, *, timeout_s: float | None = None) -> None:
        await self._call("ping", self.client.ping, timeout_s)

    async def close(self) -> None:
        if self._batcher is not None:  # answer every caller queued or in flight first
            await self._batcher.drain()
            self._batcher.pipe.close()
        try:
            await self.client.aclose()
        except _ERRORS:  # closing a dead connection is not news
            pass


async def connect(
    url: str,
    *,
    timeout_s: float | None = None,
    socket_timeout_s: float | None = None,
    on_error: Callable[[str], None] | None = None,
) -> Store:
    """Open the store named by ``url`` (see gateway/store/url.py). No I/O happens here: a Redis
    that is down at start shows as StoreError on first use (and in /readyz), not as a failed start.

    ``timeout_s``/``socket_timeout_s`` override the URL's; ``on_error(op)`` is called once per
    failed operation (op = script name, or get/set/delete/ping) for ``gateway_store_errors_total``,
    whatever its ``StoreError.down``.
    """
    c = open_client(url, timeout_s=timeout_s, socket_timeout_s=socket_timeout_s)
    if c.kind == "memory":
        from gateway.store.embedded import EmbeddedStore  # lupa only when the embedded store is used

        return EmbeddedStore(on_error=on_error)
    return RedisStore(c.client, kind=c.kind, timeout_s=c.timeout_s, max_inflight=c.max_inflight,
                      on_error=on_error, pipelined=c.kind == "redis")
