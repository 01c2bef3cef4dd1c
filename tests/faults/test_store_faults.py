"""The store under adversity, through real gateways: the embedded store at 2,000 concurrent
requests, Redis stalled (SIGSTOP) and Redis killed (SIGKILL) under load.

A slow store makes requests wait; only a store that is really down triggers ``store.on_error``.
"""
from __future__ import annotations

import asyncio
from collections import Counter

import aiohttp
import pytest

from tests.fixtures.gateway import wait_for
from tests.fixtures.processes import FROZEN_DAY, HANG_GUARD_S, Load, chat, config_for, idle, ledger_day


async def _store_errors(http: aiohttp.ClientSession, gw) -> str:
    async with http.get(gw.url + "/metrics") as resp:
        return "".join(line for line in (await resp.text()).splitlines(keepends=True)
                       if line.startswith("gateway_store_errors_total{"))


async def test_memory_store_records_every_settle_of_2000_concurrent_requests(simulator_process, processes, http):
    """memory:// (the embedded store in the gateway's process; once fakeredis): its client pool once held 100
    connections, and every store call past the 100th in flight failed (1,636 of 2,000 settles
    lost, or 1,900 x 503 with ``on_error: closed``)."""
    teams = {"crowd": {"limits": {"requests_per_minute": 10**6}}}  # admitted through the store too
    (gw,) = await processes(config_for(simulator_process, "memory://", teams, store={"on_error": "closed"}))

    # safety-blocked answers: usage to settle but no image to draw, so 2,000 take seconds
    answers = await asyncio.gather(*(chat(http, gw, "crowd", f"crowd {i}", sim_fault="blocked=IMAGE_SAFETY")
                                     for i in range(2000)))

    assert Counter(a.status for a in answers) == {200: 2000}
    await gw.idle()  # every settle follows its answer
    async with http.get(gw.url + "/v1/usage", headers=gw.headers("crowd")) as resp:
        usage = await resp.json()
    assert usage["day"]["requests"] == 2000
    assert usage["day"]["tokens"]["completion"] == sum(a.body["usage"]["completion_tokens"] for a in answers)


async def test_redis_stalled_under_load_makes_requests_wait_none_admitted_unchecked(
        simulator_process, fresh_redis_server, processes, http):
    """Redis SIGSTOPped with admissions queued in its sockets, for longer than the old 1 s
    backstop, then SIGCONTed: the requests waited, the limit held exactly (``on_error: open``
    would have admitted unchecked), no store error was counted, and the gateway serves on."""
    teams = {"burst": {"limits": {"requests_per_minute": 100}}, "other": {}}
    config = config_for(simulator_process, fresh_redis_server.url, teams, store={"on_error": "open"})
    gateways = await processes(config, 3, fixed_clock=True)
    await simulator_process.reset()

    fresh_redis_server.pause()
    try:
        burst = [asyncio.create_task(chat(http, gateways[i % 3], "burst", f"stalled {i}")) for i in range(150)]
        await wait_for(lambda: fresh_redis_server.unread_bytes() > 0)  # admissions wait in Redis' sockets
        await asyncio.sleep(2)  # the stall lasts: past the old backstop, short of down (socket_timeout)
    finally:
        fresh_redis_server.resume()
    answers = await asyncio.wait_for(asyncio.gather(*burst), HANG_GUARD_S)

    assert Counter(a.status for a in answers) == {200: 100, 429: 50}
    assert {a.code for a in answers if a.status == 429} == {"rate_limit_exceeded"}
    assert (await simulator_process.stats())["calls"] == 100
    await idle(gateways)
    assert (await ledger_day(fresh_redis_server.url, "burst", FROZEN_DAY))["requests"] == 100
    for gw in gateways:
        assert await _store_errors(http, gw) == ""
    after = await asyncio.gather(*(chat(http, gw, "other", "after the stall") for gw in gateways))
    assert [a.status for a in after] == [200, 200, 200]


@pytest.mark.parametrize("on_error", ["open", "closed"])
async def test_redis_killed_under_load_is_an_outage_then_recovers_on_a_new_redis(
        simulator_process, fresh_redis_server, processes, http, on_error):
    """SIGKILL: connections refused at once. Every request answers as ``on_error`` says and the
    outage is counted; a new Redis started on the same port is used without a restart."""
    teams = {"load": {"limits": {"requests_per_minute": 10**6}}, "strict": {"limits": {"requests_per_minute": 2}}}
    config = config_for(simulator_process, fresh_redis_server.url, teams, store={"on_error": on_error})
    (gw,) = await processes(config, 1)
    load = Load(http, gw, "load")
    load.start()
    try:
        await load.until("up", 16)
        fresh_redis_server.kill()
        load.phase = "down"
        await load.until("down", 16)
    finally:
        await load.stop()

    assert not [a for _, _, a in load.results if isinstance(a, BaseException)]  # no hang
    down = [a for s, e, a in load.results if s == e == "down"]
    if on_error == "open":
        assert all(a.status == 200 for a in down), Counter(a.status for a in down)
    else:
        assert all(a.status == 503 and a.code == "store_unavailable" for a in down), Counter(a.status for a in down)
    assert 'gateway_store_errors_total{op="admit"}' in await _store_errors(http, gw)

    fresh_redis_server.start()  # a new, empty Redis on the same port

    async def serving() -> bool:
        return (await chat(http, gw, "load", "back?")).status == 200

    await wait_for(serving, timeout_s=15)
    assert [(await chat(http, gw, "strict")).status for _ in range(3)] == [200, 200, 429]
