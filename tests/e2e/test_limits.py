"""Limits, quotas and the usage ledger as a client sees them: in-process gateways in front of the
simulator, on the embedded store and on a real redis-server.

What a client must be able to rely on: a refusal names the limit and says when to retry
(``retry-after`` / ``retry-after-ms``, which the official SDK honours), every response of a team
with limits carries the ``x-ratelimit-*`` headers, quotas say when they reset, ``/v1/usage`` and
``/admin/usage`` report the ledger, and a dead store is handled as ``store.on_error`` says, with
``/readyz`` telling the truth and recovery without a restart.

Most tests freeze the limiter's clock (``create_app(clock=...)``): the Lua scripts then use it
instead of Redis ``TIME``, so retry times and header values are exact, not approximate.
"""
from __future__ import annotations

import asyncio
import re
import time
from datetime import datetime, timezone

import aiohttp
import openai
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.fixtures.gateway import ADMIN_KEY, wait_for
from tests.images import png_url

MODEL = "google/gemini-3-pro-image-preview"
PRICES = {"prompt": 2.0, "completion": 12.0, "image": 120.0}  # the default model's prices
# OpenAI's duration format for x-ratelimit-reset-*: "12ms", "1.2s", "6s", "1m30s", "2h0m5s".
DURATION_RE = re.compile(r"^(?:(\d+)h)?(?:(\d+)m)?(?:(\d+(?:\.\d+)?)s|(\d+)ms)$")
RATE_HEADERS = ("x-ratelimit-limit-requests", "x-ratelimit-remaining-requests", "x-ratelimit-reset-requests")
TOKEN_HEADERS = ("x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens")


def utc(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=timezone.utc).timestamp()


class Clock:
    """The limiter's clock in a test: frozen at ``t`` (``advance`` moves it), or, after ``run()``,
    moving in real time from ``t`` on, starting at the next reading (for a client that really
    sleeps, like the SDK; however slow the machine, that reading is exactly ``t``)."""

    def __init__(self, t: float):
        self.t = t
        self._running = False
        self._since: float | None = None

    def __call__(self) -> float:
        if not self._running:
            return self.t
        if self._since is None:
            self._since = time.monotonic()
        return self.t + (time.monotonic() - self._since)

    def advance(self, seconds: float) -> None:
        self.t += seconds

    def run(self) -> None:
        self._running = True


def duration_s(text: str) -> float:
    """Seconds of an OpenAI-format duration; fails the test on any other format."""
    m = DURATION_RE.match(text)
    assert m, f"not an OpenAI duration: {text!r}"
    h, mins, s, ms = m.groups()
    return int(h or 0) * 3600 + int(mins or 0) * 60 + (float(s) if s is not None else int(ms) / 1000)


def body(prompt: str = "a lighthouse at dusk", **extra) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": prompt}], **extra}


def cost(usage: dict) -> float:
    image = usage["completion_tokens_details"]["image_tokens"]
    return (usage["prompt_tokens"] * PRICES["prompt"] + image * PRICES["image"]
            + (usage["completion_tokens"] - image) * PRICES["completion"]) / 1_000_000


@pytest.fixture(params=["memory", "redis"])
def store_url(request) -> str:
    """The embedded store, or the session's redis-server emptied for this test."""
    if request.param == "memory":
        return "memory://"
    server = request.getfixturevalue("redis_server")
    server.start()  # another test may have stopped it
    server.flush()
    return server.url


@pytest.fixture
async def http():
    async with aiohttp.ClientSession() as session:
        yield session


