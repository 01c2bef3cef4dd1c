"""memory://, the embedded default: the Store interface over data held in this process, the
gateway's Lua scripts run by an in-process Lua 5.1 (lupa, the Lua Redis embeds).

The same gateway/lua/*.lua files as on Redis, unchanged: each is compiled once into a function
of (KEYS, ARGV) in one Lua runtime that also holds the data (gateway/store/keyspace.lua: the
Redis commands the gateway uses), so a script's ``redis.call`` never leaves Lua. Redis'
conversions of a script's result apply (a number is truncated to an integer, ``false`` is nil,
a table is an array up to its first nil, ``{err=...}`` an error, ``{ok=...}`` a status).
No RESP, no connection, no lock: an operation yields to the event loop once before it starts
(as I/O would), then runs to its end before anything else touches the data, so a script is
atomic by construction and an operation is never slow nor cancelled halfway. The store is
never down; a script's own error (``error()``, a refused ``redis.call``) is
``StoreError(down=False)``, as Redis answering with an error is.

Measured (issue 9, tests/bench ``--only memory``): fakeredis behind redis-py's client cost
~3 ms of CPU a request (RESP both ways, a fake connection, its command layer). The data in
Python dicts, reached by one lupa crossing per ``redis.call``, cost ~75 us per admit.lua or
settle.lua; in Lua, with a script's reply shaped for one crossing back, ~50.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from importlib import resources
from typing import Any

from lupa import lua51
from redis.exceptions import ResponseError

from gateway.store import StoreError, script


class EmbeddedStore:
    """The Store interface (gateway/store/__init__.py) on this process' own keyspace."""

    kind = "memory"

    def __init__(self, *, on_error: Callable[[str], None] | None = None) -> None:
        self.on_error = on_error
        self.healthy = True  # nothing to lose touch with
        self.last_error: str | None = None
        self.client = Client(self)
        self._lua = lua51.LuaRuntime(encoding=None)
        self._table = self._lua.table_from
        source = (resources.files("gateway") / "store" / "keyspace.lua").read_text(encoding="utf-8")
        keyspace = self._lua.execute(source, name="@keyspace.lua")
        self._begin, self.call = keyspace[b"begin"], keyspace[b"call"]
        self._shape, self._run_script = keyspace[b"shape"], keyspace[b"run"]
        self._lua.globals().redis = self._table({b"call": self.call})
        self._scripts: dict[str, Any] = {}

    def begin(self) -> None:
        """Start one operation: its clock frozen (as a script's is in Redis), expired keys gone."""
        self._begin(time.time_ns() // 1000)

    def eval(self, source: str, keys: Sequence[Any], args: Sequence[Any], name: str = "script") -> Any:
        """Run Lua ``source`` as EVAL would (compiled once); raises LuaError."""
        fn = self._scripts.get(source)
        if fn is None:  # on one line, so the script's line numbers stay its own in errors
            wrapped = f"return function(KEYS, ARGV) {source}\nend"
            fn = self._scripts[source] = self._lua.execute(wrapped, name=f"@{name}")
        return self._reply(self._run_script(fn, self._table(_args(keys)), self._table(_args(args))))

    def command(self, name: bytes, *args: Any) -> Any:
        """One Redis command on the keyspace, its reply as redis-py reads it; raises LuaError."""
        return self._reply(self._shape(self.call(name, *_args(args))))

    async def _run(self, op: str, command: Callable[[], Any]) -> Any:
        """One operation, whole, at its frozen time; any failure its StoreError.

        It yields to the event loop once first, as any store's I/O does: a loop of store calls
        never starves the others, and a caller cancelled there leaves the operation unrun."""
        await asyncio.sleep(0)
        self.begin()
        try:
            return command()
        except (lua51.LuaError, TypeError) as e:  # TypeError: an argument of no Redis type
            if self.on_error is not None:
                self.on_error(op)
            raise StoreError(f"store {op} failed: {type(e).__name__}: {_message(e)}", op=op, down=False) from None

    # ---- the Store interface ----------------------------------------------------------------

    async def run_script(self, name: str, keys: Sequence[str], args: Sequence[Any], *,
                         timeout_s: float | None = None) -> Any:
        return await self._run(name, lambda: self.eval(script(name)[0], keys, args, f"{name}.lua"))

    async def get(self, key: str, *, timeout_s: float | None = None) -> bytes | None:
        return await self._run("get", lambda: self.command(b"GET", key))

    async def get_range(self, key: str, start: int, end: int, *, timeout_s: float | None = None) -> bytes:
        return await self._run("get_range", lambda: self.command(b"GETRANGE", key, start, end))

    async def get_ranges(self, key: str, ranges: Sequence[tuple[int, int]], *,
                         timeout_s: float | None = None) -> list[bytes]:
        return await self._run("get_range", lambda: [self.command(b"GETRANGE", key, s, e) for s, e in ranges])

    async def set(self, key: str, value: bytes, *, ttl_s: float, only_if_absent: bool = False,
                  timeout_s: float | None = None) -> bool:
        options = ("PX", max(1, int(ttl_s * 1000)), *(("NX",) if only_if_absent else ()))
        return await self._run("set", lambda: self.command(b"SET", key, value, *options)) is not None

    async def delete(self, key: str, *, timeout_s: float | None = None) -> None:
        await self._run("delete", lambda: self.command(b"DEL", key))

    async def ping(self, *, timeout_s: float | None = None) -> None:
        return None

    async def close(self) -> None:
        return None

    def _reply(self, shaped: tuple) -> Any:
        """A reply shaped by keyspace.lua as Redis returns it (and redis-py reads it)."""
        if type(shaped) is not tuple:  # Lua returned the tag alone: an empty array
            return []
        tag, value = shaped[0], shaped[1]
        if tag == 0:
            return _scalar(value)
        if tag == 1:
            return [self._item(x) for x in shaped[1:]]
        if tag == 2:
            raise lua51.LuaError(value.decode(errors="replace") if isinstance(value, bytes) else str(value))
        if tag == 3:
            return value
        out, i = [], 1  # a long array, walked here
        while (x := value[i]) is not None:
            out.append(self._item(x))
            i += 1
        return out

    def _item(self, x: Any) -> Any:
        return self._reply(self._shape(x)) if lua51.lua_type(x) == "table" else _scalar(x)


def _scalar(x: Any) -> Any:
    """A Lua value as Redis returns it: a number truncated to an integer, true 1, false nil."""
    if x is None or x is False:
        return None
    if x is True:
        return 1
    if isinstance(x, float):
        return int(x)
    if isinstance(x, (bytes, int)):
        return x
    raise lua51.LuaError(f"ERR a script returned a Lua {lua51.lua_type(x)}")


def _message(e: Exception) -> str:
    return str(e).split("\nstack traceback:")[0]  # Lua's traceback is of no use to a reader


def _args(xs: Sequence[Any]) -> list[bytes]:
    # str and int first: nearly every key and argument is one
    return [x.encode() if type(x) is str else str(x).encode() if type(x) is int else _arg(x) for x in xs]


def _arg(x: Any) -> bytes:
    """A key or an argument as redis-py would send it: bytes, str as UTF-8, numbers as text."""
    if isinstance(x, (bytes, bytearray, memoryview)):
        return bytes(x)
    if isinstance(x, str):
        return x.encode()
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return repr(x).encode()
    raise TypeError(f"Invalid input of type: {type(x).__name__!r}. Convert to a bytes, string, int or float first.")


class Client:
    """The keyspace through redis-py's asyncio API, for the commands tools and tests use to look
    at keys directly (``store.client.zcard(...)``, as on a Redis-backed store)."""

    def __init__(self, store: EmbeddedStore) -> None:
        self._store = store

    async def execute_command(self, name: str, *args: Any) -> Any:
        return await self._answer(lambda: self._store.command(name.encode(), *args))

    async def eval(self, source: str, numkeys: int, *keys_and_args: Any) -> Any:
        return await self._answer(lambda: self._store.eval(source, keys_and_args[:numkeys], keys_and_args[numkeys:]))

    async def _answer(self, command: Callable[[], Any]) -> Any:
        await asyncio.sleep(0)
        self._store.begin()
        try:
            return command()
        except lua51.LuaError as e:
            raise ResponseError(_message(e)) from None

    async def get(self, key: Any) -> bytes | None:
        return await self.execute_command("GET", key)

    async def set(self, key: Any, value: Any, *, ex: int | None = None, px: int | None = None,
                  nx: bool = False) -> bool | None:
        options = [*(("EX", ex) if ex else ()), *(("PX", px) if px else ()), *(("NX",) if nx else ())]
        return await self.execute_command("SET", key, value, *options) == b"OK" or None

    async def delete(self, *keys: Any) -> int:
        return await self.execute_command("DEL", *keys)

    async def exists(self, *keys: Any) -> int:
        return await self.execute_command("EXISTS", *keys)

    async def keys(self, pattern: Any = "*") -> list[bytes]:
        return await self.execute_command("KEYS", pattern)

    async def pttl(self, key: Any) -> int:
        return await self.execute_command("PTTL", key)

    async def zcard(self, key: Any) -> int:
        return await self.execute_command("ZCARD", key)

    async def zrange(self, key: Any, start: int, end: int) -> list[bytes]:
        return await self.execute_command("ZRANGE", key, start, end)

    async def script_flush(self) -> bool:
        self._store._scripts.clear()
        return True

    async def aclose(self) -> None:
        return None
