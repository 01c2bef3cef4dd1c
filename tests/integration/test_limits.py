"""The limiter on real stores: the unit behaviour suite on memory, redis-server and a 3-node
Cluster; exactness under contention across separate connection pools (as separate replicas
would have); and Redis dying or hanging mid-load.
"""
from __future__ import annotations

import asyncio
import random
import time

import pytest

from gateway.config import Limits
from gateway.errors import RateLimited, StoreUnavailable
from gateway.limits.limiter import Limiter
from gateway.limits.plan import limit_keys
from gateway.store import connect
from gateway.usage import Usage
from tests.fixtures.redis import RedisClusterProcs
from tests.unit.test_account_limits import TestAccountBehaviour as _AccountBehaviour
from tests.unit.test_limits import CONFIG, Clock, TestBehaviour as _Behaviour, request, team


class TestBehaviourOnEveryStore(_Behaviour):
    """The same suite as tests/unit, once per backend (the ``store`` fixture is parametrized)."""


class TestAccountOnEveryStore(_AccountBehaviour):
    """Team and account in one script: on a Cluster, only if their keys share a hash slot."""


async def _replicas(url: str, n: int = 3, **kw) -> tuple[list, list[Limiter]]:
    stores = [await connect(url) for _ in range(n)]
    return stores, [Limiter(s, CONFIG, **kw) for s in stores]


async def _close(stores) -> None:
    for s in stores:
        await s.close()


async def _admitted_round_robin(limiters, t, i: int) -> bool:
    """Admit one request on replica ``i % len(limiters)``; True if it was let through."""
    try:
        await limiters[i % len(limiters)].admit(t, request())
        return True
    except RateLimited:
        return False


@pytest.mark.parametrize("store_url", ["redis", "cluster"], indirect=True)
async def test_500_concurrent_admits_across_three_replicas_admit_exactly_100(store_url):
    stores, limiters = await _replicas(store_url, clock=Clock())  # one instant: no refill
    t = team(Limits(requests_per_minute=100))

    results = await asyncio.gather(*(_admitted_round_robin(limiters, t, i) for i in range(500)))
    await _close(stores)
    assert sum(results) == 100


async def test_on_redis_time_only_the_refill_during_the_burst_is_added(redis_server):
    redis_server.start()
    stores, limiters = await _replicas(redis_server.url)  # production path: Redis TIME
    t = team(Limits(requests_per_minute=100))

    started = time.monotonic()
    results = await asyncio.gather(*(_admitted_round_robin(limiters, t, i) for i in range(500)))
    refill = int((time.monotonic() - started) * 100 / 60) + 1
    await _close(stores)
    assert 100 <= sum(results) <= 100 + refill


@pytest.mark.parametrize("store_url", ["redis", "cluster"], indirect=True)
async def test_max_concurrent_is_never_exceeded_across_replicas(store_url):
    stores, limiters = await _replicas(store_url)
    t = team(Limits(max_concurrent=5))
    inflight = peak = served = 0

    async def worker(i: int) -> None:
        nonlocal inflight, peak, served
        for _ in range(15):
            try:
                a = await limiters[i % 3].admit(t, request())
            except RateLimited:
                await asyncio.sleep(random.uniform(0, 0.004))
                continue
            inflight += 1  # after the lease was taken
            peak = max(peak, inflight)
            served += 1
            await asyncio.sleep(random.uniform(0, 0.01))
            inflight -= 1  # before the lease is given back
            await a.settle(Usage(prompt=1, completion=1))

    await asyncio.gather(*(worker(i) for i in range(30)))
    await _close(stores)
    assert peak == 5 and served > 5


PATIENCE_S = 1.0  # how long each admission waits for the store (a request's deadline)


