"""connect(url) -> the one store interface used by limits, the usage ledger and the cache.

Backends, chosen by the URL scheme:

    memory://                     fakeredis in this process (with Lua): one process only
    redis://[:pw@]host:port/db    one Redis node (rediss:// for TLS)
    redis+cluster://host:port[,host:port...]   Redis Cluster (rediss+cluster:// for TLS)

All three run the same Lua scripts (gateway/lua/<name>.lua), so the embedded default and Redis
cannot drift. This module is the one boundary to Redis: every redis, socket and timeout error
becomes ``StoreError`` here, once. Socket timeouts are short and redis-py does no retries, so a
dead or hung Redis costs an operation at most ``timeout`` (default 1 s), never a hang; the pool
reconnects by itself when Redis is back. While it is down, one operation at a time probes it
and the others fail at once.

On one Redis node, scripts are auto-pipelined (see RedisStore): those issued in the same
event-loop tick share one write, one connection and one timeout, and each caller still gets its
own answer or its own StoreError. That is what makes admission + settlement cheap on the hot
path; the scripts themselves stay separate, each atomic.

URL query options (ours, removed before the URL reaches redis-py): ``timeout`` (whole
operation, s, default 1.0), ``socket_timeout`` and ``socket_connect_timeout`` (s, default 0.5),
``max_connections`` (in-flight operations per store, default 64).
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
from functools import lru_cache
from importlib import resources
from typing import Any, Awaitable, Callable, NoReturn, Protocol, Sequence
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import DataError, NoScriptError, RedisClusterException, RedisError, ResponseError

try:
    from hiredis import pack_command as _hiredis_pack
except ImportError:  # redis-py's own packer does the same, slower
    _hiredis_pack = None

log = logging.getLogger(__name__)

_ERRORS = (RedisError, RedisClusterException, OSError, EOFError)  # OSError covers TimeoutError
_OUR_OPTIONS = ("timeout", "socket_timeout", "socket_connect_timeout", "max_connections")


class Store(Protocol):
    healthy: bool
    last_error: str | None

    async def run_script(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """EVALSHA the Lua script gateway/lua/<name>.lua (loading it on NOSCRIPT)."""

    async def get(self, key: str) -> bytes | None: ...

    async def get_range(self, key: str, start: int, end: int) -> bytes:
        """GETRANGE: bytes ``start..end`` (inclusive) of a string value, b"" if absent."""

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


class RedisStore:
    """The Store interface over any redis-py asyncio client (fakeredis, one node, Cluster).

    ``healthy`` and ``last_error`` follow the last operation, for /readyz.

    With ``pipelined`` (one Redis node), scripts are auto-pipelined: every ``run_script`` issued
    in one event-loop tick is queued and sent on the next tick as ONE non-transactional
    pipeline, on one connection, under one timeout. Each caller still gets its own result or
    its own StoreError (NOSCRIPT is reloaded per script, errors are translated once per call);
    the scripts stay separate atomic units, only their round trips are shared. Without it
    (fakeredis, where there is no round trip to save, and Cluster, whose redis-py pipeline
    refuses EVALSHA) every operation is its own call.
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
        self._queue: list[tuple[str, tuple, asyncio.Future, str]] = []  # (op, command, caller, script source)
        self._batches: set[asyncio.Task] = set()

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
        probe = False
        if not self.healthy:  # down: one operation probes, the rest fail fast meanwhile
            if self._probing:
                self._failed(op, f"unavailable ({self.last_error})", down=False)
            self._probing = probe = True
        try:
            if not await self._acquire_slot():
                self._failed(op, "busy: no free connection in time", down=False)
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
        except StoreError:
            raise
        except Exception as e:  # the boundary: nothing from redis-py goes further up
            if not isinstance(e, ResponseError):  # Redis answered: its connections are fine
                await self._drop_idle_connections()
            self._failed(op, self._reason(op, e), down=True)
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

    # ---- auto-pipelining (one Redis node) ---------------------------------------------------

    def _enqueue(self, op: str, command: tuple, source: str) -> asyncio.Future:
        if not self.healthy and self._probing:  # down and already probed: fail at once
            self._failed(op, f"unavailable ({self.last_error})", down=False)
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        if not self._queue:
            loop.call_soon(self._flush)
        self._queue.append((op, command, future, source))
        return future

    def _flush(self) -> None:
        # callers cancelled in the meantime (client gone) are not sent at all
        batch = [c for c in self._queue if not c[2].done()]
        self._queue = []
        if batch:
            task = asyncio.get_running_loop().create_task(self._run_batch(batch))
            self._batches.add(task)
            task.add_done_callback(self._batches.discard)

    async def _run_batch(self, batch: list[tuple[str, tuple, asyncio.Future, str]]) -> None:
        """Send one batch; settle every caller's future, each exactly once. Never raises."""
        probe = False
        if not self.healthy:  # down: one batch probes, the rest fail fast meanwhile
            if self._probing:
                self._reject(batch, f"unavailable ({self.last_error})", down=False)
                return
            self._probing = probe = True
        try:
            if not await self._acquire_slot():
                self._reject(batch, "busy: no free connection in time", down=False)
                return
            try:
                # socket timeouts normally end a hung pipeline first; this is the backstop,
                # once for the whole batch
                async with asyncio.timeout(self.timeout_s):
                    results = await self._pipeline(batch)
            finally:
                self._slots.release()
        except Exception as e:  # the whole pipeline failed: so did every call in it
            if not isinstance(e, ResponseError):
                await self._drop_idle_connections()
            self._reject(batch, self._reason(batch[0][0], e), down=True)
            return
        except BaseException:  # this task itself cancelled (the loop is closing): so are its callers
            for _, _, future, _ in batch:
                future.cancel()
            raise
        finally:
            if probe:
                self._probing = False
        self.healthy = True
        for (op, _, future, _), result in zip(batch, results):
            if isinstance(result, Exception):  # this call's own error (a script error)
                err = self._failure(op, self._reason(op, result), down=True)
                if not future.done():
                    future.set_exception(err)
            elif not future.done():
                future.set_result(result)

    def _reject(self, batch: list, reason: str, *, down: bool) -> None:
        for op, _, future, _ in batch:
            err = self._failure(op, reason, down=down)
            if not future.done():
                future.set_exception(err)

    async def _pipeline(self, batch: list[tuple[str, tuple, asyncio.Future, str]]) -> list[Any]:
        """The batch's commands written at once on one pooled connection, then every answer read:
        a result or that command's own error each. A failure of the connection raises."""
        pool = self.client.connection_pool
        conn = await pool.get_connection()
        try:
            results = await _exchange(conn, [command for _, command, _, _ in batch])
            again = [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]
            if again:  # first use on this node: EVAL sends the scripts and caches them
                evals = [("EVAL", batch[i][3], *batch[i][1][2:]) for i in again]
                for i, r in zip(again, await _exchange(conn, evals)):
                    results[i] = r
            return results
        finally:
            await pool.release(conn)

    # ---- the Store interface ----------------------------------------------------------------

    async def run_script(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        source, sha = script(name)
        if self.pipelined:
            return await self._enqueue(name, ("EVALSHA", sha, len(keys), *keys, *args), source)

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

    async def set(self, key: str, value: bytes, *, ttl_s: float, only_if_absent: bool = False) -> bool:
        px = max(1, int(ttl_s * 1000))
        return bool(await self._call("set", lambda: self.client.set(key, value, px=px, nx=only_if_absent)))

    async def delete(self, key: str) -> None:
        await self._call("delete", lambda: self.client.delete(key))

    async def ping(self) -> None:
        await self._call("ping", self.client.ping)

    async def close(self) -> None:
        if self._queue:  # queued this tick: send them rather than leave their callers waiting
            self._flush()
        if self._batches:  # let the pipelines in flight answer their callers (each is bounded)
            await asyncio.gather(*self._batches, return_exceptions=True)
        try:
            await self.client.aclose()
        except _ERRORS:  # closing a dead connection is not news
            pass


async def _exchange(conn: Any, commands: list[tuple]) -> list[Any]:
    """Write ``commands`` in one go on ``conn`` and read one answer each, in order. A command
    that cannot even be encoded is not sent: its result is its DataError."""
    packed: list[bytes] = []
    unsent: dict[int, Exception] = {}
    for i, command in enumerate(commands):
        try:
            packed.append(_pack(conn, command))
        except DataError as e:  # a caller's bad argument: its own error, not the batch's
            unsent[i] = e
    if packed:
        await conn.send_packed_command(packed)
    results: list[Any] = []
    for i in range(len(commands)):
        if i in unsent:
            results.append(unsent[i])
            continue
        try:
            results.append(await conn.read_response())
        except ResponseError as e:  # this command's own error: the answers after it still follow
            results.append(e)
    return results


def _pack(conn: Any, command: tuple) -> bytes:
    """RESP for one command: hiredis' packer (C) when it takes every argument, else redis-py's."""
    if _hiredis_pack is not None:
        try:
            return _hiredis_pack(command)
        except TypeError:  # bytearray and the like; redis-py's packer knows them (or says why not)
            pass
    return b"".join(conn.pack_command(*command))


def _options(query: str) -> tuple[dict[str, float], str]:
    """Split our options out of a URL query; return them and the query left for redis-py."""
    ours: dict[str, float] = {}
    rest = []
    for k, v in parse_qsl(query, keep_blank_values=True):
        if k in _OUR_OPTIONS:
            try:
                ours[k] = float(v)
            except ValueError:
                raise ValueError(f"store.url: {k} must be a number, got {v!r}") from None
        else:
            rest.append((k, v))
    return ours, urlencode(rest)


def _cluster_nodes(netloc: str) -> tuple[list[ClusterNode], str | None, str | None]:
    creds, _, hosts = netloc.rpartition("@")
    user, _, password = creds.partition(":") if creds else ("", "", "")
    nodes = []
    for part in hosts.split(","):
        host, _, port = part.strip().rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"store.url: cluster node {part!r} must be host:port")
        nodes.append(ClusterNode(host.strip("[]"), int(port)))
    return nodes, unquote(user) or None, unquote(password) or None


