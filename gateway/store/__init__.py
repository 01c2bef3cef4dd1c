"""connect(url) -> the one store interface used by limits, the usage ledger and the cache.

Backends, chosen by the URL scheme (gateway/store_url.py): memory:// (fakeredis in this
process, with Lua), redis:// and rediss:// (one node), redis+cluster:// and rediss+cluster://.

All three run the same Lua scripts (gateway/lua/<name>.lua), so the embedded default and Redis
cannot drift. This module is the one boundary to Redis: every redis, socket and timeout error
becomes ``StoreError`` here, once. Socket timeouts are short and redis-py does no retries, so a
dead or hung Redis costs an operation at most ``timeout`` (default 1 s), never a hang; the pool
reconnects by itself when Redis is back. While it is down, one operation at a time probes it
and the others fail at once.

On one Redis node, scripts issued in the same event-loop tick share one pipeline
(gateway/store_batch.py): one write, one connection, one timeout, and each caller still gets
its own answer or its own StoreError. The scripts themselves stay separate, each atomic.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
from functools import lru_cache
from importlib import resources
from typing import Any, Awaitable, Callable, NoReturn, Protocol, Sequence

from redis.exceptions import NoScriptError, RedisClusterException, RedisError, ResponseError

from gateway.store.batch import Batcher
from gateway.store.url import _cluster_nodes, open_client  # noqa: F401  (_cluster_nodes: unit tests reach it here)

log = logging.getLogger(__name__)

_ERRORS = (RedisError, RedisClusterException, OSError, EOFError)  # OSError covers TimeoutError


class Store(Protocol):
    healthy: bool
    last_error: str | None

    async def run_script(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """EVALSHA the Lua script gateway/lua/<name>.lua (loading it on NOSCRIPT)."""

    async def get(self, key: str) -> bytes | None: ...

    async def get_range(self, key: str, start: int, end: int) -> bytes:
        """GETRANGE: bytes ``start..end`` (inclusive) of a string value, b"" if absent."""

    async def get_ranges(self, key: str, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        """Several GETRANGEs of one key (each ``(start, end)``, inclusive) in one round trip,
        not atomic: each answer as ``get_range`` would give it, in order."""

    async def set(self, key: str, value: bytes, *, ttl_s: float, only_if_absent: bool = False) -> bool: ...

    async def delete(self, key: str) -> None: ...

    async def ping(self) -> None:
        """Raise StoreError when the store does not answer."""

    async def close(self) -> None: ...


class StoreError(Exception):
    """Any failure talking to the store (connection, timeout, script error)."""

    def __init__(self, message: str, *, op: str = ""):
        super().__init__(message)
        self.op = op


@lru_cache(maxsize=None)
def script(name: str) -> tuple[str, str]:
    """(source, sha1) of gateway/lua/<name>.lua, read once per process."""
    source = (resources.files("gateway") / "lua" / f"{name}.lua").read_text(encoding="utf-8")
    return source, hashlib.sha1(source.encode()).hexdigest()


class _Failed(Exception):
    """An attempt that failed, before it becomes each caller's StoreError (counted once per caller)."""

    def __init__(self, reason: str, *, down: bool):
        super().__init__(reason)
        self.reason, self.down = reason, down


