"""Admission under a store that stalls: no phantom reservations.

A real redis-server is stopped (SIGSTOP) while admissions are in flight. Each caller gives up
at its deadline (503), or is cancelled (its client left), while its admit script sits in the
stalled server's socket, to run whenever the server wakes up, after the gateway has given it
up. Once the server answers again, every admission given up is released by its id (the
tombstone makes a late admit a no-op): no lease stays taken, no token or dollar stays
reserved, and the team is admitted again as if nothing had happened.
"""
from __future__ import annotations

import asyncio
from datetime import date

import pytest

from gateway.config import Limits, Quota
from gateway.errors import StoreUnavailable
from gateway.limits import ledger
from gateway.limits.limiter import Limiter
from gateway.limits.plan import limit_keys
from gateway.store import connect
from gateway.usage import Usage
from tests.fixtures.gateway import wait_for
from tests.unit.test_limits import CONFIG, Clock, request, team

PATIENCE_S = 0.3
TPM = 100_000


@pytest.fixture
async def stalled_store(fresh_redis_server):
    store = await connect(fresh_redis_server.url)
    yield store
    fresh_redis_server.resume()
    await store.close()


async def test_admissions_given_up_in_a_stall_are_released_when_the_store_answers(fresh_redis_server, stalled_store):
    store = stalled_store
    # the scripts' clock stands still (exact token counts), so leases expire only if released;
    # a short ttl makes the renewal tick, which retries what is owed, come round quickly
    lim = Limiter(store, CONFIG, clock=Clock(), lease_ttl_s=1.5)
    lim.start()
    t = team(Limits(max_concurrent=100, tokens_per_minute=TPM), Quota(tokens_per_day=10**9, usd_per_month=10**4))
    loop = asyncio.get_running_loop()
    held = await lim.admit(t, request())  # a request in flight throughout
    settled = await lim.admit(t, request())
    await settled.settle(Usage(prompt=100, completion=200, cost_usd=0.25))

    fresh_redis_server.pause()
    given_up = [asyncio.create_task(lim.admit(t, request(), deadline=loop.time() + PATIENCE_S)) for _ in range(20)]
    left = [asyncio.create_task(lim.admit(t, request())) for _ in range(10)]
    results = await asyncio.gather(*given_up, return_exceptions=True)
    for task in left:  # their clients left while the scripts were in the stalled socket
        task.cancel()
    await asyncio.gather(*left, return_exceptions=True)
    assert all(isinstance(r, StoreUnavailable) and r.status == 503 for r in results), results
    assert lim.leases.owed == 30  # kept until the store answers

    fresh_redis_server.resume()
    await wait_for(lambda: lim.leases.owed == 0, timeout_s=15)  # every release ran

    leases_key = limit_keys(t.name)[2]
    assert await store.client.zrange(leases_key, 0, -1) == [held.id.encode()]
    got = await ledger.read_usage(store, t.name, day=date(2026, 11, 25), month="2026-11")
    assert got["day"]["quota_tokens"] == 300 + held.reserved  # the settled usage and the live request only
    assert got["month"]["quota_micro"] == 250_000 + held.reserved_micro
    after = await lim.admit(t, request(), deadline=loop.time() + 5)
    # the bucket holds the live request, the settled one and this one: the given-up ones are refunded
    used = int(after.headers["x-ratelimit-limit-tokens"]) - int(after.headers["x-ratelimit-remaining-tokens"])
    assert used == held.reserved + 300 + after.reserved
    for a in (held, after):
        await a.settle(Usage(prompt=1))
    assert await store.client.zcard(leases_key) == 0
    await lim.close()
