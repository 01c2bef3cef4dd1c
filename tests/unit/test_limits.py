"""Limiter behaviour on the embedded store, with an injected clock so every boundary is exact.

``TestBehaviour`` is the backend-independent suite: tests/integration/test_limits.py runs the
same class against a real redis-server and a real 3-node Cluster. It uses only the ``store``
fixture (memory here) and the helpers below.
"""
from __future__ import annotations

import asyncio
import itertools
from datetime import date, datetime, timedelta, timezone

import pytest

from gateway.limits import ledger
from gateway.config import Config, Limits, ModelConfig, Prices, Quota, Team, UpstreamConfig
from gateway.errors import QuotaExceeded, RateLimited, StoreUnavailable
from gateway.limits.answers import format_duration
from gateway.limits.limiter import Limiter
from gateway.limits.plan import limit_keys
from gateway.store import StoreError, connect
from gateway.usage import Usage, estimate
from gateway.validate import ChatRequest

MODEL = ModelConfig(id="m", upstream_id="m", prices=Prices(prompt=2, completion=12, image=120),
                    default_completion_tokens=2200)
CONFIG = Config(models=(MODEL,), upstream=UpstreamConfig(timeout_s=300))  # leases: store.lease_ttl_s, 15 s
T0 = datetime(2026, 11, 25, 12, 0, tzinfo=timezone.utc).timestamp()
_names = itertools.count()


class Clock:
    """Injected UNIX time; advance() moves it."""

    def __init__(self, t: float | datetime = T0):
        self.t = t.timestamp() if isinstance(t, datetime) else t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


def utc(*args) -> datetime:
    return datetime(*args, tzinfo=timezone.utc)


def team(limits: Limits = Limits(), quota: Quota = Quota()) -> Team:
    return Team(name=f"t{next(_names)}", limits=limits, quota=quota)


def request(text_chars: int = 400, images: int = 0, max_tokens: int | None = None) -> ChatRequest:
    """Reserves text_chars/4 + 560*images + (max_tokens or 2200) tokens: 2300 by default."""
    return ChatRequest(body={}, raw=b"", model=MODEL, stream=False, images=(None,) * images,
                       text_chars=text_chars, max_completion_tokens=max_tokens)


async def admit_all(limiter: Limiter, t: Team, n: int, req: ChatRequest | None = None) -> list:
    """n admissions in a row; each is an Admission or the error it raised."""
    out = []
    for _ in range(n):
        try:
            out.append(await limiter.admit(t, req or request()))
        except (RateLimited, QuotaExceeded) as e:
            out.append(e)
    return out


def admitted(results: list) -> int:
    return sum(not isinstance(r, Exception) for r in results)


@pytest.fixture
async def store():
    s = await connect("memory://")
    yield s
    await s.close()


class StalledStore:
    """Holds the next admit script until ``go`` is set, as a stalled store would; it then runs."""

    def __init__(self, inner):
        self.inner, self.held, self.go, self.done = inner, asyncio.Event(), asyncio.Event(), asyncio.Event()
        self._late: asyncio.Task | None = None

    async def run_script(self, name, keys, args, **kw):
        if name == "admit" and self._late is None:
            self._late = asyncio.create_task(self._run_late(keys, args))
            return await asyncio.shield(self._late)
        return await self.inner.run_script(name, keys, args, **kw)

    async def _run_late(self, keys, args):
        self.held.set()
        await self.go.wait()
        try:
            return await self.inner.run_script("admit", keys, args)
        finally:
            self.done.set()

    async def done_result(self):
        return await self._late

    async def give_up_on(self, admitting) -> None:
        """Run ``admitting`` (an admit call) until its script is held, then cancel it: a caller
        that gave up while its admission was in flight."""
        caller = asyncio.create_task(admitting)
        await self.held.wait()
        caller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller


class LossyStore:
    """Runs the first settle, then raises as if its answer had been lost on the way back."""

    on_error = None

    def __init__(self, inner):
        self.inner, self.lost = inner, False

    async def run_script(self, name, keys, args, **kw):
        result = await self.inner.run_script(name, keys, args, **kw)
        if name == "settle" and not self.lost:
            self.lost = True
            raise StoreError("store settle failed: no answer in time", op=name)
        return result


