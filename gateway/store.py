"""connect(url) -> the one store interface used by limits, the usage ledger and the cache.

STUB: interface only; being implemented. Backends: memory:// (fakeredis + Lua in process),
redis:// and rediss:// (one node), redis+cluster:// (Redis Cluster).
"""
from __future__ import annotations

from typing import Any, Protocol, Sequence


class Store(Protocol):
    async def run_script(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """EVALSHA the Lua script gateway/lua/<name>.lua (loading it on NOSCRIPT)."""

    async def get(self, key: str) -> bytes | None: ...

    async def set(self, key: str, value: bytes, *, ttl_s: float, only_if_absent: bool = False) -> bool: ...

    async def delete(self, key: str) -> None: ...

    async def ping(self) -> None:
        """Raise StoreError when the store does not answer."""

    async def close(self) -> None: ...


class StoreError(Exception):
    """Any failure talking to the store (connection, timeout, script error)."""


async def connect(url: str) -> Store:
    raise NotImplementedError
