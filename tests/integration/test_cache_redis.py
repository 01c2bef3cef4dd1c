"""The cache across real ``gateway serve`` processes sharing a real redis-server (and a 3-node
Cluster): entries survive a restart, single-flight holds across replicas, and entries are
stored as raw bytes with the team's TTL.

The simulator runs in the test's event loop and counts upstream calls; the gateways are child
processes started from a config dict (tests/fixtures/gateway.py), so they share nothing but
the store. Clients are raw aiohttp (the SDK path is covered in tests/e2e/test_cache.py).
"""
from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

import aiohttp
import pytest
import redis.asyncio

from gateway.store import script
from tests.e2e.test_cache import WAIT_S, FlightWatch, assert_clean_error, assert_the_leader_served_the_waiter_who_stayed, body, calls, metric, post, scrape
from tests.fixtures.gateway import RunningGateway, gateway_config, stop_gateway, wait_for

# Cluster where the slot layout matters (an entry and its lock share a hash tag); the rest of
# the behaviour runs on Cluster in tests/e2e/test_cache.py with in-process replicas.
BOTH = pytest.mark.parametrize("store_url", ["redis", "cluster"], indirect=True)
REDIS = pytest.mark.parametrize("store_url", ["redis"], indirect=True)


@pytest.fixture
async def http():
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        yield session


@pytest.fixture
def spawn(gateway_processes, simulator, store_url):
    """``spawn(**sections)`` -> a gateway process on this test's store and simulator."""
    def start(teams: dict | None = None, **sections: Any) -> RunningGateway:
        sections["store"] = {"url": store_url, **sections.get("store", {})}
        return gateway_processes(gateway_config(simulator.url, simulator.api_key, teams, **sections))

    return start


@BOTH
async def test_a_hit_after_a_gateway_restart(spawn, http, simulator):
    first_gw = spawn()
    first = await post(http, first_gw, body(seed=101))
    assert first.status == 200 and first.cache == "MISS"
    stop_gateway(first_gw)

    second_gw = spawn()  # a new process: nothing in memory, only Redis remembers
    hit = await post(http, second_gw, body(seed=101))
    assert hit.status == 200 and hit.cache == "HIT" and "age" in hit.headers
    assert hit.images == first.images and hit.usage == first.usage
    streamed = await post(http, second_gw, body(seed=101, stream=True))
    assert streamed.cache == "HIT" and streamed.images == first.images and streamed.events[-1] == "[DONE]"
    assert await calls(simulator) == 1


@BOTH
async def test_a_big_entry_is_read_in_ranges_by_a_new_process(spawn, http, simulator):
    """Over one store read (2 MB): the hit streams the entry from Redis range by range."""
    payload = body(seed=107, sim_fault="image_mb=2")
    first_gw = spawn()
    first = await post(http, first_gw, payload)
    assert first.status == 200 and first.cache == "MISS" and len(first.images[0]) >= 2 * 1024 * 1024
    stop_gateway(first_gw)

    second_gw = spawn()
    hit = await post(http, second_gw, payload)
    assert hit.status == 200 and hit.cache == "HIT" and hit.images == first.images
    assert hit.headers["Content-Length"] == str(len(hit.raw))
    streamed = await post(http, second_gw, {**payload, "stream": True})
    assert streamed.cache == "HIT" and streamed.images == first.images and streamed.events[-1] == "[DONE]"
    assert await calls(simulator) == 1


@BOTH
async def test_an_entry_is_raw_bytes_with_the_teams_ttl(spawn, http, simulator, store_url, request):
    gw = spawn(cache={"ttl_s": 600})
    answer = await post(http, gw, body(seed=102, sim_fault="image_mb=1"))
    assert answer.cache == "MISS" and len(answer.images[0]) >= 1024 * 1024
    backend = request.getfixturevalue("redis_server" if store_url.startswith("redis://") else "redis_cluster")
    nodes = [backend] if store_url.startswith("redis://") else backend.nodes
    entries = []
    for node in nodes:
        with node.client() as client:
            entries += [(client.strlen(k), client.ttl(k)) for k in client.scan_iter("gw:cache:*:entry")]
    assert len(entries) == 1
    size, ttl = entries[0]
    # the image's decoded bytes plus a small envelope, not its base64 (a third larger)
    assert len(answer.images[0]) < size <= len(answer.images[0]) + 4096
    assert 0 < ttl <= 600


@BOTH
async def test_50_concurrent_identical_requests_across_two_processes_make_one_call(spawn, http, simulator):
    replicas = [spawn(), spawn()]
    payload = body(seed=103, sim_fault="latency_ms=1500")
    tasks = [post(http, replicas[i % 2], payload) for i in range(50)]
    answers = await asyncio.wait_for(asyncio.gather(*tasks), WAIT_S)
    assert [a.status for a in answers] == [200] * 50, [a.raw[:200] for a in answers if a.status != 200]
    assert await calls(simulator) == 1
    assert sorted(a.cache for a in answers) == ["HIT"] * 49 + ["MISS"]
    first = answers[0]
    assert len(first.images) == 1
    assert all((a.images, a.content, a.usage, a.finish_reason) == (first.images, first.content, first.usage, "stop")
               for a in answers)