async def assert_nothing_held(store, lim: Limiter, t: Team) -> None:
    """No lease, no tokens, no dollars still reserved: a new admission sees the team untouched."""
    plan = lim._plan(t)
    assert await store.client.zcard(plan.leases_keys[0]) == 0
    assert await store.client.exists(plan.tpm_key) == 0
    day = (await ledger.read_usage(store, t.name, day=date(2026, 11, 25), month="2026-11"))
    assert day["day"]["quota_tokens"] == 0 and day["month"]["quota_micro"] == 0
    a = await lim.admit(t, request())
    assert a.headers["x-ratelimit-remaining-tokens"] == str(10_000 - 2300)


class TestBehaviour:
    async def test_burst_is_exactly_one_minutes_worth(self, store):
        lim, t = Limiter(store, CONFIG, clock=Clock()), team(Limits(requests_per_minute=10))
        results = await admit_all(lim, t, 11)
        assert admitted(results) == 10
        err = results[-1]
        assert isinstance(err, RateLimited) and err.limit == "requests_per_minute"
        assert "requests_per_minute" in err.message and err.status == 429
        assert err.headers["retry-after-ms"] == "6000" and err.headers["retry-after"] == "6"
        assert err.headers["x-ratelimit-remaining-requests"] == "0"

    async def test_burst_exact_when_rate_does_not_divide_a_minute(self, store):
        lim, t = Limiter(store, CONFIG, clock=Clock()), team(Limits(requests_per_minute=7))
        assert admitted(await admit_all(lim, t, 8)) == 7

    async def test_bucket_refills_at_the_rate(self, store):
        clock = Clock()
        lim, t = Limiter(store, CONFIG, clock=clock), team(Limits(requests_per_minute=60))
        assert admitted(await admit_all(lim, t, 61)) == 60
        clock.advance(0.999)
        assert admitted(await admit_all(lim, t, 1)) == 0
        clock.advance(0.001)
        assert admitted(await admit_all(lim, t, 2)) == 1
        clock.advance(30)
        assert admitted(await admit_all(lim, t, 31)) == 30
        clock.advance(3600)  # a full bucket holds one minute's worth, never more
        assert admitted(await admit_all(lim, t, 61)) == 60

    async def test_headers_report_each_limit(self, store):
        lim = Limiter(store, CONFIG, clock=Clock())
        a = await lim.admit(team(Limits(requests_per_minute=60, tokens_per_minute=10000)), request())
        assert a.headers == {
            "x-ratelimit-limit-requests": "60", "x-ratelimit-remaining-requests": "59",
            "x-ratelimit-reset-requests": "1s",
            "x-ratelimit-limit-tokens": "10000", "x-ratelimit-remaining-tokens": "7700",
            "x-ratelimit-reset-tokens": "13.8s",
        }
        only_rpm = await lim.admit(team(Limits(requests_per_minute=5)), request())
        assert set(only_rpm.headers) == {"x-ratelimit-limit-requests", "x-ratelimit-remaining-requests",
                                         "x-ratelimit-reset-requests"}
        assert only_rpm.headers["x-ratelimit-reset-requests"] == "12s"
        assert (await lim.admit(team(quota=Quota(tokens_per_day=10**9)), request())).headers == {}

    async def test_tokens_reserved_then_refunded_or_charged(self, store):
        clock = Clock()
        lim, t = Limiter(store, CONFIG, clock=clock), team(Limits(tokens_per_minute=10000))
        a = await lim.admit(t, request())  # reserves 2300
        assert a.headers["x-ratelimit-remaining-tokens"] == "7700"
        await a.settle(Usage(prompt=100, completion=900))  # used 1000: 1300 back
        b = await lim.admit(t, request())
        assert b.headers["x-ratelimit-remaining-tokens"] == str(10000 - 1000 - 2300)
        await b.settle(Usage(prompt=100, completion=5200))  # used 5300: 3000 more
        c = await lim.admit(t, request(max_tokens=100))  # reserves 200
        assert c.headers["x-ratelimit-remaining-tokens"] == str(10000 - 1000 - 5300 - 200)

    async def test_tokens_per_minute_refusal_waits_for_enough_tokens(self, store):
        lim, t = Limiter(store, CONFIG, clock=Clock()), team(Limits(tokens_per_minute=5000))
        results = await admit_all(lim, t, 3)
        assert admitted(results) == 2
        err = results[2]
        assert err.limit == "tokens_per_minute"
        # 400 tokens left, 2300 needed: 1900 tokens at 5000/min
        assert err.headers["retry-after-ms"] == "22800"

    async def test_request_larger_than_a_minute_passes_on_a_full_bucket(self, store):
        lim, t = Limiter(store, CONFIG, clock=Clock()), team(Limits(tokens_per_minute=1000))
        results = await admit_all(lim, t, 2)  # 2300 > 1000
        assert admitted(results) == 1 and results[1].limit == "tokens_per_minute"

    async def test_a_refusal_consumes_nothing(self, store):
        lim = Limiter(store, CONFIG, clock=Clock())
        t = team(Limits(requests_per_minute=5, tokens_per_minute=3000, max_concurrent=10))
        await lim.admit(t, request())
        for _ in range(3):  # refused by tokens: requests and leases untouched
            with pytest.raises(RateLimited) as e:
                await lim.admit(t, request())
            assert e.value.limit == "tokens_per_minute"
            assert e.value.headers["x-ratelimit-remaining-requests"] == "4"
        a = await lim.admit(t, request(text_chars=0, max_tokens=699))
        assert a.headers["x-ratelimit-remaining-requests"] == "3"

    async def test_max_concurrent_and_release(self, store):
        lim, t = Limiter(store, CONFIG, clock=Clock()), team(Limits(max_concurrent=2))
        a, b = await lim.admit(t, request()), await lim.admit(t, request())
        with pytest.raises(RateLimited) as e:
            await lim.admit(t, request())
        assert e.value.limit == "max_concurrent" and "max_concurrent" in e.value.message
        await a.settle(Usage(prompt=1, completion=1))
        c = await lim.admit(t, request())
        await b.settle(Usage())
        await c.settle(Usage())
        assert admitted(await admit_all(lim, t, 3)) == 2

    async def test_leases_expire_on_their_own(self, store):
        clock = Clock()
        lim, t = Limiter(store, CONFIG, clock=clock, lease_ttl_s=10), team(Limits(max_concurrent=1))
        await lim.admit(t, request())  # never settled: its replica died
        clock.advance(9.999)
        with pytest.raises(RateLimited):
            await lim.admit(t, request())
        clock.advance(0.001)
        await lim.admit(t, request())

    async def test_settle_is_idempotent(self, store):
        lim, t = Limiter(store, CONFIG, clock=Clock()), team(Limits(max_concurrent=1))
        a = await lim.admit(t, request())
        await a.settle(Usage(prompt=10, completion=20))
        await a.settle(Usage(prompt=10, completion=20))
        usage = await ledger.read_usage(store, t.name, day=date(2026, 11, 25))
        assert usage["day"]["requests"] == 1 and usage["day"]["tokens"]["prompt"] == 10

    async def test_settle_writes_the_ledger(self, store):
        lim = Limiter(store, CONFIG, clock=Clock())
        t = team(Limits(requests_per_minute=100), Quota(tokens_per_day=10**6, usd_per_month=100))
        u = Usage(prompt=1000, completion=2000, image=1120, reasoning=800, images_in=2, images_out=1)
        u = u.priced(MODEL.prices)
        for _ in range(2):
            await (await lim.admit(t, request())).settle(u)
        got = await ledger.read_usage(store, t.name, day=date(2026, 11, 25), month="2026-11")
        for period in ("day", "month"):
            p = got[period]
            assert p["requests"] == 2 and p["images_in"] == 4 and p["images_out"] == 2
            assert p["tokens"] == {"prompt": 2000, "completion": 4000, "image": 2240, "reasoning": 1600, "audio": 0}
            assert p["cost_usd"] == pytest.approx(2 * u.cost_usd)
        assert got["day"]["quota_tokens"] == 6000
        report = await ledger.team_usage_report(store, t, T0)
        assert report["remaining"] == {"tokens_per_day": 10**6 - 6000,
                                       "usd_per_month": pytest.approx(100 - 2 * u.cost_usd)}
        assert report["day"]["date"] == "2026-11-25" and report["month"]["month"] == "2026-11"

    async def test_cache_hit_charges_nothing(self, store):
        lim = Limiter(store, CONFIG, clock=Clock())
        t = team(Limits(tokens_per_minute=10000), Quota(tokens_per_day=10**6, usd_per_month=10))
        a = await lim.admit(t, request())
        await a.settle(Usage(prompt=500, completion=1500, images_out=1, cost_usd=0.5), cached=True)
        assert a.remaining == {"tokens_per_day": 10**6, "usd_per_month": 10}
        b = await lim.admit(t, request())
        assert b.headers["x-ratelimit-remaining-tokens"] == "7700"  # the reservation came back
        day = (await ledger.read_usage(store, t.name, day=date(2026, 11, 25)))["day"]
        assert (day["requests"], day["cache_hits"], day["cache_saved_tokens"], day["cost_usd"]) == (1, 1, 2000, 0)
        assert day["tokens"]["prompt"] == 0 and day["images_out"] == 1

    async def test_tokens_per_day_resets_at_utc_midnight(self, store):
        clock = Clock(utc(2026, 11, 25, 23, 59, 59))
        lim, t = Limiter(store, CONFIG, clock=clock), team(quota=Quota(tokens_per_day=5000))
        results = await admit_all(lim, t, 4)  # at 0, 2300, 4600 (< 5000) admitted; at 6900 not
        assert admitted(results) == 3
        err = results[3]
        assert isinstance(err, QuotaExceeded) and err.limit == "tokens_per_day"
        assert err.code == "insufficient_quota" and "2026-11-26T00:00:00Z" in err.message
        assert err.headers["retry-after"] == "1"
        clock.advance(0.999)
        assert admitted(await admit_all(lim, t, 1)) == 0
        clock.advance(0.001)
        a = await lim.admit(t, request())
        assert a.date == "2026-11-26"

    async def test_the_request_that_crosses_the_quota_completes(self, store):
        lim, t = Limiter(store, CONFIG, clock=Clock()), team(quota=Quota(tokens_per_day=5000))
        results = await admit_all(lim, t, 4)  # 0 -> 2300 -> 4600 -> 6900 (over): third crosses
        assert [isinstance(r, Exception) for r in results] == [False, False, False, True]

    @pytest.mark.parametrize("last_instant, resets", [
        (utc(2026, 11, 30, 23, 59, 59), "2026-12-01T00:00:00Z"),
        (utc(2026, 12, 31, 23, 59, 59), "2027-01-01T00:00:00Z"),
        (utc(2028, 2, 29, 23, 59, 59), "2028-03-01T00:00:00Z"),
        (utc(2027, 2, 28, 23, 59, 59), "2027-03-01T00:00:00Z"),
    ])
    async def test_usd_per_month_resets_on_the_first(self, store, last_instant, resets):
        clock = Clock(last_instant)
        lim, t = Limiter(store, CONFIG, clock=clock), team(quota=Quota(usd_per_month=1))
        a = await lim.admit(t, request())
        await a.settle(Usage(prompt=10, completion=10, cost_usd=1.25))
        assert a.remaining == {"tokens_per_day": None, "usd_per_month": 0.0}
        with pytest.raises(QuotaExceeded) as e:
            await lim.admit(t, request())
        assert e.value.limit == "usd_per_month" and resets in e.value.message
        clock.advance(0.999)
        with pytest.raises(QuotaExceeded):
            await lim.admit(t, request())
        clock.advance(0.001)
        b = await lim.admit(t, request())
        assert b.month == resets[:7]

    async def test_request_admitted_before_midnight_settles_into_that_day(self, store):
        clock = Clock(utc(2026, 11, 25, 23, 59, 59))
        lim, t = Limiter(store, CONFIG, clock=clock), team(quota=Quota(tokens_per_day=10**6))
        a = await lim.admit(t, request())
        clock.advance(30)
        await a.settle(Usage(prompt=100, completion=200))
        got = await ledger.read_usage(store, t.name, day=date(2026, 11, 25))
        assert got["day"]["requests"] == 1 and got["day"]["quota_tokens"] == 300
        got = await ledger.read_usage(store, t.name, day=date(2026, 11, 26))
        assert got["day"]["requests"] == 0

    async def test_the_scripts_calendar_matches_python(self, store):
        clock = Clock()
        lim, t = Limiter(store, CONFIG, clock=clock), team(quota=Quota(tokens_per_day=10**12))
        instants = [utc(1970, 1, 1), utc(2000, 2, 29, 23, 59, 59), utc(2100, 3, 1), utc(2024, 12, 31, 23, 59, 59)]
        instants += [utc(2026, 1, 1) + timedelta(days=d, seconds=d * 3607) for d in range(0, 3000, 97)]
        for when in instants:
            clock.t = when.timestamp()
            a = await lim.admit(t, request(max_tokens=1))
            assert (a.date, a.month) == (when.date().isoformat(), when.strftime("%Y-%m"))

    async def test_unlimited_team_still_writes_the_ledger(self, store):
        lim, t = Limiter(store, CONFIG, clock=Clock()), team()
        a = await lim.admit(t, request())
        assert a.headers == {}
        await a.settle(Usage(prompt=5, completion=7, images_out=1))
        day = (await ledger.read_usage(store, t.name, day=date(2026, 11, 25)))["day"]
        assert day["requests"] == 1 and day["images_out"] == 1 and day["tokens"]["completion"] == 7


    async def test_a_request_whose_usage_is_unknown_is_charged_its_estimate(self, store):
        lim = Limiter(store, CONFIG, clock=Clock())
        t = team(Limits(tokens_per_minute=10_000), Quota(tokens_per_day=10**6, usd_per_month=5))
        req = request()
        a = await lim.admit(t, req)
        charged = estimate(req).priced(MODEL.prices)  # what the handler settles when the provider said nothing
        await a.settle(charged)
        got = await ledger.read_usage(store, t.name, day=date(2026, 11, 25), month="2026-11")
        assert got["day"]["quota_tokens"] == a.reserved == 2300
        assert got["day"]["tokens"]["completion"] == 2200 and got["day"]["requests"] == 1
        assert got["month"]["quota_micro"] == a.reserved_micro == round(charged.cost_usd * 1_000_000)
        assert got["month"]["cost_usd"] == pytest.approx(charged.cost_usd)

    async def test_a_bad_argument_to_admit_writes_nothing(self, store):
        t = team(Limits(requests_per_minute=10, tokens_per_minute=1000, max_concurrent=2),
                 Quota(tokens_per_day=10**6, usd_per_month=5))
        lim = Limiter(store, CONFIG, clock=Clock())
        plan = lim._plan(t)
        day, month = ledger.day_key(t.name, "2026-11-25"), ledger.month_key(t.name, "2026-11")
        for tokens in (10**17, -1, 2.5, "12abc", "nan", ""):
            with pytest.raises(StoreError):
                await store.run_script("admit", (plan.record_key("a1"), *plan.admit_keys),
                                       (T0 * 1000, tokens, 0, "a1", *plan.admit_args))
        assert await store.client.exists(*limit_keys(t.name), day, month, plan.record_key("a1")) == 0

    async def test_usd_per_month_reserves_the_priced_estimate(self, store):
        lim = Limiter(store, CONFIG, clock=Clock())
        t = team(quota=Quota(usd_per_month=0.15))  # one request's estimate is $0.14756
        results = await asyncio.gather(*(lim.admit(t, request()) for _ in range(10)), return_exceptions=True)
        admissions = [r for r in results if not isinstance(r, Exception)]
        assert len(admissions) == 2  # the second crosses the quota; in flight, they hold it
        assert {r.limit for r in results if isinstance(r, Exception)} == {"usd_per_month"}
        await admissions[0].settle(Usage(prompt=10, completion=10, cost_usd=0.01))
        assert admissions[0].remaining["usd_per_month"] == 0  # the other still holds its estimate
        await admissions[1].settle(Usage(prompt=10, completion=10, cost_usd=0.02))
        assert admissions[1].remaining["usd_per_month"] == pytest.approx(0.12)
        month = (await ledger.read_usage(store, t.name, month="2026-11"))["month"]
        assert month["cost_usd"] == pytest.approx(0.03) and month["quota_micro"] == 30_000

    async def test_max_concurrent_retry_after_is_when_the_first_lease_can_expire(self, store):
        clock = Clock()
        lim, t = Limiter(store, CONFIG, clock=clock), team(Limits(max_concurrent=1))
        await lim.admit(t, request())
        clock.advance(4)
        with pytest.raises(RateLimited) as e:
            await lim.admit(t, request())
        assert e.value.headers["retry-after-ms"] == "11000"  # store.lease_ttl_s is 15 s

    async def test_a_renewed_lease_outlives_its_ttl_until_settled(self, store):
        clock = Clock()
        lim, t = Limiter(store, CONFIG, clock=clock, lease_ttl_s=10), team(Limits(max_concurrent=1))
        a = await lim.admit(t, request())
        for _ in range(5):  # 45 s: four and a half ttls
            clock.advance(9)
            await lim.leases.renew()
            with pytest.raises(RateLimited):
                await lim.admit(t, request())
        await a.settle(Usage(prompt=1))
        await lim.admit(t, request())

    async def test_a_given_up_admission_is_released_by_its_id(self, store):
        """The caller gave up (cancelled) while admit.lua was in flight; the script ran anyway."""
        t = team(Limits(tokens_per_minute=10_000, max_concurrent=1), Quota(tokens_per_day=10**6, usd_per_month=5))
        stalled = StalledStore(store)
        lim = Limiter(stalled, CONFIG, clock=Clock())
        await stalled.give_up_on(lim.admit(t, request()))
        stalled.go.set()  # the script runs, nobody reads its answer
        await stalled.done.wait()
        await lim.leases.repay()
        assert lim.leases.owed == 0
        await assert_nothing_held(store, lim, t)

    async def test_a_release_that_runs_before_the_late_admit_leaves_a_tombstone(self, store):
        t = team(Limits(tokens_per_minute=10_000, max_concurrent=1), Quota(tokens_per_day=10**6, usd_per_month=5))
        stalled = StalledStore(store)
        lim = Limiter(stalled, CONFIG, clock=Clock())
        await stalled.give_up_on(lim.admit(t, request()))
        await lim.leases.repay()  # the release reaches the store first
        stalled.go.set()
        assert int((await stalled.done_result())[0]) == 0  # the late admit found the tombstone
        await assert_nothing_held(store, lim, t)

    async def test_released_admissions_are_undone_as_if_they_never_happened(self, store):
        """An n=3 request refused at its 3rd admission gives the first two back: lease,
        reservations and requests_per_minute, and the ledger counts no request."""
        clock = Clock()
        t = team(Limits(requests_per_minute=2, tokens_per_minute=10_000, max_concurrent=5),
                 Quota(tokens_per_day=10**6, usd_per_month=5))
        lim = Limiter(store, CONFIG, clock=clock)
        rpm_key = limit_keys(t.name)[0]
        before = await store.client.get(rpm_key)
        first = await admit_all(lim, t, 3)
        assert admitted(first) == 2 and first[2].limit == "requests_per_minute"
        for a in first[:2]:
            await a.release()
            await a.settle(Usage(prompt=1))  # a no-op: released already
        assert await store.client.get(rpm_key) == before
        day = (await ledger.read_usage(store, t.name, day=date(2026, 11, 25)))["day"]
        assert day["requests"] == 0
        await assert_nothing_held(store, lim, t)
        assert admitted(await admit_all(lim, t, 2)) == 1  # assert_nothing_held took one: the bucket is full again

    async def test_a_release_moves_the_request_bucket_back_never_before_now(self, store):
        clock = Clock()
        lim, t = Limiter(store, CONFIG, clock=clock), team(Limits(requests_per_minute=5))  # one per 12 s
        a, b = await admit_all(lim, t, 2)
        await (await lim.admit(t, request())).settle(Usage(prompt=1))  # it keeps its request
        clock.advance(30)  # the bucket: 36 s ahead at T0, 6 s ahead now (4 requests left)
        await a.release()  # 6 s ahead -> now, not 6 s before it
        await b.release()  # stays at now
        assert await store.client.exists(limit_keys(t.name)[0]) == 0
        results = await admit_all(lim, t, 6)
        assert admitted(results) == 5 and results[5].limit == "requests_per_minute"

    async def test_a_settle_whose_answer_was_lost_is_retried_and_counted_once(self, store):
        t = team(Limits(tokens_per_minute=10_000, max_concurrent=1), Quota(tokens_per_day=10**6, usd_per_month=5))
        lossy = LossyStore(store)
        lim = Limiter(lossy, CONFIG, clock=Clock())
        a = await lim.admit(t, request())
        await a.settle(Usage(prompt=100, completion=200, cost_usd=0.5))  # ran, but its answer was lost
        assert lim.leases.owed == 1
        await lim.leases.repay()
        assert lim.leases.owed == 0
        day = (await ledger.read_usage(store, t.name, day=date(2026, 11, 25)))["day"]
        assert day["requests"] == 1 and day["tokens"]["prompt"] == 100 and day["quota_tokens"] == 300
        month = (await ledger.read_usage(store, t.name, month="2026-11"))["month"]
        assert month["cost_usd"] == 0.5 and month["quota_micro"] == 500_000
        b = await lim.admit(t, request())  # the lease came back
        assert b.headers["x-ratelimit-remaining-tokens"] == str(10_000 - 300 - 2300)


