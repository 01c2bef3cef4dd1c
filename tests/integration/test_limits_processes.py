"""Limits held by real gateway processes sharing one real redis-server, in front of the simulator
running as its own process:

- exactness under contention: 500 concurrent requests over 3 processes against
  ``requests_per_minute: 100`` admit exactly 100;
- ``max_concurrent: 5`` is never exceeded at any instant (the simulator's ``peak_inflight``);
- ``tokens_per_day`` is never overspent by more than one request's worth;
- a process killed with SIGKILL while holding leases: its slots come back within the lease
  ttl (not the upstream timeout); a request living many ttls keeps its slot all along;
- Redis killed (or hung) mid-load: every request answers, as ``store.on_error`` says, and the
  gateway recovers when Redis is back, without a restart.

Where a count must be exact, the processes are ``tests.support.fixed_clock_gateway``: the real
app and server loop with the limiter's clock frozen at one shared instant (production reads
Redis ``TIME``; the bucket would otherwise refill a little during the burst).
"""
from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from tests.fixtures.gateway import stop_gateway, wait_for
from tests.fixtures.processes import FROZEN_DAY, HANG_GUARD_S, Load, chat, config_for, idle, ledger_day

# -- exactness under contention --------------------------------------------------------------------


async def test_500_concurrent_requests_over_3_processes_admit_exactly_100(
        simulator_process, shared_redis, processes, http):
    config = config_for(simulator_process, shared_redis.url, {"burst": {"limits": {"requests_per_minute": 100}}})
    gateways = await processes(config, 3, fixed_clock=True)

    answers = await asyncio.gather(*(
        chat(http, gateways[i % 3], "burst", f"poster {i}", sim_fault="latency_ms=100") for i in range(500)))

    statuses = Counter(a.status for a in answers)
    assert statuses == {200: 100, 429: 400}
    refused = [a for a in answers if a.status == 429]
    assert {a.code for a in refused} == {"rate_limit_exceeded"}
    assert all(int(a.headers["retry-after-ms"]) > 0 and "retry-after" in a.headers for a in refused)
    assert (await simulator_process.stats())["calls"] == 100  # only the admitted reached upstream
    await idle(gateways)
    assert (await ledger_day(shared_redis.url, "burst", FROZEN_DAY))["requests"] == 100


async def test_max_concurrent_is_never_exceeded_across_3_processes(simulator_process, shared_redis, processes, http):
    config = config_for(simulator_process, shared_redis.url, {"studio": {"limits": {"max_concurrent": 5}}})
    gateways = await processes(config, 3)
    await simulator_process.reset()

    answers = await asyncio.gather(*(
        chat(http, gateways[i % 3], "studio", f"mural {i}", user="studio", sim_fault="latency_ms=300")
        for i in range(40)))

    stats = await simulator_process.stats()
    assert stats["peak_inflight"]["studio"] == 5  # reached, never passed
    ok = [a for a in answers if a.status == 200]
    refused = [a for a in answers if a.status != 200]
    assert len(ok) >= 5 and len(ok) == stats["completed"]
    assert refused and all(a.status == 429 and a.code == "rate_limit_exceeded" for a in refused)
    assert all("max_concurrent" in a.body["error"]["message"] for a in refused)
    assert all(int(a.headers["retry-after"]) >= 1 and int(a.headers["retry-after-ms"]) >= 1 for a in refused)


async def test_tokens_per_day_is_never_overspent_by_more_than_one_request(
        simulator_process, shared_redis, processes, http):
    """Waves of concurrent requests over 3 processes until the quota refuses a whole wave. In-flight
    requests hold their estimate against the quota, so only the one that crosses it overspends."""
    quota = 6000  # about three requests' worth
    config = config_for(simulator_process, shared_redis.url, {"thrifty": {"quota": {"tokens_per_day": quota}}})
    gateways = await processes(config, 3, fixed_clock=True)

    used: list[int] = []
    for wave in range(10):
        answers = await asyncio.gather(*(
            chat(http, gateways[i % 3], "thrifty", f"stamp {wave}-{i}", sim_fault="latency_ms=50")
            for i in range(15)))
        assert {a.status for a in answers} <= {200, 429}
        assert {a.code for a in answers if a.status == 429} <= {"insufficient_quota"}
        used += [a.body["usage"]["total_tokens"] for a in answers if a.status == 200]
        if all(a.status == 429 for a in answers):
            break
    else:
        pytest.fail("the quota never refused a whole wave")

    await idle(gateways)
    day = await ledger_day(shared_redis.url, "thrifty", FROZEN_DAY)
    spent = day["tokens"]["prompt"] + day["tokens"]["completion"]
    assert spent == sum(used) and day["requests"] == len(used)
    assert quota <= spent <= quota + max(used)
    assert day["quota_tokens"] == spent  # nothing left reserved once all settled


# -- a process dying with leases -------------------------------------------------------------------