async def _load(lim: Limiter, t, outcomes: list, stop: asyncio.Event) -> None:
    """Batches of concurrent requests until told to stop; each must answer within 10 s (a settle
    waits for a stalled store until its socket timeout, 5 s, says it is down)."""

    async def one() -> str:
        try:
            a = await lim.admit(t, request(), deadline=asyncio.get_running_loop().time() + PATIENCE_S)
        except StoreUnavailable:
            return "unavailable"
        await a.settle(Usage(prompt=1, completion=1))
        return "ok"

    while not stop.is_set():
        batch = [asyncio.wait_for(one(), 10) for _ in range(20)]
        outcomes.extend(await asyncio.gather(*batch, return_exceptions=True))
        await asyncio.sleep(0.01)


async def _until(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.05)


def _busy_team():
    return team(Limits(requests_per_minute=10**6, max_concurrent=10**6))


@pytest.mark.parametrize("mode", ["open", "closed"])
@pytest.mark.parametrize("failure", ["kill", "pause"])
async def test_redis_failing_mid_load_answers_promptly_then_recovers(fresh_redis_server, mode, failure):
    """``kill``: down, so ``on_error`` decides. ``pause``: slow past each request's patience,
    which is not an outage (503 whatever ``on_error`` says) until a connection stays silent for
    the socket timeout (down). Either way no request hangs and no admission is left behind."""
    store = await connect(fresh_redis_server.url)
    lim = Limiter(store, CONFIG, on_error=mode, lease_ttl_s=3)
    lim.start()
    t = _busy_team()
    outcomes: list = []
    stop = asyncio.Event()
    load = asyncio.create_task(_load(lim, t, outcomes, stop))
    await _until(lambda: "ok" in outcomes, 5, "no load before the failure")
    before = len(outcomes)
    if failure == "kill":
        fresh_redis_server.kill()
        await _until(lambda: not store.healthy, 5, "the failure went unnoticed")
    else:
        fresh_redis_server.pause()
        await _until(lambda: "unavailable" in outcomes[before:] or not store.healthy, 10, "the stall went unnoticed")
    mark = len(outcomes)
    await _until(lambda: len(outcomes) > mark, 15, "no load against the dead/hung Redis")  # a whole batch more
    during = len(outcomes)
    fresh_redis_server.start() if failure == "kill" else fresh_redis_server.resume()
    # the same store object recovers: its pool reconnects
    await _until(lambda: store.healthy and "ok" in outcomes[during:], 10, "the store did not recover")
    stop.set()
    await load
    await _until(lambda: lim.leases.owed == 0, 10, "what was given up was not released")
    leases = await store.client.zcard(limit_keys(t.name)[2])
    await lim.close()
    await store.close()
    assert not [o for o in outcomes if isinstance(o, BaseException)]  # no hang, nothing leaked
    assert leases == 0
    if failure == "kill":
        assert ("unavailable" in outcomes[before:during]) == (mode == "closed")


async def test_cluster_losing_a_master_answers_promptly_then_recovers(tmp_path):
    cluster = RedisClusterProcs(tmp_path)
    cluster.start()
    try:
        store = await connect(cluster.url)
        lim, t = Limiter(store, CONFIG, on_error="closed"), _busy_team()
        outcomes: list = []
        stop = asyncio.Event()
        load = asyncio.create_task(_load(lim, t, outcomes, stop))
        await _until(lambda: "ok" in outcomes, 5, "no load before the failure")
        victim = cluster.node_for(limit_keys(t.name)[0])
        victim.kill()
        await _until(lambda: "unavailable" in outcomes, 10, "the failure went unnoticed")
        mark = len(outcomes)
        await _until(lambda: len(outcomes) > mark, 15, "no load against the lost master")  # a whole batch more
        during = len(outcomes)
        victim.start()
        cluster.wait_ok()
        await _until(lambda: store.healthy and "ok" in outcomes[during:], 20, "the store did not recover")
        stop.set()
        await load
        await store.close()
        assert not [o for o in outcomes if isinstance(o, BaseException)]
    finally:
        cluster.stop()