class Caller:
    """Requests to one gateway as one team: (status, headers, JSON body)."""

    def __init__(self, gw, http: aiohttp.ClientSession):
        self.gw, self.http = gw, http

    async def chat(self, team: str = "alpha", **payload) -> tuple[int, dict, dict]:
        async with self.http.post(self.gw.url + "/v1/chat/completions", json=payload or body(),
                                  headers=self.gw.headers(team)) as resp:
            raw = await resp.read()
            if resp.content_type == "text/event-stream":
                return resp.status, resp.headers.copy(), {"stream": raw}
            return resp.status, resp.headers.copy(), orjson.loads(raw)

    async def get(self, path: str, key: str | None) -> tuple[int, dict]:
        """A read after the gateway finished every request (an answer comes before its metrics and access line)."""
        await self.gw.idle()
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        async with self.http.get(self.gw.url + path, headers=headers) as resp:
            return resp.status, await resp.json(content_type=None)

    async def metric(self, name: str, **labels: str) -> float:
        await self.gw.idle()  # the metrics follow the answer
        async with self.http.get(self.gw.url + "/metrics") as resp:
            text = await resp.text()
        return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
                   if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


# -- rate limits -----------------------------------------------------------------------------------


async def test_rate_limit_refusal_names_the_limit_and_when_to_retry(start_gateway, http, store_url):
    clock = Clock(utc("2026-03-10T12:00:00"))
    gw = await start_gateway({"alpha": {"limits": {"requests_per_minute": 2}}}, store={"url": store_url}, clock=clock)
    c = Caller(gw, http)
    assert [(await c.chat())[0] for _ in range(2)] == [200, 200]

    status, headers, err = await c.chat()
    assert status == 429
    assert err["error"]["type"] == "rate_limit_error" and err["error"]["code"] == "rate_limit_exceeded"
    message = err["error"]["message"]
    assert "requests_per_minute" in message and "(2)" in message and "alpha" in message
    # 2 per minute: the next one is allowed 30 s after the burst, to the millisecond
    assert headers["retry-after-ms"] == "30000" and headers["retry-after"] == "30"
    assert headers["x-ratelimit-limit-requests"] == "2" and headers["x-ratelimit-remaining-requests"] == "0"
    assert headers["x-ratelimit-reset-requests"] == "1m0s"
    assert await c.metric("gateway_ratelimit_rejections_total", team="alpha", limit="requests_per_minute") == 1

    clock.advance(29.999)
    status, headers, _ = await c.chat()
    assert status == 429 and headers["retry-after-ms"] == "1"
    clock.advance(0.001)  # exactly when retry-after-ms said
    assert (await c.chat())[0] == 200


async def test_tokens_per_minute_refusal_names_the_limit_and_the_reservation(start_gateway, http, store_url):
    clock = Clock(utc("2026-03-10T12:00:00"))
    gw = await start_gateway({"alpha": {"limits": {"tokens_per_minute": 3000}}}, store={"url": store_url}, clock=clock)
    c = Caller(gw, http)
    status, headers, first = await c.chat()
    assert status == 200
    reserved = 3000 - int(headers["x-ratelimit-remaining-tokens"])  # the request's estimate
    assert reserved > 0

    status, headers, err = await c.chat()
    assert status == 429 and err["error"]["code"] == "rate_limit_exceeded"
    assert f"tokens_per_minute (3000; this request reserves {reserved} tokens)" in err["error"]["message"]
    # the first request was settled at its real usage: the bucket holds that, and this request
    # needs ``reserved`` more; at 3000 tokens a minute a token takes 20 ms to come back
    used = first["usage"]["total_tokens"]
    assert int(headers["retry-after-ms"]) == (used + reserved) * 20 - 60_000
    assert headers["x-ratelimit-limit-tokens"] == "3000"
    assert "x-ratelimit-limit-requests" not in headers  # no requests_per_minute for this team