# --- memory-only: pure helpers, round trips, failure handling ------------------------------


@pytest.mark.parametrize("seconds, text", [
    (0, "0ms"), (0.012, "12ms"), (0.9994, "1s"), (0.0121, "13ms"), (1, "1s"), (1.2, "1.2s"), (6, "6s"),
    (13.8, "13.8s"), (59.9999, "1m0s"), (60, "1m0s"), (90, "1m30s"), (90.5, "1m30.5s"),
    (3600, "1h0m0s"), (7384, "2h3m4s"),
])
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


def test_estimate_tokens():
    assert estimate(request(text_chars=401, images=2, max_tokens=None)).total == 101 + 1120 + 2200
    assert estimate(request(text_chars=0, images=0, max_tokens=50)).total == 51  # prompt >= 1


class CountingStore:
    """Wraps a store and counts script round trips."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    async def run_script(self, name, keys, args, **kw):
        self.calls.append(name)
        return await self.inner.run_script(name, keys, args, **kw)


async def test_admission_and_settlement_are_one_round_trip_each(store):
    counting = CountingStore(store)
    lim = Limiter(counting, CONFIG, clock=Clock())
    t = team(Limits(requests_per_minute=10, tokens_per_minute=10**5, max_concurrent=3),
             Quota(tokens_per_day=10**6, usd_per_month=10))
    a = await lim.admit(t, request())
    assert counting.calls == ["admit"]
    await a.settle(Usage(prompt=1, completion=1))
    assert counting.calls == ["admit", "settle"]
    u = await lim.admit(team(), request())  # no limits, no quota: no admission round trip
    assert counting.calls == ["admit", "settle"]
    await u.settle(Usage(prompt=1))
    assert counting.calls == ["admit", "settle", "settle"]


class BrokenStore:
    on_error = None

    async def run_script(self, name, keys, args, **kw):
        raise StoreError("store admit failed: ConnectionError", op=name)


class Metrics:
    def __init__(self):
        self.errors, self.rejections, self.remaining, self.account = [], [], {}, {}

    def store_error(self, op):
        self.errors.append(op)

    def rejection(self, team_name, limit):
        self.rejections.append((team_name, limit))

    def quota_remaining(self, team_name, quota, value):
        self.remaining[(team_name, quota)] = value

    def account_quota_remaining(self, quota, value):
        self.account[quota] = value


async def test_store_down_fails_open_and_counts():
    metrics = Metrics()
    lim = Limiter(BrokenStore(), CONFIG, on_error="open", metrics=metrics, clock=Clock())
    a = await lim.admit(team(Limits(requests_per_minute=1)), request())
    await a.settle(Usage(prompt=1, completion=1))  # best effort: no exception
    assert metrics.errors == ["admit", "settle"]


async def test_store_down_fails_closed_with_503():
    lim = Limiter(BrokenStore(), CONFIG, on_error="closed", clock=Clock())
    with pytest.raises(StoreUnavailable) as e:
        await lim.admit(team(Limits(requests_per_minute=1)), request())
    assert e.value.status == 503 and e.value.code == "store_unavailable" and "retry-after" in e.value.headers


async def test_a_settle_the_store_never_took_is_kept_then_dropped_loudly_at_shutdown(caplog):
    metrics = Metrics()
    lim = Limiter(BrokenStore(), CONFIG, on_error="open", metrics=metrics, clock=Clock())
    a = await lim.admit(team(Limits(requests_per_minute=1)), request())
    await a.settle(Usage(prompt=1, completion=1))
    assert lim.leases.owed == 2  # the settle, and the release of the admission the store never answered
    await lim.close()
    assert lim.leases.owed == 0 and metrics.errors[-1] == "settle_dropped"
    assert "dropped" in caplog.text


async def test_unreachable_redis_is_a_store_error_and_counted_once():
    from tests.fixtures.redis import free_port

    ops = []
    s = await connect(f"redis://127.0.0.1:{free_port()}/0", on_error=ops.append)
    metrics = Metrics()
    lim = Limiter(s, CONFIG, on_error="open", metrics=metrics, clock=Clock())
    a = await asyncio.wait_for(lim.admit(team(Limits(max_concurrent=1)), request()), 5)
    assert s.healthy is False and s.last_error
    assert ops == ["admit"] and metrics.errors == []  # the store's hook counted it
    with pytest.raises(StoreError):
        await s.ping()
    await a.settle(Usage())
    await s.close()


async def test_usage_read_while_the_store_is_down_is_a_503():
    with pytest.raises(StoreUnavailable):
        await ledger.team_usage_report(BrokenStore(), team(), T0)


async def test_rejections_and_remaining_quota_reach_metrics(store):
    metrics = Metrics()
    lim = Limiter(store, CONFIG, metrics=metrics, clock=Clock())
    t = team(Limits(requests_per_minute=1), Quota(tokens_per_day=1000, usd_per_month=2))
    a = await lim.admit(t, request())
    await a.settle(Usage(prompt=100, completion=100, cost_usd=0.5))
    assert metrics.remaining == {(t.name, "tokens_per_day"): 800, (t.name, "usd_per_month"): 1.5}
    with pytest.raises(RateLimited):
        await lim.admit(t, request())
    assert metrics.rejections == [(t.name, "requests_per_minute")]


async def test_settle_survives_the_caller_being_cancelled(store):
    lim, t = Limiter(store, CONFIG, clock=Clock()), team(Limits(max_concurrent=1))
    a = await lim.admit(t, request())
    task = asyncio.create_task(a.settle(Usage(prompt=1)))
    await asyncio.sleep(0)
    task.cancel()
    await asyncio.sleep(0.05)
    await lim.admit(t, request())  # the lease came back anyway


def test_lease_ids_are_unique_and_a_forked_child_draws_a_new_prefix():
    from gateway.limits.plan import _Ids

    ids = _Ids()
    drawn = {ids.next() for _ in range(10_000)}
    assert len(drawn) == 10_000
    prefix = next(iter(drawn)).split(":")[0]
    ids._reset()  # what os.register_at_fork runs in a child
    assert ids.next().split(":")[0] != prefix and len(prefix) == 18
    assert _Ids().next().split(":")[0] != prefix  # another process (or replica)


def test_ledger_increments_skip_zeros_in_field_order():
    u = Usage(prompt=100, completion=1200, image=1120, images_in=2, images_out=1, cost_usd=0.0123456)
    assert ledger.increments(u, cached=False) == [
        "requests", 1, "prompt", 100, "completion", 1200, "image", 1120, "images_in", 2, "images_out", 1,
        "cost_micro", 12346]
    assert ledger.increments(u, cached=True) == [
        "requests", 1, "images_in", 2, "images_out", 1, "cache_hits", 1, "cache_saved_tokens", 1300]


@pytest.mark.parametrize("when", [utc(1970, 1, 1), utc(2026, 11, 25, 23, 59, 59, 999999), utc(2026, 11, 26),
                                  utc(2028, 2, 29, 12), utc(1969, 12, 31, 23, 59, 59)])
def test_ledger_period_is_the_utc_day_and_month(when):
    assert ledger.period(when.timestamp()) == (when.date().isoformat(), when.strftime("%Y-%m"))


class DownThenBackStore(CountingStore):
    """Fails every settle while ``down``; counts the scripts in flight at once once back."""

    on_error = None

    def __init__(self, inner):
        super().__init__(inner)
        self.down, self.in_flight, self.most_in_flight = True, 0, 0

    async def run_script(self, name, keys, args, **kw):
        if name == "settle" and self.down:
            raise StoreError("store settle failed: connection refused", op=name)
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await asyncio.sleep(0)  # a real round trip yields: the others start meanwhile
            return await super().run_script(name, keys, args, **kw)
        finally:
            self.in_flight -= 1


async def test_owed_settles_reach_a_store_that_came_back_in_bounded_batches(store):
    from gateway.limits.leases import REPAY_BATCH

    flaky = DownThenBackStore(store)
    lim = Limiter(flaky, CONFIG, clock=Clock())
    t, n = team(), 2 * REPAY_BATCH + 100
    for adm in [await lim.admit(t, request()) for _ in range(n)]:
        await adm.settle(Usage(prompt=1, completion=2))
    assert lim.leases.owed == n
    flaky.down = False
    await lim.leases.repay()
    assert lim.leases.owed == 0 and flaky.calls.count("settle") == n
    assert flaky.most_in_flight == REPAY_BATCH
    day = (await ledger.read_usage(store, t.name, day=date(2026, 11, 25), month="2026-11"))["day"]
    assert day["requests"] == n and day["tokens"]["prompt"] == n and day["tokens"]["completion"] == 2 * n
