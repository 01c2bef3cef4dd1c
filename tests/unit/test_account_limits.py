"""Account-wide limits and quotas (``account:``): the one upstream account shared by all teams,
checked with each team's own limits in the same admit.lua call, all or nothing.

``TestAccountBehaviour`` uses only the ``store`` fixture (memory here);
tests/integration/test_limits.py runs the same class on a real redis-server and a 3-node
Cluster, where team and account keys must share one hash slot.
"""
from __future__ import annotations

import asyncio
import dataclasses
from datetime import date

import pytest

from gateway.config import Account, Limits, Quota
from gateway.errors import QuotaExceeded, RateLimited
from gateway.limits import ledger
from gateway.limits.limiter import Limiter
from gateway.limits.plan import limit_keys
from gateway.store import connect
from gateway.usage import Usage
from tests.unit.test_limits import (CONFIG, T0, Clock, CountingStore, Metrics, StalledStore, admit_all, admitted, request,
                                   team, utc)

TODAY, MONTH = date(2026, 11, 25), "2026-11"
ESTIMATE_USD = 0.14756  # what request() reserves at MODEL's prices: 100 prompt + 2200 completion tokens


def with_account(limits: Limits = Limits(), quota: Quota = Quota()):
    return dataclasses.replace(CONFIG, account=Account(limits=limits, quota=quota))


@pytest.fixture
async def store():
    s = await connect("memory://")
    yield s
    await s.close()


async def team_state(store, t) -> tuple:
    """Everything admit.lua may write for a team: buckets, leases, quota counters."""
    rpm, tpm, leases = limit_keys(t.name)
    got = await ledger.read_usage(store, t.name, day=TODAY, month=MONTH)
    return (await store.client.get(rpm), await store.client.get(tpm), await store.client.zcard(leases),
            got["day"]["quota_tokens"], got["month"]["quota_micro"])