async def test_ratelimit_headers_on_every_response(start_gateway, http, store_url):
    """200s (JSON and stream) and the 429 all carry both trios; refunds show in the tokens left."""
    clock = Clock(utc("2026-03-10T12:00:00"))
    teams = {"alpha": {"limits": {"requests_per_minute": 3, "tokens_per_minute": 10000}}, "free": {}}
    gw = await start_gateway(teams, store={"url": store_url}, clock=clock)
    c = Caller(gw, http)

    seen, used = [], []
    for i in range(3):
        status, headers, answer = await c.chat(**body(stream=True) if i == 2 else body())
        assert status == 200
        seen.append(headers)
        if i < 2:
            used.append(answer["usage"]["total_tokens"])
    assert seen[2]["Content-Type"].startswith("text/event-stream")
    for h in seen:
        for name in RATE_HEADERS + TOKEN_HEADERS:
            assert name in h, name
    assert [h["x-ratelimit-limit-requests"] for h in seen] == ["3"] * 3
    assert [h["x-ratelimit-remaining-requests"] for h in seen] == ["2", "1", "0"]
    # one request takes 20 s to come back; the bucket is full again after the whole debt
    assert [h["x-ratelimit-reset-requests"] for h in seen] == ["20s", "40s", "1m0s"]

    # each request reserves its estimate; the ones before it were settled at their real usage
    reserved = 10000 - int(seen[0]["x-ratelimit-remaining-tokens"])
    assert [h["x-ratelimit-limit-tokens"] for h in seen] == ["10000"] * 3
    assert [int(h["x-ratelimit-remaining-tokens"]) for h in seen] == [
        10000 - reserved, 10000 - used[0] - reserved, 10000 - used[0] - used[1] - reserved]
    # full again once the tokens taken so far came back, at 10000 a minute (6 ms each)
    assert [duration_s(h["x-ratelimit-reset-tokens"]) for h in seen] == pytest.approx(
        [reserved * 0.006, (used[0] + reserved) * 0.006, (used[0] + used[1] + reserved) * 0.006], abs=0.0015)

    status, headers, err = await c.chat()
    assert status == 429 and err["error"]["code"] == "rate_limit_exceeded"
    assert headers["x-ratelimit-remaining-requests"] == "0" and headers["x-ratelimit-limit-requests"] == "3"
    for name in TOKEN_HEADERS:
        assert name in headers, name

    status, headers, _ = await c.chat("free")
    assert status == 200 and not any(h.startswith("x-ratelimit-") for h in headers)


async def test_ratelimit_headers_on_upstream_failures_too(start_gateway, http):
    teams = {"alpha": {"limits": {"requests_per_minute": 10, "tokens_per_minute": 100000}}}
    gw = await start_gateway(teams, clock=Clock(utc("2026-03-10T12:00:00")), upstream={"max_retries": 0})
    c = Caller(gw, http)
    for fault, status in (("status=500", 500), ("reset", 502)):  # the provider's error; no answer at all
        got, headers, _ = await c.chat(**body(sim_fault=fault))
        assert got == status
        assert all(name in headers for name in RATE_HEADERS + TOKEN_HEADERS), (fault, headers)
    assert headers["x-ratelimit-remaining-requests"] == "8"