async def test_sigkilled_process_slots_come_back_within_the_lease_ttl_whatever_the_upstream_timeout(
        simulator_process, shared_redis, processes, http):
    # leases of 1 s, renewed while their request lives; requests may take a minute upstream
    config = config_for(simulator_process, shared_redis.url, {"lab": {"limits": {"max_concurrent": 2}}},
                        upstream={"timeout_s": 60, "max_retries": 0}, store={"lease_ttl_s": 1})
    doomed, survivor = await processes(config, 2)
    await simulator_process.reset()

    held = [asyncio.create_task(chat(http, doomed, "lab", f"held {i}", user="lab", sim_fault="latency_ms=30000"))
            for i in range(2)]
    await simulator_process.wait_for_stats(lambda s: s["inflight"].get("lab") == 2)
    stop_gateway(doomed, kill=True)  # SIGKILL: no settle, no more renewals
    assert doomed.process.returncode == -9
    await asyncio.gather(*held, return_exceptions=True)

    refused = await chat(http, survivor, "lab", "right after")
    if refused.status == 429:  # the dead replica's leases may have run out already
        assert "max_concurrent" in refused.body["error"]["message"]
        assert 1 <= int(refused.headers["retry-after-ms"]) <= 1000  # when the first lease runs out

    async def admitted() -> bool:
        answer = await chat(http, survivor, "lab", "probe")
        assert answer.status in (200, 429), answer
        return answer.status == 200

    await wait_for(admitted, timeout_s=15, interval_s=0.25)  # the old lease (timeout_s + 5) was 65 s
    # both slots are back
    both = await asyncio.gather(*(chat(http, survivor, "lab", f"after {i}", sim_fault="latency_ms=300") for i in range(2)))
    assert [a.status for a in both] == [200, 200]


async def test_a_request_living_many_lease_ttls_keeps_its_slot(simulator_process, shared_redis, processes, http):
    config = config_for(simulator_process, shared_redis.url, {"lab": {"limits": {"max_concurrent": 1}}},
                        store={"lease_ttl_s": 1})
    first, second = await processes(config, 2)
    await simulator_process.reset()

    long = asyncio.create_task(chat(http, first, "lab", "long", user="lab", sim_fault="latency_ms=5000"))
    await simulator_process.wait_for_stats(lambda s: s["inflight"].get("lab") == 1)
    probes = []
    while not long.done():  # five ttls: every probe meets the slot still taken
        probes.append(await chat(http, second, "lab", f"probe {len(probes)}", user="lab"))
        await asyncio.wait([long], timeout=0.1)  # the next probe, unless the long one is over
    assert (await long).status == 200
    assert probes and all(p.status == 429 and "max_concurrent" in p.body["error"]["message"] for p in probes)
    assert (await simulator_process.stats())["peak_inflight"]["lab"] == 1
    assert (await chat(http, second, "lab", "after")).status == 200


# -- Redis going away under load -------------------------------------------------------------------


@pytest.mark.parametrize("fault", ["kill", "hang"])
@pytest.mark.parametrize("on_error", ["open", "closed"])
async def test_redis_lost_mid_load_every_request_answers_and_the_gateway_recovers(
        simulator_process, fresh_redis_server, processes, http, on_error, fault):
    """``kill``: Redis dies (connections refused); ``hang``: it stops answering (SIGSTOP), so
    every store call runs into the socket timeout. Either way no request hangs, each answers as
    ``on_error`` says, and once Redis is back a burst of concurrent requests all pass: none of
    them trips over a connection that died with the old Redis."""
    teams = {"load": {"limits": {"requests_per_minute": 100_000}}, "strict": {"limits": {"requests_per_minute": 2}}}
    config = config_for(simulator_process, fresh_redis_server.url, teams, store={"on_error": on_error})
    (gw,) = await processes(config, 1)
    load = Load(http, gw, "load")
    load.start()
    try:
        await load.until("up", 24)  # the gateway now holds several pooled connections
        fresh_redis_server.kill() if fault == "kill" else fresh_redis_server.pause()
        load.phase = "down"
        await load.until("down", 16)
        async with http.get(gw.url + "/readyz") as resp:
            ready = await resp.json()
            assert resp.status == 503 and ready["reason"].startswith("store"), ready
    finally:
        await load.stop()

    hangs = [a for _, _, a in load.results if isinstance(a, BaseException)]
    assert not hangs, hangs[:3]
    down = [a for s, e, a in load.results if s == e == "down"]
    up = [a for s, e, a in load.results if s == e == "up"]
    assert all(a.status == 200 for a in up), Counter(a.status for a in up)
    if on_error == "open":  # admitted, and the error counted
        assert all(a.status == 200 for _, _, a in load.results), Counter(a.status for _, _, a in load.results)
    else:
        assert all(a.status == 503 and a.code == "store_unavailable" for a in down), Counter(a.status for a in down)
        assert all(int(a.headers["retry-after"]) >= 1 for a in down)
        assert {a.status for _, _, a in load.results} <= {200, 503}
    async with http.get(gw.url + "/metrics") as resp:
        assert 'gateway_store_errors_total{op="admit"}' in await resp.text()

    fresh_redis_server.start() if fault == "kill" else fresh_redis_server.resume()

    async def ready_again() -> bool:
        async with http.get(gw.url + "/readyz") as resp:
            return resp.status == 200

    await wait_for(ready_again, timeout_s=15)
    burst = await asyncio.gather(*(asyncio.wait_for(chat(http, gw, "load", f"after {i}"), HANG_GUARD_S)
                                   for i in range(24)))
    assert [a.status for a in burst] == [200] * 24, [(a.status, a.body) for a in burst if a.status != 200][:3]
    # the limits count again, on the Redis that came back
    assert [(await chat(http, gw, "strict")).status for _ in range(3)] == [200, 200, 429]