class TestAccountBehaviour:
    async def test_two_teams_share_the_accounts_requests_per_minute(self, store):
        lim = Limiter(store, with_account(Limits(requests_per_minute=5)), clock=Clock())
        a, b = team(Limits(requests_per_minute=10)), team()  # b: no limits of its own
        results = [r for _ in range(4) for r in await admit_all(lim, a, 1) + await admit_all(lim, b, 1)]
        assert admitted(results) == 5
        err = results[5]
        assert isinstance(err, RateLimited) and err.status == 429 and err.code == "rate_limit_exceeded"
        assert err.limit == "account_requests_per_minute"
        assert err.message == ("Rate limit reached for the account (shared by all teams): "
                               "requests_per_minute (5). Retry in 12s.")
        assert err.headers["retry-after"] == "12"
        assert results[6].limit == "account_requests_per_minute"
        assert results[6].headers["x-ratelimit-remaining-requests"] == "7"  # a's own: 3 of its 10 used

    async def test_a_refusal_by_the_account_leaves_the_team_untouched(self, store):
        lim = Limiter(store, with_account(Limits(requests_per_minute=1)), clock=Clock())
        t = team(Limits(requests_per_minute=10, tokens_per_minute=10_000, max_concurrent=5),
                 Quota(tokens_per_day=10**6, usd_per_month=100))
        await lim.admit(t, request())
        before = await team_state(store, t)
        assert before[2:4] == (1, 2300)
        for _ in range(3):
            with pytest.raises(RateLimited) as e:
                await lim.admit(t, request())
            assert e.value.limit == "account_requests_per_minute"
        assert await team_state(store, t) == before

    async def test_a_refusal_by_the_team_leaves_the_account_untouched(self, store):
        lim = Limiter(store, with_account(Limits(requests_per_minute=3)), clock=Clock())
        strict, other = team(Limits(requests_per_minute=1)), team()
        await lim.admit(strict, request())
        for _ in range(5):
            with pytest.raises(RateLimited) as e:
                await lim.admit(strict, request())
            assert e.value.limit == "requests_per_minute" and "team '" in e.value.message
        assert admitted(await admit_all(lim, other, 3)) == 2  # the account's third went to strict's first

    async def test_account_max_concurrent_over_teams_and_its_leases_renewed(self, store):
        clock = Clock()
        lim = Limiter(store, with_account(Limits(max_concurrent=2)), clock=clock, lease_ttl_s=10)
        a, b = team(), team(Limits(max_concurrent=5))
        first, second = await lim.admit(a, request()), await lim.admit(b, request())
        for _ in range(3):  # 27 s: past the lease ttl, renewed meanwhile
            clock.advance(9)
            await lim.leases.renew()
            with pytest.raises(RateLimited) as e:
                await lim.admit(b, request())
            assert e.value.limit == "account_max_concurrent"
            assert e.value.message.startswith("Rate limit reached for the account (shared by all teams): "
                                              "max_concurrent (2 requests in flight)")
        await first.settle(Usage(prompt=1))
        third = await lim.admit(b, request())
        with pytest.raises(RateLimited):
            await lim.admit(a, request())
        await second.settle(Usage(prompt=1))
        await third.settle(Usage(prompt=1))
        assert admitted(await admit_all(lim, a, 3)) == 2

    async def test_account_tokens_per_minute_reserved_then_trued_up(self, store):
        lim = Limiter(store, with_account(Limits(tokens_per_minute=5000)), clock=Clock())
        a, b = team(), team()
        x = await lim.admit(a, request())  # 2300 of 5000
        y = await lim.admit(b, request())  # 4600
        with pytest.raises(RateLimited) as e:
            await lim.admit(a, request())
        assert e.value.limit == "account_tokens_per_minute" and "this request reserves 2300 tokens" in e.value.message
        await x.settle(Usage(prompt=100, completion=100))  # 2100 back
        await y.settle(Usage(prompt=100, completion=100))  # 2100 back: 400 used
        assert admitted(await admit_all(lim, b, 3)) == 2

    async def test_account_usd_per_day_reserves_the_priced_estimate(self, store):
        clock = Clock(utc(2026, 11, 25, 23, 0))
        metrics = Metrics()
        lim = Limiter(store, with_account(quota=Quota(usd_per_day=0.2)), clock=clock, metrics=metrics)
        a, b = team(), team()
        x = await lim.admit(a, request())
        y = await lim.admit(b, request())  # crosses the quota: in flight, both hold their estimate
        with pytest.raises(QuotaExceeded) as e:
            await lim.admit(a, request())
        err = e.value
        assert err.limit == "account_usd_per_day" and err.code == "insufficient_quota"
        assert err.message == ("Quota exceeded for the account (shared by all teams): usd_per_day ($0.2) is used up; "
                               "it resets at 2026-11-26T00:00:00Z.")
        assert err.headers["retry-after"] == "3600"
        assert metrics.rejections == [(a.name, "account_usd_per_day")]
        await x.settle(Usage(prompt=10, completion=10, cost_usd=0.05))
        assert metrics.account == {"usd_per_day": pytest.approx(0.2 - 0.05 - ESTIMATE_USD)}  # y holds its estimate
        await y.settle(Usage(prompt=10, completion=10, cost_usd=0.05))
        assert metrics.account == {"usd_per_day": pytest.approx(0.1)}
        assert admitted(await admit_all(lim, b, 2)) == 1
        clock.advance(3600)  # the next day
        assert admitted(await admit_all(lim, a, 1)) == 1

    async def test_account_usd_per_month_and_tokens_per_day(self, store):
        metrics = Metrics()
        lim = Limiter(store, with_account(quota=Quota(tokens_per_day=5000, usd_per_month=100)), clock=Clock(),
                      metrics=metrics)
        a, b = team(), team()
        results = await admit_all(lim, a, 2) + await admit_all(lim, b, 2)  # 0, 2300, 4600 < 5000, 6900
        assert admitted(results) == 3
        assert results[3].limit == "account_tokens_per_day" and "tokens_per_day (5000 tokens)" in results[3].message
        for adm in results[:3]:
            await adm.settle(Usage(prompt=100, completion=900, cost_usd=33.3))
        assert metrics.account == {"tokens_per_day": 2000, "usd_per_month": pytest.approx(0.1)}
        assert admitted(await admit_all(lim, b, 2)) == 1  # 3000 + 2300 crosses tokens_per_day
        err = (await admit_all(lim, a, 1))[0]
        assert err.limit == "account_usd_per_month"  # $99.9 + one estimate: both used up, the later reset named
        assert "usd_per_month ($100)" in err.message and "2026-12-01T00:00:00Z" in err.message

    async def test_the_accounts_ledger_sums_every_team(self, store):
        lim = Limiter(store, with_account(quota=Quota(usd_per_month=100)), clock=Clock())
        a, b = team(), team(Limits(requests_per_minute=10))
        await (await lim.admit(a, request())).settle(Usage(prompt=100, completion=200, images_out=1, cost_usd=0.5))
        await (await lim.admit(b, request())).settle(Usage(prompt=10, completion=20, cost_usd=0.25))
        await (await lim.admit(b, request())).settle(Usage(prompt=1, completion=2), cached=True)
        account = await ledger.account_usage_report(store, lim.config.account, T0)
        day, month = account["day"], account["month"]
        assert (day["requests"], day["tokens"]["prompt"], day["images_out"], day["cache_hits"]) == (3, 110, 1, 1)
        assert month["cost_usd"] == pytest.approx(0.75) and month["quota_micro"] == 750_000
        assert account["remaining"] == {"tokens_per_day": None, "usd_per_day": None,
                                        "usd_per_month": pytest.approx(99.25)}
        assert account["quota"] == {"tokens_per_day": None, "usd_per_month": 100, "usd_per_day": None}

    async def test_adding_the_account_on_a_reload_keeps_every_teams_quota(self, store):
        """One hash tag whether or not an account is configured: adding it moves no key."""
        lim = Limiter(store, CONFIG, clock=Clock())
        t = team(quota=Quota(tokens_per_day=5000))
        held = await admit_all(lim, t, 2)  # 4600 of 5000 reserved
        lim.reconfigure(with_account(Limits(requests_per_minute=100)))
        results = await admit_all(lim, t, 2)
        assert admitted(results) == 1 and results[1].limit == "tokens_per_day"
        for adm in (*held, results[0]):  # each settles on the plan it was admitted on
            await adm.settle(Usage(prompt=1))
        got = await ledger.read_usage(store, None, day=TODAY)
        assert got["day"]["requests"] == 1  # the account counts from when it has limits

    async def test_a_given_up_admission_is_released_in_the_account_too(self, store):
        stalled = StalledStore(store)
        lim = Limiter(stalled, with_account(Limits(tokens_per_minute=10_000, max_concurrent=1),
                                            Quota(tokens_per_day=10**6, usd_per_day=5)), clock=Clock())
        await stalled.give_up_on(lim.admit(team(Limits(max_concurrent=1)), request()))
        stalled.go.set()  # the script runs, nobody reads its answer
        await stalled.done.wait()
        await lim.leases.repay()
        assert lim.leases.owed == 0
        _, tpm, leases = limit_keys(None)
        assert await store.client.zcard(leases) == 0 and await store.client.exists(tpm) == 0
        day = (await ledger.read_usage(store, None, day=TODAY))["day"]
        assert day["quota_tokens"] == 0 and day["quota_micro"] == 0 and day["requests"] == 0
        a = await lim.admit(team(), request())  # the account's one slot is free
        assert a.reserved == 2300

    async def test_a_release_gives_the_account_its_request_back(self, store):
        lim = Limiter(store, with_account(Limits(requests_per_minute=2, max_concurrent=5),
                                          Quota(tokens_per_day=10**6, usd_per_day=5)), clock=Clock())
        t = team(Limits(requests_per_minute=10))
        first = await admit_all(lim, t, 3)
        assert admitted(first) == 2 and first[2].limit == "account_requests_per_minute"
        for a in first[:2]:
            await a.release()
        rpm, _, leases = limit_keys(None)
        assert await store.client.exists(rpm) == 0 and await store.client.zcard(leases) == 0
        day = (await ledger.read_usage(store, None, day=TODAY))["day"]
        assert day["quota_tokens"] == 0 and day["quota_micro"] == 0 and day["requests"] == 0
        assert await team_state(store, t) == (None, None, 0, 0, 0)
        assert admitted(await admit_all(lim, t, 3)) == 2  # both of the account's requests are back


