"""The account shared by all teams (``account:``) as a client and an operator see it: a refusal
by the account is a 429 that says so, counted under ``account_*`` with the refused team;
``gateway_account_quota_remaining`` after each request; ``/admin/usage`` shows the account.
In-process gateways in front of the simulator, on every store (memory, redis-server, Cluster).
"""
from __future__ import annotations

import pytest

from tests.e2e.test_limits import Caller, Clock, body, cost, utc
from tests.fixtures.gateway import ADMIN_KEY

TEAMS = {"design": {"limits": {"requests_per_minute": 10}}, "research": {}}


async def test_the_account_refuses_with_its_own_message_and_metric(start_gateway, http, store_url):
    clock = Clock(utc("2026-03-10T12:00:00"))
    gw = await start_gateway(TEAMS, store={"url": store_url}, clock=clock,
                             account={"limits": {"requests_per_minute": 3}})
    c = Caller(gw, http)
    assert [(await c.chat(team))[0] for team in ("design", "research", "design")] == [200, 200, 200]

    status, headers, err = await c.chat("research")
    assert status == 429
    assert err["error"]["type"] == "rate_limit_error" and err["error"]["code"] == "rate_limit_exceeded"
    assert err["error"]["message"] == ("Rate limit reached for the account (shared by all teams): "
                                       "requests_per_minute (3). Retry in 20s.")
    assert headers["retry-after"] == "20" and headers["retry-after-ms"] == "20000"
    status, headers, err = await c.chat("design")
    assert status == 429 and "the account" in err["error"]["message"]
    assert headers["x-ratelimit-remaining-requests"] == "8"  # the team's own limit, untouched by the refusal

    assert await c.metric("gateway_ratelimit_rejections_total", team="research",
                          limit="account_requests_per_minute") == 1
    assert await c.metric("gateway_ratelimit_rejections_total", team="design",
                          limit="account_requests_per_minute") == 1
    assert await c.metric("gateway_ratelimit_rejections_total", limit="requests_per_minute") == 0
    clock.advance(20)  # exactly when retry-after said
    assert (await c.chat("research"))[0] == 200


async def test_account_quota_remaining_and_admin_usage(start_gateway, http, store_url):
    gw = await start_gateway(TEAMS, store={"url": store_url}, clock=Clock(utc("2026-03-10T12:00:00")),
                             account={"limits": {"max_concurrent": 64},
                                      "quota": {"tokens_per_day": 10_000_000, "usd_per_day": 50, "usd_per_month": 900}})
    c = Caller(gw, http)
    answers = [await c.chat(team, **body(f"a kite {team}")) for team in ("design", "research")]
    assert [a[0] for a in answers] == [200, 200]
    spent = sum(cost(a[2]["usage"]) for a in answers)
    tokens = sum(a[2]["usage"]["total_tokens"] for a in answers)

    assert await c.metric("gateway_account_quota_remaining", quota="usd_per_month") == pytest.approx(900 - spent,
                                                                                                    abs=2e-6)
    assert await c.metric("gateway_account_quota_remaining", quota="usd_per_day") == pytest.approx(50 - spent, abs=2e-6)
    assert await c.metric("gateway_account_quota_remaining", quota="tokens_per_day") == 10_000_000 - tokens

    status, admin = await c.get("/admin/usage", ADMIN_KEY)
    assert status == 200 and {row["team"] for row in admin["data"]} == {"design", "research"}
    account = admin["account"]
    assert account["day"]["requests"] == 2 and account["month"]["cost_usd"] == pytest.approx(spent, abs=2e-6)
    assert account["limits"] == {"requests_per_minute": None, "tokens_per_minute": None, "max_concurrent": 64}
    assert account["quota"] == {"tokens_per_day": 10_000_000, "usd_per_day": 50, "usd_per_month": 900}
    assert account["remaining"]["usd_per_month"] == pytest.approx(900 - spent, abs=2e-6)
    assert account["remaining"]["tokens_per_day"] == 10_000_000 - tokens