# -- quotas ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "quota, now, resets",
    [
        ({"tokens_per_day": 1}, "2026-01-31T18:00:00", "2026-02-01T00:00:00"),
        ({"usd_per_month": 0.01}, "2026-02-10T00:00:00", "2026-03-01T00:00:00"),
    ],
    ids=["tokens_per_day", "usd_per_month"],
)
async def test_quota_refusal_names_the_quota_and_when_it_resets(start_gateway, http, store_url, quota, now, resets):
    clock = Clock(utc(now))
    gw = await start_gateway({"alpha": {"quota": quota}}, store={"url": store_url}, clock=clock)
    c = Caller(gw, http)
    (name,) = quota
    assert (await c.chat())[0] == 200  # the request that crosses the quota completes

    status, headers, err = await c.chat()
    assert status == 429
    assert err["error"]["type"] == "insufficient_quota" and err["error"]["code"] == "insufficient_quota"
    message = err["error"]["message"]
    assert name in message and "alpha" in message and f"resets at {resets}Z" in message
    wait_ms = round((utc(resets) - utc(now)) * 1000)
    assert headers["retry-after-ms"] == str(wait_ms) and headers["retry-after"] == str(wait_ms // 1000)
    assert await c.metric("gateway_ratelimit_rejections_total", team="alpha", limit=name) == 1

    clock.advance(wait_ms / 1000 - 0.001)
    assert (await c.chat())[0] == 429
    clock.advance(0.001)  # a new UTC day / month: the quota is whole again
    assert (await c.chat())[0] == 200


async def test_usd_per_month_holds_under_10_concurrent_requests(start_gateway, http, redis_server):
    """Each request reserves its priced estimate at admission: with $0.15 (one request's estimate
    is about $0.147), the first is admitted, the second crosses the quota, the other 8 are refused
    while those two are in flight; what was spent is what those two cost, never 10 requests' worth."""
    redis_server.start()
    redis_server.flush()
    clock = Clock(utc("2026-03-10T12:00:00"))
    gw = await start_gateway({"alpha": {"quota": {"usd_per_month": 0.15}}}, store={"url": redis_server.url},
                             clock=clock)
    c = Caller(gw, http)
    answers = await asyncio.gather(*(c.chat(**body(f"poster {i}", sim_fault="latency_ms=300")) for i in range(10)))

    ok = [a for status, _, a in answers if status == 200]
    refused = [(status, a["error"]["code"]) for status, _, a in answers if status != 200]
    assert len(ok) == 2 and refused == [(429, "insufficient_quota")] * 8
    status, report = await c.get("/v1/usage", gw.key())
    assert status == 200
    month = report["month"]
    assert month["requests"] == 2
    assert month["cost_usd"] == pytest.approx(sum(cost(a["usage"]) for a in ok))
    assert month["cost_usd"] <= 0.15 + max(cost(a["usage"]) for a in ok)
    assert month["quota_micro"] == round(month["cost_usd"] * 1_000_000)  # nothing left reserved


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
async def test_a_huge_max_tokens_is_refused_before_anything_is_reserved(start_gateway, http, redis_server, field):
    redis_server.start()
    redis_server.flush()
    gw = await start_gateway({"alpha": {"limits": {"requests_per_minute": 5, "tokens_per_minute": 10000,
                                                   "max_concurrent": 2},
                                        "quota": {"tokens_per_day": 10**6, "usd_per_month": 10}}},
                             store={"url": redis_server.url})
    c = Caller(gw, http)
    status, _, err = await c.chat(**body(**{field: 100000000000000000}))
    assert status == 400
    assert err["error"]["code"] == "invalid_request" and err["error"]["param"] == field
    assert "32768" in err["error"]["message"]
    with redis_server.client() as r:
        assert r.dbsize() == 0  # no bucket, lease, reservation or ledger entry
    status, headers, _ = await c.chat()
    assert status == 200 and headers["x-ratelimit-remaining-requests"] == "4"


class SlowSettles:
    """The embedded store, its settles each taking ``delay_s`` (a slow store, not a stalled one)."""

    def __init__(self, store, delay_s: float) -> None:
        self._store, self._delay_s = store, delay_s

    def __getattr__(self, name):
        return getattr(self._store, name)

    async def run_script(self, name, keys, args, **kw):
        if name == "settle":
            await asyncio.sleep(self._delay_s)  # the fault itself, not an ordering
        return await self._store.run_script(name, keys, args, **kw)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_a_client_s_next_request_finds_its_slot_free_though_settles_are_slow(start_gateway, http, stream):
    """max_concurrent 1, one request after another, each on a new connection (as curl makes
    them), each settle taking 0.3 s: every request finds the slot of the one before it free,
    since an answer's last bytes (a JSON body, a stream's [DONE]) go out once its settle is done
    (for up to a second: a slower store delays no answer longer). On one kept-alive connection
    aiohttp would hold the next request until the last handler ended anyway."""
    from gateway import store as store_mod

    store = SlowSettles(await store_mod.connect("memory://"), 0.3)
    gw = await start_gateway({"alpha": {"limits": {"max_concurrent": 1}}}, store_obj=store)
    statuses = []
    for _ in range(3):
        async with http.post(gw.url + "/v1/chat/completions", json=body(stream=stream),
                             headers={**gw.headers("alpha"), "Connection": "close"}) as resp:
            data = await resp.read()
            statuses.append(resp.status)
            assert not stream or data.endswith(b"data: [DONE]\n\n")
    assert statuses == [200] * 3


# -- the usage endpoints ---------------------------------------------------------------------------


async def test_v1_usage_and_admin_usage_report_the_ledger(start_gateway, http, store_url):
    limits = {"requests_per_minute": 100, "tokens_per_minute": 1_000_000, "max_concurrent": 4}
    quota = {"tokens_per_day": 1_000_000, "usd_per_month": 50}
    gw = await start_gateway({"design": {"limits": limits, "quota": quota}, "research": {}}, store={"url": store_url})
    c = Caller(gw, http)
    edit = [{"role": "user", "content": [{"type": "text", "text": "make it blue"},
                                          {"type": "image_url", "image_url": {"url": png_url()}}]}]
    answers = []
    for payload in (body(), {"model": MODEL, "messages": edit}):
        status, _, answer = await c.chat("design", **payload)
        assert status == 200
        answers.append(answer["usage"])
    status, _, other = await c.chat("research")
    assert status == 200

    status, report = await c.get("/v1/usage", gw.key("design"))
    assert status == 200 and report["team"] == "design"
    tokens = {"prompt": sum(u["prompt_tokens"] for u in answers),
              "completion": sum(u["completion_tokens"] for u in answers),
              "image": sum(u["completion_tokens_details"]["image_tokens"] for u in answers),
              "reasoning": sum(u["completion_tokens_details"]["reasoning_tokens"] for u in answers)}
    spent = sum(cost(u) for u in answers)
    for period in ("day", "month"):
        got = report[period]
        assert got["requests"] == 2 and got["images_in"] == 1 and got["images_out"] == 2
        assert {k: got["tokens"][k] for k in tokens} == tokens
        assert got["cost_usd"] == pytest.approx(spent, abs=2e-6)
        assert got["cache_hits"] == 0
    assert report["day"]["date"] == datetime.now(timezone.utc).date().isoformat()
    assert report["limits"] == limits and report["quota"] == quota
    total = tokens["prompt"] + tokens["completion"]
    assert report["remaining"]["tokens_per_day"] == 1_000_000 - total
    assert report["remaining"]["usd_per_month"] == pytest.approx(50 - spent, abs=2e-6)

    status, own = await c.get("/v1/usage", gw.key("research"))  # a team sees only its own
    assert status == 200 and own["team"] == "research" and own["day"]["requests"] == 1
    assert own["limits"] == {"requests_per_minute": None, "tokens_per_minute": None, "max_concurrent": None}
    assert own["remaining"] == {"tokens_per_day": None, "usd_per_month": None}
    assert own["day"]["tokens"]["completion"] == other["usage"]["completion_tokens"]

    status, admin = await c.get("/admin/usage", ADMIN_KEY)
    assert status == 200
    by_team = {row["team"]: row for row in admin["data"]}
    assert set(by_team) == {"design", "research"}
    assert by_team["design"]["month"] == report["month"] and by_team["research"]["month"] == own["month"]

    status, err = await c.get("/admin/usage", gw.key("design"))
    assert status == 403 and err["error"]["code"] == "forbidden" and err["error"]["type"] == "permission_error"
    status, err = await c.get("/admin/usage", None)
    assert status == 401 and err["error"]["code"] == "invalid_api_key"
    status, err = await c.get("/v1/usage", None)
    assert status == 401


# -- the store going away --------------------------------------------------------------------------


@pytest.mark.parametrize("on_error", ["open", "closed"])
async def test_store_down_then_back_without_a_restart(start_gateway, http, fresh_redis_server, on_error):
    teams = {"alpha": {"limits": {"requests_per_minute": 2}}}
    gw = await start_gateway(teams, store={"url": fresh_redis_server.url, "on_error": on_error})
    c = Caller(gw, http)
    assert (await c.get("/readyz", None))[0] == 200
    assert (await c.chat())[0] == 200

    fresh_redis_server.kill()
    status, ready = await c.get("/readyz", None)
    assert status == 503 and ready["status"] == "unavailable" and ready["reason"].startswith("store")
    for _ in range(3):  # more than the limit allows: while the store is down nothing is counted
        status, headers, answer = await asyncio.wait_for(c.chat(), 10)
        if on_error == "open":
            assert status == 200, answer
        else:
            assert status == 503, answer
            assert answer["error"]["code"] == "store_unavailable" and answer["error"]["type"] == "api_error"
            assert int(headers["retry-after"]) >= 1 and int(headers["retry-after-ms"]) >= 1
    assert await c.metric("gateway_store_errors_total", op="admit") >= 3
    assert (await c.get("/readyz", None))[0] == 503  # still down, in both modes

    fresh_redis_server.start()  # empty again: it keeps nothing on disk
    await wait_for(lambda: _ready(c), timeout_s=10)
    assert [(await c.chat())[0] for _ in range(3)] == [200, 200, 429]  # limits count again


async def _ready(c: Caller) -> bool:
    return (await c.get("/readyz", None))[0] == 200


# -- the official SDK ------------------------------------------------------------------------------


async def test_sdk_raises_rate_limit_error_with_the_code(start_gateway, store_url):
    clock = Clock(utc("2026-03-10T12:00:00"))
    gw = await start_gateway({"alpha": {"limits": {"requests_per_minute": 1}}}, store={"url": store_url}, clock=clock)
    async with openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=gw.key(), max_retries=0) as client:
        await client.chat.completions.create(model=MODEL, messages=body()["messages"])
        with pytest.raises(openai.RateLimitError) as caught:
            await client.chat.completions.create(model=MODEL, messages=body()["messages"])
    err = caught.value
    assert err.status_code == 429 and err.code == "rate_limit_exceeded" and err.type == "rate_limit_error"
    assert "requests_per_minute" in err.message
    assert err.response.headers["retry-after-ms"] == "60000"


