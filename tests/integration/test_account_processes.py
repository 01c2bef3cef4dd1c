"""The account's limits held by 3 real gateway processes on one real redis-server, two teams
sharing them, in front of the simulator as its own process: exactly the account's rate is
admitted over both teams, and its quotas are overspent by at most the one request that crosses
them. The processes read one frozen clock (tests.support.fixed_clock_gateway), so counts are
exact (see tests/integration/test_limits_processes.py).
"""
from __future__ import annotations

import asyncio
from collections import Counter

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.limits.ledger import read_usage
from gateway.store import connect
from tests.e2e.test_limits import cost
from tests.fixtures.processes import FROZEN_DAY, chat, config_for, idle, ledger_day

TEAMS = ("north", "south")


async def account_day(redis_url: str) -> dict:
    from datetime import date

    store = await connect(redis_url)
    try:
        return (await read_usage(store, None, day=date.fromisoformat(FROZEN_DAY)))["day"]
    finally:
        await store.close()


async def rejections(http, gateways, limit: str) -> dict[str, float]:
    """gateway_ratelimit_rejections_total{limit} per team, summed over the processes."""
    by_team: Counter = Counter()
    for gw in gateways:
        async with http.get(gw.url + "/metrics") as resp:
            text = await resp.text()
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == "gateway_ratelimit_rejections_total" and s.labels["limit"] == limit:
                    by_team[s.labels["team"]] += s.value
    return dict(by_team)


async def test_two_teams_over_3_processes_admit_exactly_the_accounts_100(simulator_process, shared_redis, processes,
                                                                        http):
    teams = {"north": {"limits": {"requests_per_minute": 1000}}, "south": {}}
    config = config_for(simulator_process, shared_redis.url, teams, account={"limits": {"requests_per_minute": 100}})
    gateways = await processes(config, 3, fixed_clock=True)
    await simulator_process.reset()

    answers = await asyncio.gather(*(
        chat(http, gateways[i % 3], TEAMS[i % 2], f"poster {i}", sim_fault="latency_ms=100") for i in range(500)))

    assert Counter(a.status for a in answers) == {200: 100, 429: 400}
    refused = [a for a in answers if a.status == 429]
    assert {a.code for a in refused} == {"rate_limit_exceeded"}
    assert all(a.body["error"]["message"].startswith(
        "Rate limit reached for the account (shared by all teams): requests_per_minute (100).") for a in refused)
    assert (await simulator_process.stats())["calls"] == 100
    per_team = {t: sum(a.status == 200 for i, a in enumerate(answers) if TEAMS[i % 2] == t) for t in TEAMS}
    await idle(gateways)
    ledgers = {t: (await ledger_day(shared_redis.url, t, FROZEN_DAY))["requests"] for t in TEAMS}
    assert ledgers == per_team and sum(per_team.values()) == 100
    assert (await account_day(shared_redis.url))["requests"] == 100
    counted = await rejections(http, gateways, "account_requests_per_minute")
    assert counted == {t: 250 - per_team[t] for t in TEAMS}  # each refusal under the team it refused


@pytest.mark.parametrize("quota", ["tokens_per_day", "usd_per_day"])
async def test_the_accounts_quota_is_overspent_by_at_most_one_request(simulator_process, shared_redis, processes,
                                                                      http, quota):
    """Waves of concurrent requests of both teams over 3 processes until the account refuses a
    whole wave: in-flight requests hold their estimate (tokens, or its price) against the quota."""
    limit = {"tokens_per_day": 6000, "usd_per_day": 0.4}[quota]  # about three requests' worth
    config = config_for(simulator_process, shared_redis.url, {t: {} for t in TEAMS},
                        account={"quota": {quota: limit}})
    gateways = await processes(config, 3, fixed_clock=True)

    used: list[dict] = []
    for wave in range(10):
        answers = await asyncio.gather(*(
            chat(http, gateways[i % 3], TEAMS[i % 2], f"stamp {wave}-{i}", sim_fault="latency_ms=50")
            for i in range(12)))
        assert {a.status for a in answers} <= {200, 429}
        refused = [a for a in answers if a.status == 429]
        assert {a.code for a in refused} <= {"insufficient_quota"}
        assert all(f"the account (shared by all teams): {quota}" in a.body["error"]["message"] for a in refused)
        used += [a.body["usage"] for a in answers if a.status == 200]
        if len(refused) == len(answers):
            break
    else:
        pytest.fail("the account's quota never refused a whole wave")

    await idle(gateways)
    day = await account_day(shared_redis.url)
    teams = [await ledger_day(shared_redis.url, t, FROZEN_DAY) for t in TEAMS]
    assert day["requests"] == len(used) == sum(t["requests"] for t in teams)
    if quota == "tokens_per_day":
        spent, one = day["tokens"]["prompt"] + day["tokens"]["completion"], max(u["total_tokens"] for u in used)
        assert spent == sum(u["total_tokens"] for u in used) and day["quota_tokens"] == spent
    else:
        spent, one = day["cost_usd"], max(map(cost, used))
        assert spent == pytest.approx(sum(map(cost, used)), abs=1e-5)
        assert day["quota_micro"] == round(spent * 1_000_000)  # nothing left reserved once all settled
        assert spent == pytest.approx(sum(t["cost_usd"] for t in teams), abs=1e-6)
    assert limit <= spent <= limit + one
    assert sum((await rejections(http, gateways, f"account_{quota}")).values()) >= 12