# --- memory-only ---------------------------------------------------------------------------


async def test_team_and_account_are_one_round_trip_each(store):
    counting = CountingStore(store)
    lim = Limiter(counting, with_account(Limits(requests_per_minute=600, max_concurrent=64),
                                         Quota(usd_per_day=500, usd_per_month=10_000)), clock=Clock())
    a = await lim.admit(team(Limits(requests_per_minute=10), Quota(tokens_per_day=10**6)), request())
    u = await lim.admit(team(), request())  # a team without limits is still checked against the account
    assert counting.calls == ["admit", "admit"]
    await asyncio.gather(a.settle(Usage(prompt=1)), u.settle(Usage(prompt=1)))
    await lim.leases.renew()
    assert counting.calls == ["admit", "admit", "settle", "settle"]  # settled: nothing left to renew


def test_an_account_without_any_limit_is_no_account():
    from gateway.config.loader import parse

    assert parse({"account": {"limits": {}, "quota": {"usd_per_day": None}}}).account is None
    got = parse({"account": {"limits": {"max_concurrent": 64}, "quota": {"usd_per_day": 500}}}).account
    assert got == Account(limits=Limits(max_concurrent=64), quota=Quota(usd_per_day=500))


async def test_across_a_reload_each_snapshot_keeps_its_account_and_renewals_stay_one_per_team(store):
    old_team = team(Limits(requests_per_minute=10, max_concurrent=10))
    old = dataclasses.replace(with_account(Limits(requests_per_minute=3)), teams=(old_team,))
    new_team = dataclasses.replace(old_team)  # a reload's own Team object, the same team
    new = dataclasses.replace(with_account(Limits(requests_per_minute=100)), teams=(new_team,))
    counting = CountingStore(store)
    lim = Limiter(counting, old, clock=Clock())
    first = await lim.admit(old_team, request())
    lim.reconfigure(new)
    # requests of both snapshots in flight at once, interleaved
    in_flight = [first, await lim.admit(new_team, request()), await lim.admit(old_team, request()),
                 await lim.admit(new_team, request())]
    with pytest.raises(RateLimited) as e:  # the old snapshot's account: 3 a minute, not the new one's 100
        await lim.admit(old_team, request())
    assert e.value.limit == "account_requests_per_minute" and "requests_per_minute (3)" in e.value.message
    assert (await lim.admit(new_team, request())).reserved == 2300
    before = len(counting.calls)
    await lim.leases.renew()
    await lim.leases.renew()
    assert counting.calls[before:] == ["renew", "renew"]  # one call per team per tick
    _, _, leases = limit_keys(old_team.name)
    assert await store.client.zcard(leases) == 5
    for adm in in_flight:
        await adm.settle(Usage(prompt=1))
    assert await store.client.zcard(leases) == 1