class RedisStore:
    """The Store interface over any redis-py asyncio client (fakeredis, one node, Cluster).

    ``healthy`` and ``last_error`` follow the last operation, for /readyz.

    With ``pipelined`` (one Redis node), scripts issued in one event-loop tick share one
    pipeline (store_batch.Batcher), each batch guarded like one call and each caller still
    answered on its own. Without it (fakeredis, where there is no round trip to save, and
    Cluster, whose redis-py pipeline refuses EVALSHA) every operation is its own call.
    """

    def __init__(
        self,
        client: Any,
        *,
        kind: str,
        timeout_s: float = 1.0,
        max_inflight: int = 64,
        on_error: Callable[[str], None] | None = None,
        pipelined: bool = False,
    ) -> None:
        self.client = client
        self.kind = kind  # memory | redis | cluster
        self.timeout_s = timeout_s
        self.on_error = on_error
        self.healthy = True
        self.last_error: str | None = None
        # bounds in-flight commands (or pipelines) to the pool size: queue briefly instead of failing
        self._slots = asyncio.Semaphore(max_inflight)
        self._probing = False
        self.pipelined = pipelined
        self._batcher = Batcher(client, guard=self._attempt, error=self._error) if pipelined else None

    async def _acquire_slot(self) -> bool:
        """A connection slot, waiting at most ``timeout``; False when none came free in time."""
        if not self._slots.locked():  # the common case: no timer to arm
            await self._slots.acquire()
            return True
        try:  # waiting for a free connection is load, not an outage
            async with asyncio.timeout(self.timeout_s):
                await self._slots.acquire()
            return True
        except TimeoutError:
            return False

    async def _call(self, op: str, fn: Callable[[], Awaitable[Any]]) -> Any:
        try:
            return await self._attempt(op, fn)
        except _Failed as f:
            self._failed(op, f.reason, down=f.down)

    def _refusal(self) -> str | None:
        """Why to fail at once, untried: down, and another operation is already probing."""
        return f"unavailable ({self.last_error})" if not self.healthy and self._probing else None

    async def _attempt(self, op: str, fn: Callable[[], Awaitable[Any]]) -> Any:
        """fn() (one call, or one whole batch) under the probe rule, a connection slot and the
        backstop timeout. Raises only _Failed: the caller turns it into StoreErrors."""
        if (refusal := self._refusal()) is not None:
            raise _Failed(refusal, down=False)
        probe = not self.healthy  # down: this operation probes, the rest fail fast meanwhile
        if probe:
            self._probing = True
        try:
            if not await self._acquire_slot():
                raise _Failed("busy: no free connection in time", down=False)
            try:
                # the socket timeouts normally end a hung call first; this is the backstop
                async with asyncio.timeout(self.timeout_s):
                    if self.kind == "cluster":
                        # (re)discover the slots before any command: redis-py's lazy discovery
                        # races when many commands trigger it at once. A no-op once known.
                        await self.client.initialize()
                    result = await fn()
            finally:
                self._slots.release()
        except _Failed:
            raise
        except Exception as e:  # the boundary: nothing from redis-py goes further up
            if not isinstance(e, ResponseError):  # Redis answered: its connections are fine
                await self._drop_idle_connections()
            raise _Failed(self._reason(op, e), down=True) from None
        finally:
            if probe:
                self._probing = False
        self.healthy = True
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
        if down:
            self.healthy, self.last_error = False, reason
        if self.on_error is not None:
            self.on_error(op)
        return StoreError(f"store {op} failed: {reason}", op=op)

    def _failed(self, op: str, reason: str, *, down: bool) -> NoReturn:
        raise self._failure(op, reason, down=down) from None

    def _error(self, op: str, e: Exception) -> StoreError:
        """A pipelined caller's StoreError: its batch's failure, or its own script's error."""
        if isinstance(e, _Failed):
            return self._failure(op, e.reason, down=e.down)
        return self._failure(op, self._reason(op, e), down=True)

    # ---- the Store interface ----------------------------------------------------------------

    async def run_script(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        source, sha = script(name)
        if self._batcher is not None:
            if (refusal := self._refusal()) is not None:  # don't queue behind the probe
                self._failed(name, refusal, down=False)
            return await self._batcher.submit(name, ("EVALSHA", sha, len(keys), *keys, *args), source)

        async def run() -> Any:
            try:
                return await self.client.evalsha(sha, len(keys), *keys, *args)
            except NoScriptError:  # first use on this node: EVAL sends it and caches it
                return await self.client.eval(source, len(keys), *keys, *args)

        return await self._call(name, run)

    async def get(self, key: str) -> bytes | None:
        return await self._call("get", lambda: self.client.get(key))

    async def get_range(self, key: str, start: int, end: int) -> bytes:
        # A plain command, never a script: Redis hashes every byte of a string passed into Lua
        # (~1.5 ms of its CPU per MB), which big cache reads must not pay.
        return await self._call("get_range", lambda: self.client.getrange(key, start, end))

    async def get_ranges(self, key: str, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        # One non-transactional pipeline: one key, so one node (and one slot) on a cluster too.
        async def run() -> list[bytes]:
            pipe = self.client.pipeline(transaction=False)
            for start, end in ranges:
                pipe.getrange(key, start, end)
            return await pipe.execute()

        return await self._call("get_range", run)

    async def set(self, key: str, value: bytes, *, ttl_s: float, only_if_absent: bool = False) -> bool:
        px = max(1, int(ttl_s * 1000))
        return bool(await self._call("set", lambda: self.client.set(key, value, px=px, nx=only_if_absent)))

    async def delete(self, key: str) -> None:
        await self._call("delete", lambda: self.client.delete(key))

    async def ping(self) -> None:
        await self._call("ping", self.client.ping)

    async def close(self) -> None:
        if self._batcher is not None:  # answer every caller queued or in flight first
            await self._batcher.drain()
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
) -> RedisStore:
    """Open the store named by ``url`` (see gateway/store_url.py). No I/O happens here: a Redis
    that is down at start shows as StoreError on first use (and in /readyz), not as a failed start.

    ``timeout_s``/``socket_timeout_s`` override the URL's; ``on_error(op)`` is called once per
    failed operation (op = script name, or get/set/delete/ping) for ``gateway_store_errors_total``.
    """
    c = open_client(url, timeout_s=timeout_s, socket_timeout_s=socket_timeout_s)
    return RedisStore(c.client, kind=c.kind, timeout_s=c.timeout_s, max_inflight=c.max_inflight,
                      on_error=on_error, pipelined=c.kind == "redis")