async def connect(
    url: str,
    *,
    timeout_s: float | None = None,
    socket_timeout_s: float | None = None,
    on_error: Callable[[str], None] | None = None,
) -> RedisStore:
    """Open the store named by ``url``. No I/O happens here: a Redis that is down at start
    shows as StoreError on first use (and in /readyz), not as a failed start.

    ``timeout_s``/``socket_timeout_s`` override the URL's; ``on_error(op)`` is called once per
    failed operation (op = script name, or get/set/delete/ping) for ``gateway_store_errors_total``.
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "memory":
        import fakeredis  # embedded store only; not imported when Redis is configured

        client = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
        return RedisStore(client, kind="memory", timeout_s=timeout_s or 5.0, max_inflight=1024, on_error=on_error)

    ours, query = _options(parts.query)
    timeout = timeout_s or ours.get("timeout", 1.0)
    sock = socket_timeout_s or ours.get("socket_timeout", min(0.5, timeout))
    common: dict[str, Any] = {
        "socket_timeout": sock,
        "socket_connect_timeout": ours.get("socket_connect_timeout", sock),
        "retry": Retry(NoBackoff(), 0),  # no hidden retries: one attempt, bounded by the timeouts
    }
    inflight = int(ours.get("max_connections", 64))
    # The pool may hold more than we ever use at once, so a connection lost to a cancelled
    # call inside redis-py can never exhaust it.
    common["max_connections"] = 2 * inflight + 16
    if scheme in ("redis", "rediss"):
        client = aioredis.Redis.from_url(urlunsplit(parts._replace(query=query)), **common)
        kind = "redis"
    elif scheme in ("redis+cluster", "rediss+cluster"):
        nodes, user, password = _cluster_nodes(parts.netloc)
        extra = dict(parse_qsl(query))
        client = RedisCluster(
            startup_nodes=nodes,
            username=user,
            password=password,
            ssl=scheme.startswith("rediss"),
            ssl_cert_reqs=extra.get("ssl_cert_reqs", "required"),
            ssl_ca_certs=extra.get("ssl_ca_certs"),
            **common,
        )
        kind = "cluster"
    else:
        raise ValueError(f"store.url: unsupported scheme {parts.scheme!r} (memory, redis, rediss, redis+cluster)")
    return RedisStore(client, kind=kind, timeout_s=timeout, max_inflight=inflight, on_error=on_error,
                      pipelined=kind == "redis")