async def test_sdk_retry_waits_as_retry_after_ms_says_and_then_succeeds(start_gateway, http, simulator):
    """60 a minute: one request back every second. The bucket is emptied at a frozen instant,
    then the clock runs from the SDK's first attempt on: that one is refused with retry-after-ms
    1000, the SDK waits that long and its second attempt passes. Had it retried sooner (its own backoff starts at
    0.5 s) the gateway would have refused it again: one rejection in all proves it waited."""
    clock = Clock(utc("2026-03-10T12:00:00"))
    gw = await start_gateway({"alpha": {"limits": {"requests_per_minute": 60}}}, clock=clock)
    c = Caller(gw, http)
    statuses = await asyncio.gather(*(c.chat(**body(f"poster {i}")) for i in range(60)))
    assert [s for s, _, _ in statuses] == [200] * 60
    assert (await c.chat())[0] == 429  # empty
    before = (await simulator.stats())["calls"]

    seen: list[tuple[int, str | None]] = []  # every response the SDK got, retries included

    async def record(response) -> None:
        seen.append((response.status_code, response.headers.get("retry-after-ms")))

    clock.run()
    http_client = openai.DefaultAsyncHttpxClient(event_hooks={"response": [record]})
    async with openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=gw.key(), max_retries=2,
                                  http_client=http_client) as client:
        raw = await asyncio.wait_for(
            client.chat.completions.with_raw_response.create(model=MODEL, messages=body()["messages"]), 30)
    assert raw.parse().choices[0].message is not None
    assert seen == [(429, "1000"), (200, None)] and raw.retries_taken == 1
    assert await c.metric("gateway_ratelimit_rejections_total", team="alpha", limit="requests_per_minute") == 2
    assert (await simulator.stats())["calls"] == before + 1  # only the admitted attempt went upstream