@REDIS
async def test_when_the_leader_fails_no_waiter_hangs(spawn, http, simulator):
    # timeout_s well under WAIT_S: waiters that sat out the request timeout would each lead
    # unlocked, and show as extra upstream calls
    upstream = {"max_retries": 0, "timeout_s": 30}
    replicas = [spawn(upstream=upstream), spawn(upstream=upstream)]
    await simulator.script(["status=500"])  # the first upstream call fails, later ones succeed
    payload = body(seed=104, sim_fault="latency_ms=1000")
    tasks = [post(http, replicas[i % 2], {**payload, "stream": i % 4 == 1}) for i in range(20)]
    answers = await asyncio.wait_for(asyncio.gather(*tasks), WAIT_S)
    failed = [a for a in answers if a.status != 200 or a.error is not None]
    for a in failed:
        assert_clean_error(a)
    assert len(failed) == 1, "only the leader's client gets the upstream error"
    ok = [a for a in answers if a not in failed]
    assert all(a.images == ok[0].images and len(a.images) == 1 for a in ok)
    assert await calls(simulator) == 2  # one waiter took over; the others got its answer
    assert sorted(a.cache for a in ok) == ["HIT"] * 18 + ["MISS"]
    after = await post(http, replicas[1], payload)
    assert after.status == 200 and after.cache == "HIT"


@asynccontextmanager
async def flight_watch(store_url: str) -> AsyncIterator[FlightWatch]:
    """A ``FlightWatch`` fed by Redis ``MONITOR``: every gateway's lookups and lock attempts,
    counted as Redis runs them (the gateway gets each reply right after)."""
    watch, lookup_sha = FlightWatch(), script("cache_read")[1]
    client = redis.asyncio.Redis.from_url(store_url)

    async def count(monitor) -> None:
        async for seen in monitor.listen():
            name, _, rest = seen["command"].partition(" ")
            if seen["client_type"] == "lua":
                continue  # the commands inside a script
            if name.upper() == "EVALSHA" and rest.startswith(lookup_sha):
                watch.lookups += 1
            elif name.upper() == "SET" and rest.split(" ", 1)[0].endswith(":lock"):
                watch.locks += 1

    try:
        async with client.monitor() as monitor:
            counting = asyncio.create_task(count(monitor))
            try:
                yield watch
            finally:
                counting.cancel()
                await asyncio.gather(counting, return_exceptions=True)
    finally:
        await client.aclose()


@REDIS
async def test_a_waiters_disconnect_does_not_cancel_the_leader_on_another_process(spawn, http, simulator, store_url):
    """Leader on one process; on the other, a waiter that polls Redis for its process and two
    that wait on it. The first two leave; the leader and the last waiter are not disturbed."""
    leader_gw, waiter_gw = spawn(), spawn()
    payload = body(seed=105, sim_fault="latency_ms=2000")
    leader = asyncio.create_task(post(http, leader_gw, payload))
    await simulator.wait_for_stats(lambda s: s["calls"] == 1)
    async with aiohttp.ClientSession() as s1, aiohttp.ClientSession() as s2, flight_watch(store_url) as watch:
        waiters = []
        for session in (s1, s2, http):  # one at a time: the first to join polls for its process
            waiters.append(asyncio.create_task(post(session, waiter_gw, payload)))
            await wait_for(lambda: watch.joined(len(waiters)))
        assert await _inflight_is(http, waiter_gw, 3)
        for leaving in waiters[:2]:
            leaving.cancel()
            with pytest.raises(asyncio.CancelledError):
                await leaving
    await wait_for(lambda: _inflight_is(http, waiter_gw, 1))  # their handlers are gone
    assert (await simulator.stats())["inflight"]  # the leader's call is still running

    await assert_the_leader_served_the_waiter_who_stayed(http, simulator, leader, waiters[2], waiter_gw, payload)


@REDIS
async def test_team_scope_holds_across_processes(spawn, http, simulator):
    teams = {"alpha": {}, "beta": {}, "gamma": {"cache": {"scope": "global"}}, "delta": {"cache": {"scope": "global"}}}
    one, two = spawn(teams), spawn(teams)
    assert (await post(http, one, body(seed=106), team="alpha")).cache == "MISS"
    assert (await post(http, two, body(seed=106), team="beta")).cache == "MISS"  # never alpha's
    assert (await post(http, one, body(seed=106), team="gamma")).cache == "MISS"
    assert (await post(http, two, body(seed=106), team="delta")).cache == "HIT"  # global: shared
    assert await calls(simulator) == 3


async def _inflight_is(http, gw: RunningGateway, expected: float) -> bool:
    return metric(await scrape(http, gw), "gateway_inflight_requests", team="alpha") == expected
