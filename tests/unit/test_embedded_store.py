"""The embedded store (memory://) answers as Redis does: the same Lua, run against a real
redis-server and against the embedded store, gives the same replies and the same failures.

The behaviour suites (tests/integration/test_store.py, test_limits.py, ...) run the gateway's
own scripts on every backend; this file pins down the layer under them: Redis' conversions
between Lua and replies, and each command the scripts use, edge cases included.
"""
from __future__ import annotations

import subprocess
import sys
import time

import pytest
from redis.exceptions import ResponseError

from gateway.store import StoreError, connect
from tests.fixtures.gateway import wait_for


@pytest.fixture
async def pair(redis_server):
    """(embedded, redis) stores, both empty."""
    redis_server.start()
    redis_server.flush()
    memory, real = await connect("memory://"), await connect(redis_server.url)
    yield memory, real
    await memory.close()
    await real.close()


async def both(pair, source: str, keys=(), args=()) -> list:
    """The reply (or the error's type) of ``source`` on each store."""
    out = []
    for s in pair:
        try:
            out.append(await s.client.eval(source, len(keys), *keys, *args))
        except ResponseError:
            out.append(ResponseError)
    return out


CONVERSIONS = {
    "numbers are truncated to integers": "return {3.7, -3.7, 1e12 + 0.5, 0, 2^53}",
    "true is 1, false is nil": "return {true, false, 'x'}",
    "an array stops at its first nil": "return {1, 2, nil, 4}",
    "nested tables": "return {{1, 'a'}, {}, {{'deep'}}}",
    "a status": "return {ok = 'FINE'}",
    "an error table": "return {err = 'no good'}",
    "error()": "error('admit: out of range')",
    "a nil reply is false in Lua": "return {redis.call('GET', KEYS[1]) == false, redis.call('HGET', KEYS[1], 'f') == false}",
    "SET answers a status": "return redis.call('SET', KEYS[1], 'v')",
    "SET NX on a key present answers nil": "redis.call('SET', KEYS[1], 'v'); return redis.call('SET', KEYS[1], 'w', 'NX')",
    "numbers passed to redis.call are sent as text": "redis.call('SET', KEYS[1], 2.5); redis.call('HINCRBY', KEYS[2], 'f', 7); "
                                                     "return {redis.call('GET', KEYS[1]), redis.call('HGET', KEYS[2], 'f')}",
    "a fractional expiry is refused": "redis.call('SET', KEYS[1], 'v'); return redis.call('PEXPIRE', KEYS[1], 1.5)",
    "a wrong type fails the script": "redis.call('SET', KEYS[1], 'v'); return redis.call('HGETALL', KEYS[1])",
    "an unknown command fails the script": "return redis.call('NOSUCHCOMMAND', KEYS[1])",
    "ARGV and KEYS are strings": "return {type(KEYS[1]), type(ARGV[1]), ARGV[1], #ARGV}",
}


@pytest.mark.parametrize("source", CONVERSIONS.values(), ids=CONVERSIONS.keys())
async def test_replies_and_errors_are_redis_own(pair, source):
    memory, real = await both(pair, source, ["gw:a", "gw:b"], [12, "x"])
    assert memory == real


STRINGS = """
redis.call('SET', KEYS[1], '0123456789', 'PX', 60000)
local ttl = redis.call('PTTL', KEYS[1])
return {redis.call('STRLEN', KEYS[1]), redis.call('STRLEN', KEYS[2]),
        redis.call('GETRANGE', KEYS[1], 2, 4), redis.call('GETRANGE', KEYS[1], -3, -1),
        redis.call('GETRANGE', KEYS[1], 8, 20), redis.call('GETRANGE', KEYS[1], 5, 2),
        redis.call('GETRANGE', KEYS[2], 0, 3), ttl > 59000 and ttl <= 60000,
        redis.call('PTTL', KEYS[2]), redis.call('EXISTS', KEYS[1]), redis.call('EXISTS', KEYS[2]),
        redis.call('SET', KEYS[1], 'again'), redis.call('PTTL', KEYS[1]),
        redis.call('EXPIRE', KEYS[1], 100), redis.call('EXPIRE', KEYS[2], 100),
        redis.call('DEL', KEYS[1], KEYS[2]), redis.call('EXISTS', KEYS[1])}
"""

