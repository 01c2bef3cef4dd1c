"""The store boundary: URL parsing, error translation, bounded waits, and the embedded backend."""
from __future__ import annotations

import asyncio

import pytest
from redis.exceptions import ConnectionError, RedisClusterException, ResponseError, TimeoutError

from gateway.store import RedisStore, StoreError, _cluster_nodes, connect


@pytest.fixture
async def memory():
    s = await connect("memory://")
    yield s
    await s.close()


async def test_memory_get_set_delete(memory):
    assert await memory.get("k") is None
    assert await memory.set("k", b"v", ttl_s=60) is True
    assert await memory.set("k", b"w", ttl_s=60, only_if_absent=True) is False
    assert await memory.get("k") == b"v"
    await memory.delete("k")
    assert await memory.get("k") is None
    await memory.ping()
    assert memory.healthy and memory.kind == "memory"


async def test_memory_stores_are_separate():
    a, b = await connect("memory://"), await connect("memory://")
    await a.set("k", b"1", ttl_s=60)
    assert await b.get("k") is None


async def test_script_is_loaded_again_after_the_cache_is_flushed(memory):
    assert await memory.run_script("usage", ["gw:{team:a}:x"], []) == [[]]
    await memory.client.script_flush()
    assert await memory.run_script("usage", ["gw:{team:a}:x"], []) == [[]]


class FailingClient:
    def __init__(self, exc):
        self.exc, self.calls = exc, 0

    async def evalsha(self, *args):
        self.calls += 1
        if self.exc is not None:
            raise self.exc
        return "ok"

    async def get(self, key):
        return await self.evalsha()


@pytest.mark.parametrize("exc", [
    ConnectionError("refused"), TimeoutError("read timed out"), ResponseError("ERR boom"),
    RedisClusterException("no slots"), OSError("reset"), AttributeError("'NoneType' has no 'writelines'"),
])
async def test_every_client_error_becomes_one_store_error(exc):
    ops = []
    client = FailingClient(exc)
    s = RedisStore(client, kind="redis", on_error=ops.append)
    with pytest.raises(StoreError) as e:
        await s.run_script("admit", ["k"], [])
    assert e.value.op == "admit" and ops == ["admit"]
    assert s.healthy is False and type(exc).__name__ in s.last_error
    client.exc = None
    assert await s.run_script("admit", ["k"], []) == "ok"  # the probe succeeds: healthy again
    assert s.healthy is True


class HungClient:
    async def evalsha(self, *args):
        await asyncio.sleep(3600)

    async def get(self, key):
        await asyncio.sleep(3600)


async def test_a_hung_store_costs_at_most_the_timeout():
    s = RedisStore(HungClient(), kind="redis", timeout_s=0.2)
    with pytest.raises(StoreError):
        await asyncio.wait_for(s.run_script("admit", ["k"], []), 5)
    assert "TimeoutError" in s.last_error


async def test_while_down_one_operation_probes_and_the_others_fail_at_once():
    ops = []
    s = RedisStore(HungClient(), kind="redis", timeout_s=0.5, on_error=ops.append)
    s.healthy = False
    probe = asyncio.create_task(s.get("k"))
    await asyncio.sleep(0.01)
    for _ in range(5):  # answered at once, without waiting on the hung store
        with pytest.raises(StoreError):
            await asyncio.wait_for(s.get("k"), 0.1)
    with pytest.raises(StoreError):
        await probe
    assert ops == ["get"] * 6


async def test_redis_url_carries_password_db_and_timeouts():
    s = await connect("redis://:s%40cret@127.0.0.1:6390/3?timeout=0.3&socket_timeout=0.2&max_connections=8")
    kw = s.client.connection_pool.connection_kwargs
    assert (kw["password"], kw["db"], kw["socket_timeout"], kw["socket_connect_timeout"]) == ("s@cret", 3, 0.2, 0.2)
    assert s.timeout_s == 0.3 and s.kind == "redis"
    await s.close()


async def test_defaults_are_short():
    s = await connect("redis://127.0.0.1:6390/0")
    kw = s.client.connection_pool.connection_kwargs
    assert s.timeout_s == 1.0 and kw["socket_timeout"] == 0.5 and kw["socket_connect_timeout"] == 0.5
    assert kw["retry"].get_retries() == 0
    await s.close()


def test_cluster_url_lists_nodes_and_credentials():
    nodes, user, password = _cluster_nodes("app:pw@10.0.0.1:7000,10.0.0.2:7001")
    assert [(n.host, n.port) for n in nodes] == [("10.0.0.1", 7000), ("10.0.0.2", 7001)]
    assert (user, password) == ("app", "pw")


@pytest.mark.parametrize("url", ["mysql://x", "redis://h:1/0?timeout=soon", "redis+cluster://nohostport"])
async def test_bad_urls_are_refused(url):
    with pytest.raises(ValueError):
        await connect(url)


class SlowClient:
    async def get(self, key):
        await asyncio.sleep(0.3)
        return b"v"


async def test_waiting_for_a_free_connection_is_not_an_outage():
    s = RedisStore(SlowClient(), kind="redis", timeout_s=0.45, max_inflight=1)
    results = await asyncio.gather(*(s.get("k") for _ in range(3)), return_exceptions=True)
    assert results[:2] == [b"v", b"v"]  # the second waited 0.3 s for the connection: fine
    assert isinstance(results[2], StoreError) and "busy" in str(results[2])
    assert s.healthy is True and s.last_error is None