HASHES = """
local a = redis.call('HINCRBY', KEYS[1], 'tokens', 5)
local b = redis.call('HINCRBY', KEYS[1], 'tokens', -7)
redis.call('HINCRBY', KEYS[1], 'usd', 1000000000000)
return {a, b, redis.call('HGET', KEYS[1], 'tokens'), redis.call('HGETALL', KEYS[1]),
        redis.call('HGETALL', KEYS[2]), tonumber(redis.call('HGET', KEYS[1], 'usd'))}
"""

SORTED_SETS = """
local now = 1000.5
local added = redis.call('ZADD', KEYS[1], '1000.25', 'dead', '1000.5', 'edge', '2000.125', 'b', '3000', 'a')
return {added, redis.call('ZCOUNT', KEYS[1], '(1000.5', '+inf'), redis.call('ZCOUNT', KEYS[1], '1000.5', '+inf'),
        redis.call('ZCOUNT', KEYS[1], '-inf', '(3000'), redis.call('ZCOUNT', KEYS[2], '-inf', '+inf'),
        redis.call('ZRANGEBYSCORE', KEYS[1], string.format('(%.3f', now), '+inf', 'WITHSCORES', 'LIMIT', 0, 1),
        redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '+inf', 'LIMIT', 1, 2),
        redis.call('ZADD', KEYS[1], 'XX', 'CH', '5000', 'b', '5000', 'absent'),
        redis.call('ZADD', KEYS[1], 'XX', 'CH', '5000', 'b'),
        redis.call('ZADD', KEYS[1], '3000', 'a'),
        redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '1000.5'),
        redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '+inf', 'WITHSCORES'),
        redis.call('ZREM', KEYS[1], 'a', 'nobody'), redis.call('ZREM', KEYS[2], 'a'),
        redis.call('ZREM', KEYS[1], 'b'), redis.call('EXISTS', KEYS[1]),
        redis.call('ZADD', KEYS[2], 'XX', 'CH', '1', 'x'), redis.call('EXISTS', KEYS[2])}
"""


@pytest.mark.parametrize("source", [STRINGS, HASHES, SORTED_SETS], ids=["strings", "hashes", "sorted sets"])
async def test_every_command_the_scripts_use_answers_as_redis(pair, source):
    memory, real = await both(pair, source, ["gw:{t}:x", "gw:{t}:absent"])
    assert memory == real and memory != ResponseError


async def test_time_is_the_clock_in_seconds_and_microseconds(pair):
    for seconds, micros in await both(pair, "return redis.call('TIME')"):
        assert abs(int(seconds) - time.time()) < 60 and 0 <= int(micros) < 1_000_000


async def test_keys_expire(pair):
    memory, _ = pair
    await memory.set("gw:short", b"v", ttl_s=0.001)
    await memory.set("gw:long", b"v", ttl_s=60)
    await memory.client.eval("redis.call('SET', KEYS[1], 'v', 'PX', 1)", 1, "gw:lua")

    async def gone() -> bool:
        return await memory.client.exists("gw:short", "gw:lua") == 0

    await wait_for(gone, interval_s=0.005)
    assert await memory.get("gw:short") is None and await memory.client.exists("gw:lua") == 0
    assert await memory.get("gw:long") == b"v" and 59_000 < await memory.client.pttl("gw:long") <= 60_000
    assert await memory.client.keys("gw:*") == [b"gw:long"]


async def test_a_script_error_is_a_store_error_that_is_not_an_outage():
    errors: list[str] = []
    store = await connect("memory://", on_error=errors.append)
    with pytest.raises(StoreError) as e:
        await store.run_script("admit", ["only-one-key"], [])
    assert e.value.down is False and e.value.op == "admit" and "admit.lua:" in str(e.value)
    assert "stack traceback" not in str(e.value) and errors == ["admit"] and store.healthy
    with pytest.raises(StoreError) as e:
        await store.run_script("usage", ["k"], [object()])  # no Redis type: redis-py's DataError
    assert e.value.down is False and errors == ["admit", "usage"]


def test_the_embedded_store_needs_neither_fakeredis_nor_a_server():
    code = ("import asyncio, sys; from gateway.store import connect\n"
            "async def main():\n"
            "    store = await connect('memory://')\n"
            "    assert await store.run_script('usage', ['gw:{t}:day'], []) == [[]]\n"
            "asyncio.run(main()); print(sorted(m for m in sys.modules if m.split('.')[0] == 'fakeredis'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
