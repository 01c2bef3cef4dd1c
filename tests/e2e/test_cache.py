"""The response cache through real servers: gateway app(s) + simulator on real ports, clients
over HTTP (raw aiohttp where bytes matter, the official ``openai`` SDK for compatibility).

Every test runs on each store backend (``store_url``: ``memory://``, a real redis-server and
a 3-node Redis Cluster, flushed before each test). The simulator counts upstream calls, which
is how "served from the cache" is proven. Concurrency tests use two gateway apps ("replicas")
on the Redis backends, so the cross-replica single-flight path runs too; on ``memory://`` the
two replicas are one gateway (a memory store cannot be shared).

Note: ``sim_fault`` is a passed-through body field, so it is part of the cache key; a repeat
of a faulty request repeats the exact same body. Faults meant for one call only, without
changing the key, are queued with ``simulator.script``.
"""
from __future__ import annotations

import asyncio
import base64
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.http.state import STORE
from gateway.store import StoreError
from tests.fixtures.gateway import RunningGateway, wait_for
from tests.images import open_image

MODEL = "google/gemini-3-pro-image-preview"
ALIAS = "gemini-3-pro-image-preview"
WAIT_S = 60  # a generous bound on "none hangs": a failure here means a hang, not slowness


def body(prompt: str = "a lighthouse at dusk", **extra: Any) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": prompt}], **extra}


# ---- reading answers --------------------------------------------------------------------------


@dataclass
class Answer:
    """One response, parsed the same way for JSON and SSE bodies."""

    status: int
    headers: Any
    raw: bytes
    streamed: bool = False
    content: str = ""
    images: list[bytes] = field(default_factory=list)
    image_mimes: list[str] = field(default_factory=list)
    usage: dict | None = None
    finish_reason: str | None = None
    error: dict | None = None
    events: list = field(default_factory=list)  # SSE data payloads, "[DONE]" kept as a string

    @property
    def cache(self) -> str | None:
        return self.headers.get("x-cache")


def _take_images(parts: list | None, answer: Answer) -> None:
    for part in parts or ():
        url = part["image_url"]["url"]
        head, _, payload = url.partition(",")
        assert head.startswith("data:") and head.endswith(";base64"), head[:80]
        answer.image_mimes.append(head[5:].split(";")[0])
        answer.images.append(base64.b64decode(payload, validate=True))


def parse_answer(status: int, headers: Any, raw: bytes) -> Answer:
    answer = Answer(status, headers, raw)
    if headers.get("Content-Type", "").startswith("text/event-stream"):
        answer.streamed = True
        for event in raw.replace(b"\r\n", b"\n").split(b"\n\n"):
            if not event.startswith(b"data: "):
                continue  # comments (": PROCESSING") and the tail
            data = event[len(b"data: "):]
            answer.events.append("[DONE]" if data == b"[DONE]" else orjson.loads(data))
        for ev in answer.events:
            if ev == "[DONE]":
                continue
            if "error" in ev:
                answer.error = ev["error"]
            if ev.get("usage"):
                answer.usage = ev["usage"]
            for choice in ev.get("choices") or ():
                delta = choice.get("delta") or {}
                answer.content += delta.get("content") or ""
                _take_images(delta.get("images"), answer)
                answer.finish_reason = choice.get("finish_reason") or answer.finish_reason
        return answer
    doc = orjson.loads(raw)
    if "error" in doc:
        answer.error = doc["error"]
        return answer
    choice = doc["choices"][0]
    answer.content = choice["message"].get("content") or ""
    _take_images(choice["message"].get("images"), answer)
    answer.usage, answer.finish_reason = doc.get("usage"), choice.get("finish_reason")
    return answer


async def post(http: aiohttp.ClientSession, gw: RunningGateway, payload: dict, team: str = "alpha",
               **headers: str) -> Answer:
    """One request, returned once the gateway is done with it: its cache entry written (a JSON
    answer reaches the client before that), as the next request would find it."""
    async with http.post(gw.url + "/v1/chat/completions", json=payload, headers=gw.headers(team, **headers)) as resp:
        raw = await resp.read()
        answer = parse_answer(resp.status, resp.headers, raw)
    await gw.idle()
    return answer


def assert_clean_error(answer: Answer) -> None:
    """An error the client can read: the provider's JSON shape with a type and a message."""
    assert answer.status >= 400 or answer.error is not None
    assert isinstance(answer.error, dict), answer.raw[:300]
    assert answer.error.get("message") and answer.error.get("type"), answer.error


async def calls(simulator) -> int:
    return (await simulator.stats())["calls"]


async def scrape(http: aiohttp.ClientSession, gw: RunningGateway) -> dict[tuple[str, tuple], float]:
    """/metrics as {(sample name, sorted labels): value}."""
    async with http.get(gw.url + "/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def metric(samples: dict, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, lab), v in samples.items() if n == name and want <= set(lab))


async def usage_of(http: aiohttp.ClientSession, gw: RunningGateway, team: str = "alpha") -> dict:
    await gw.idle()  # the ledger is written after the answer
    async with http.get(gw.url + "/v1/usage", headers=gw.headers(team)) as resp:
        assert resp.status == 200
        return await resp.json()


# ---- fixtures -----------------------------------------------------------------------------------


@pytest.fixture
async def http():
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
def gateways(start_gateway, store_url):
    """``await gateways(n, teams=..., cache=..., ...)`` -> n replicas on this test's store.

    On the Redis backends each replica is its own app with its own store connection, so they
    share state only through Redis; on ``memory://`` every replica is the same gateway.
    """
    async def start(n: int = 1, teams: dict | None = None, **sections: Any) -> list[RunningGateway]:
        sections["store"] = {"url": store_url, **sections.get("store", {})}
        if store_url == "memory://":
            return [await start_gateway(teams, **sections)] * n
        return [await start_gateway(teams, **sections) for _ in range(n)]

    return start


@pytest.fixture
async def gw(gateways):
    (one,) = await gateways()
    return one


# ---- hits and misses ----------------------------------------------------------------------------


async def test_a_repeat_with_seed_is_a_hit_with_identical_bytes(gw, http, simulator):
    first = await post(http, gw, body(seed=42))
    assert first.status == 200, first.raw[:300]
    assert first.cache == "MISS" and "age" not in first.headers
    assert len(first.images) == 1 and open_image(first.images[0]).format == "JPEG"

    second = await post(http, gw, body(seed=42))
    assert second.status == 200 and second.cache == "HIT"
    assert int(second.headers["age"]) >= 0
    assert second.images == first.images  # byte-identical
    assert second.image_mimes == first.image_mimes == ["image/jpeg"]
    assert second.usage == first.usage and second.finish_reason == "stop"
    assert second.headers["Content-Length"] == str(len(second.raw))
    assert await calls(simulator) == 1

    third = await post(http, gw, body(seed=43))  # another seed: another key
    assert third.cache == "MISS"
    assert await calls(simulator) == 2


async def test_an_alias_hits_the_entry_of_its_model(gw, http, simulator):
    assert (await post(http, gw, body(seed=1))).cache == "MISS"
    hit = await post(http, gw, {**body(seed=1), "model": ALIAS})
    assert hit.cache == "HIT" and hit.status == 200
    assert await calls(simulator) == 1


async def test_json_entry_answers_a_stream_in_the_providers_format(gw, http, simulator):
    stored = await post(http, gw, body(seed=7))
    assert stored.cache == "MISS" and not stored.streamed

    for include_usage in (False, True):
        extra = {"stream_options": {"include_usage": True}} if include_usage else {}
        hit = await post(http, gw, body(seed=7, stream=True, **extra))
        assert hit.status == 200 and hit.cache == "HIT" and hit.streamed
        assert hit.headers["Content-Type"].startswith("text/event-stream")
        assert hit.events[-1] == "[DONE]" and hit.events.count("[DONE]") == 1
        chunks = hit.events[:-1]
        assert all(c["object"] == "chat.completion.chunk" and c["model"] for c in chunks)
        assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
        assert hit.images == stored.images and hit.image_mimes == stored.image_mimes
        assert hit.content == stored.content
        assert hit.finish_reason == "stop" and hit.error is None
        assert hit.usage == stored.usage
        if include_usage:  # OpenAI's shape: usage alone in a last chunk without choices
            assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == stored.usage
    assert await calls(simulator) == 1


async def test_stream_entry_answers_json(gw, http, simulator):
    stored = await post(http, gw, body(seed=8, stream=True))
    assert stored.status == 200 and stored.cache == "MISS" and stored.streamed
    assert stored.events[-1] == "[DONE]" and len(stored.images) == 1

    hit = await post(http, gw, body(seed=8))
    assert hit.status == 200 and hit.cache == "HIT" and not hit.streamed
    assert hit.headers["Content-Type"].startswith("application/json")
    doc = orjson.loads(hit.raw)
    assert doc["object"] == "chat.completion" and doc["choices"][0]["message"]["role"] == "assistant"
    assert hit.images == stored.images
    assert hit.content == stored.content  # the streamed progress text, joined
    assert hit.usage == stored.usage and hit.finish_reason == "stop"

    again = await post(http, gw, body(seed=8, stream=True))  # and streamed again from it
    assert again.cache == "HIT" and again.images == stored.images
    assert await calls(simulator) == 1


async def test_a_big_entry_is_served_range_by_range_byte_identical(gw, http, simulator):
    """An image bigger than one store read: the hit reads it in ranges as it writes the answer."""
    payload = body(seed=61, sim_fault="image_mb=2")
    first = await post(http, gw, payload)
    assert first.status == 200 and first.cache == "MISS" and len(first.images[0]) >= 2 * 1024 * 1024

    hit = await post(http, gw, payload)
    assert hit.status == 200 and hit.cache == "HIT" and hit.images == first.images
    assert hit.headers["Content-Length"] == str(len(hit.raw))
    assert hit.usage == first.usage and hit.content == first.content
    streamed = await post(http, gw, {**payload, "stream": True, "stream_options": {"include_usage": True}})
    assert streamed.cache == "HIT" and streamed.images == first.images and streamed.error is None
    assert streamed.events[-1] == "[DONE]" and streamed.usage == first.usage
    assert await calls(simulator) == 1


class _RangeReadsFail:
    """The test's store, except that reading an entry past its first bytes fails while
    ``failing``: as if the store went away in the middle of a hit."""

    def __init__(self, store) -> None:
        self.store, self.failing = store, False

    def __getattr__(self, name: str):
        return getattr(self.store, name)

    async def get_range(self, key, start, end):
        if self.failing and start > 0:
            raise StoreError("store get_range failed: ConnectionError")
        return await self.store.get_range(key, start, end)

    async def get_ranges(self, key, ranges):
        if self.failing and any(start > 0 for start, _ in ranges):
            raise StoreError("store get_range failed: ConnectionError")
        return await self.store.get_ranges(key, ranges)


async def test_a_hit_the_store_cannot_finish_ends_so_the_client_sees_it(start_gateway, store, http, simulator):
    flaky = _RangeReadsFail(store)
    gw = await start_gateway(store_obj=flaky)
    payload = body(seed=62, sim_fault="image_mb=2")
    assert (await post(http, gw, payload)).cache == "MISS"
    flaky.failing = True

    # JSON: the headers (and Content-Length) are out, so the body is cut short and the
    # connection closed; the client sees an incomplete payload, never a wrong one
    async with http.post(gw.url + "/v1/chat/completions", json=payload, headers=gw.headers()) as resp:
        assert resp.status == 200 and resp.headers["x-cache"] == "HIT"
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()
    # SSE: the stream ends with an error event and no [DONE]
    async with http.post(gw.url + "/v1/chat/completions", json={**payload, "stream": True},
                         headers=gw.headers()) as resp:
        assert resp.status == 200 and resp.headers["x-cache"] == "HIT"
        raw = await resp.read()
    last = raw.rstrip(b"\n").rsplit(b"\n\n", 1)[-1]
    assert last.startswith(b"data: ") and orjson.loads(last[6:])["error"]["code"] == "store_unavailable"
    assert b"[DONE]" not in raw

    flaky.failing = False
    again = await post(http, gw, payload)  # nothing stuck: the next hit is whole
    assert again.status == 200 and again.cache == "HIT" and len(again.images[0]) >= 2 * 1024 * 1024
    assert await calls(simulator) == 1


async def test_the_openai_sdk_reads_hits_streamed_and_not(gw, simulator):
    async with openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=gw.key(), max_retries=0) as client:
        messages = [{"role": "user", "content": "a paper crane"}]
        raw = await client.chat.completions.with_raw_response.create(model=MODEL, messages=messages, seed=3)
        assert raw.headers["x-cache"] == "MISS"
        first = raw.parse()
        await gw.idle()  # its entry is written after the answer
        raw = await client.chat.completions.with_raw_response.create(model=MODEL, messages=messages, seed=3)
        assert raw.headers["x-cache"] == "HIT" and "age" in raw.headers
        second = raw.parse()
        url = lambda m: (m.model_extra or {})["images"][0]["image_url"]["url"]  # noqa: E731
        assert url(second.choices[0].message) == url(first.choices[0].message)
        assert second.usage.total_tokens == first.usage.total_tokens

        raw = await client.chat.completions.with_raw_response.create(
            model=MODEL, messages=messages, seed=3, stream=True, stream_options={"include_usage": True})
        assert raw.headers["x-cache"] == "HIT"
        urls, usage, finish = [], None, None
        async for chunk in raw.parse():
            usage = chunk.usage or usage
            for choice in chunk.choices:
                urls += [p["image_url"]["url"] for p in (choice.delta.model_extra or {}).get("images") or ()]
                finish = choice.finish_reason or finish
        assert urls == [url(first.choices[0].message)]
        assert finish == "stop" and usage.total_tokens == first.usage.total_tokens
    assert await calls(simulator) == 1


# ---- Cache-Control -----------------------------------------------------------------------------


async def test_no_cache_refreshes_the_entry(gw, http, simulator):
    old = await post(http, gw, body(seed=11))
    assert old.cache == "MISS"
    # The next upstream call answers differently (a padded image) with the same request body,
    # so which entry later hits shows whether no-cache replaced it.
    await simulator.script(["image_mb=0.05"])
    fresh = await post(http, gw, body(seed=11), **{"Cache-Control": "no-cache"})
    assert fresh.status == 200 and fresh.cache == "MISS"
    assert await calls(simulator) == 2  # the lookup was skipped
    assert fresh.images != old.images and len(fresh.images[0]) >= 50 * 1024

    later = await post(http, gw, body(seed=11))
    assert later.cache == "HIT" and later.images == fresh.images
    assert await calls(simulator) == 2


async def test_no_store_stores_nothing_and_skips_the_lookup(gw, http, simulator):
    a = await post(http, gw, body(seed=12), **{"Cache-Control": "no-store"})
    assert a.status == 200 and a.cache == "BYPASS"
    b = await post(http, gw, body(seed=12))
    assert b.cache == "MISS"  # nothing was stored
    assert await calls(simulator) == 2
    c = await post(http, gw, body(seed=12), **{"Cache-Control": "no-store"})
    assert c.cache == "BYPASS"  # an entry exists now, but no-store does not look it up
    assert await calls(simulator) == 3
    d = await post(http, gw, body(seed=12, stream=True), **{"Cache-Control": "no-store"})
    assert d.cache == "BYPASS" and d.events[-1] == "[DONE]"
    assert await calls(simulator) == 4


# ---- what is cacheable ------------------------------------------------------------------------


async def test_deterministic_mode_bypasses_non_deterministic_requests(gw, http, simulator):
    for payload in (body(), body(temperature=0.7), body(stream=True), body(temperature=1)):
        for _ in range(2):
            answer = await post(http, gw, payload)
            assert answer.status == 200 and answer.cache == "BYPASS"
    assert await calls(simulator) == 8  # every one went upstream

    assert (await post(http, gw, body(temperature=0))).cache == "MISS"
    assert (await post(http, gw, body(temperature=0))).cache == "HIT"
    assert (await post(http, gw, body(temperature=0.0, stream=True))).cache == "HIT"  # 0 and 0.0 alike
    assert await calls(simulator) == 9


async def test_mode_always_caches_everything(gateways, http, simulator):
    (gw,) = await gateways(cache={"mode": "always"})
    assert (await post(http, gw, body(temperature=0.9))).cache == "MISS"
    hit = await post(http, gw, body(temperature=0.9))
    assert hit.cache == "HIT" and hit.status == 200
    assert (await post(http, gw, body())).cache == "MISS"  # another body, another key
    assert (await post(http, gw, body(stream=True))).cache == "HIT"
    assert await calls(simulator) == 2


async def test_mode_off_never_caches(gateways, http, simulator):
    (gw,) = await gateways(cache={"mode": "off"})
    for payload in (body(seed=1), body(seed=1), body(temperature=0), body(temperature=0)):
        answer = await post(http, gw, payload)
        assert answer.status == 200 and answer.cache == "BYPASS"
    assert await calls(simulator) == 4


async def test_a_team_overrides_the_global_mode(gateways, http, simulator):
    teams = {"alpha": {}, "design": {"cache": {"mode": "always"}}, "audit": {"cache": {"mode": "off"}}}
    (gw,) = await gateways(teams=teams, cache={"mode": "deterministic"})
    # design: always, so even without a seed
    assert (await post(http, gw, body(), team="design")).cache == "MISS"
    assert (await post(http, gw, body(), team="design")).cache == "HIT"
    # alpha keeps the global mode
    assert (await post(http, gw, body(), team="alpha")).cache == "BYPASS"
    # audit: off, even with a seed
    assert (await post(http, gw, body(seed=9), team="audit")).cache == "BYPASS"
    assert (await post(http, gw, body(seed=9), team="audit")).cache == "BYPASS"
    assert await calls(simulator) == 4


# ---- what is never stored -----------------------------------------------------------------------


@pytest.mark.parametrize("cut", [2, 5])  # 5: after the stop chunk, only [DONE] missing
async def test_a_cut_off_stream_is_never_cached(gw, http, simulator, cut):
    payload = body(seed=21, stream=True, sim_fault=f"cut_after={cut}")
    for n in (1, 2):
        answer = await post(http, gw, payload)
        assert answer.status == 200 and answer.cache == "MISS"
        assert "[DONE]" not in answer.events  # the client saw the cut
        assert await calls(simulator) == n  # the repeat went upstream again
    # and JSON of the same key finds nothing either
    assert (await post(http, gw, {**payload, "stream": False})).cache == "MISS"


async def test_an_upstream_error_is_never_cached(gw, http, simulator):
    for stream in (False, True):
        payload = body(seed=22, stream=stream, sim_fault="status=500")
        before = await calls(simulator)
        for n in (1, 2):
            answer = await post(http, gw, payload)
            assert answer.status == 500 and answer.cache != "HIT"
            assert_clean_error(answer)
            assert await calls(simulator) == before + n


async def test_an_over_size_entry_is_not_stored(gateways, http, simulator):
    teams = {"alpha": {}, "big": {"cache": {"max_entry_mb": 64}}}
    (gw,) = await gateways(teams=teams, cache={"max_entry_mb": 0.01})  # 10 KiB
    first = await post(http, gw, body(seed=31))
    assert first.status == 200 and first.cache == "MISS"
    assert len(first.images[0]) > 0.01 * 1024 * 1024  # a normal image is over the limit
    second = await post(http, gw, body(seed=31))
    assert second.status == 200 and second.cache == "MISS"
    assert second.images == first.images
    assert await calls(simulator) == 2
    # a team whose own max_entry_mb fits the image does get hits
    assert (await post(http, gw, body(seed=31), team="big")).cache == "MISS"
    assert (await post(http, gw, body(seed=31), team="big")).cache == "HIT"
    assert await calls(simulator) == 3


# ---- accounting ----------------------------------------------------------------------------------


async def test_a_hit_charges_no_tokens_and_records_what_it_saved(gateways, http, simulator):
    (gw,) = await gateways(teams={"alpha": {"quota": {"tokens_per_day": 10_000_000}}})
    miss = await post(http, gw, body(seed=41))
    assert miss.cache == "MISS"
    saved = miss.usage["total_tokens"]
    assert saved > 0 and saved == miss.usage["prompt_tokens"] + miss.usage["completion_tokens"]
    after_miss = await wait_for(lambda: _usage_with(http, gw, requests=1))
    before_metrics = await scrape(http, gw)
    assert metric(before_metrics, "gateway_cache_saved_tokens_total", team="alpha") == 0

    for payload in (body(seed=41), body(seed=41, stream=True)):
        assert (await post(http, gw, payload)).cache == "HIT"
    after_hits = await wait_for(lambda: _usage_with(http, gw, requests=3))

    day, was = after_hits["day"], after_miss["day"]
    assert day["tokens"] == was["tokens"]  # the hits charged no tokens
    assert day["tokens"]["prompt"] + day["tokens"]["completion"] == saved
    assert day["cost_usd"] == was["cost_usd"] > 0
    assert day["quota_tokens"] == was["quota_tokens"]
    assert day["cache_hits"] == 2 and was["cache_hits"] == 0
    assert day["cache_saved_tokens"] == 2 * saved and was["cache_saved_tokens"] == 0
    assert after_hits["month"]["cache_saved_tokens"] == 2 * saved
    assert after_hits["remaining"]["tokens_per_day"] == after_miss["remaining"]["tokens_per_day"]

    samples = await scrape(http, gw)
    assert metric(samples, "gateway_cache_saved_tokens_total", team="alpha") == 2 * saved
    assert metric(samples, "gateway_requests_total", team="alpha", cache="hit") == 2
    assert metric(samples, "gateway_requests_total", team="alpha", cache="miss") == 1
    for kind in ("prompt", "completion", "image"):
        assert metric(samples, "gateway_tokens_total", team="alpha", type=kind) == \
            metric(before_metrics, "gateway_tokens_total", team="alpha", type=kind)
    assert metric(samples, "gateway_cost_usd_total", team="alpha") == \
        metric(before_metrics, "gateway_cost_usd_total", team="alpha")
    assert await calls(simulator) == 1


async def _usage_with(http, gw, *, requests: int) -> dict | None:
    report = await usage_of(http, gw)
    return report if report["day"]["requests"] == requests else None


async def test_a_hit_still_counts_against_requests_per_minute(gateways, http, simulator):
    (gw,) = await gateways(teams={"alpha": {"limits": {"requests_per_minute": 2}}})
    assert (await post(http, gw, body(seed=51))).cache == "MISS"
    hit = await post(http, gw, body(seed=51))
    assert hit.cache == "HIT" and hit.headers["x-ratelimit-remaining-requests"] == "0"
    refused = await post(http, gw, body(seed=51))
    assert refused.status == 429 and refused.error["code"] == "rate_limit_exceeded"
    assert await calls(simulator) == 1


# ---- scope -------------------------------------------------------------------------------------


async def test_team_scope_keeps_entries_within_a_team(gateways, http, simulator):
    (gw,) = await gateways(teams={"alpha": {}, "beta": {}}, cache={"scope": "team"})
    assert (await post(http, gw, body(seed=61), team="alpha")).cache == "MISS"
    assert (await post(http, gw, body(seed=61), team="beta")).cache == "MISS"
    assert (await post(http, gw, body(seed=61, stream=True), team="beta")).cache == "HIT"  # its own
    assert (await post(http, gw, body(seed=61), team="alpha")).cache == "HIT"
    assert await calls(simulator) == 2


async def test_global_scope_shares_entries_across_teams(gateways, http, simulator):
    (gw,) = await gateways(teams={"alpha": {}, "beta": {}}, cache={"scope": "global"})
    a = await post(http, gw, body(seed=62), team="alpha")
    b = await post(http, gw, body(seed=62), team="beta")
    assert (a.cache, b.cache) == ("MISS", "HIT") and b.images == a.images
    assert await calls(simulator) == 1


async def test_a_team_scoped_team_never_reads_a_global_entry(gateways, http, simulator):
    teams = {"alpha": {}, "beta": {"cache": {"scope": "team"}}}
    (gw,) = await gateways(teams=teams, cache={"scope": "global"})
    assert (await post(http, gw, body(seed=63), team="alpha")).cache == "MISS"
    assert (await post(http, gw, body(seed=63), team="beta")).cache == "MISS"
    assert await calls(simulator) == 2


# ---- single-flight ---------------------------------------------------------------------------------


async def test_concurrent_identical_requests_make_one_upstream_call(gateways, http, simulator):
    replicas = await gateways(2)
    payload = body(seed=71, sim_fault="latency_ms=800")
    tasks = [post(http, replicas[i % 2], {**payload, "stream": i % 3 == 0}) for i in range(12)]
    answers = await asyncio.wait_for(asyncio.gather(*tasks), WAIT_S)
    assert all(a.status == 200 for a in answers), [a.raw[:200] for a in answers if a.status != 200]
    assert await calls(simulator) == 1
    assert sorted(a.cache for a in answers) == ["HIT"] * 11 + ["MISS"]
    assert all(a.images == answers[0].images and len(a.images) == 1 for a in answers)


async def test_when_the_leader_fails_the_waiters_do_not_hang(gateways, http, simulator):
    # timeout_s well under WAIT_S: a waiter that sat out the whole request timeout would lead
    # unlocked, and show as extra upstream calls rather than as slowness
    replicas = await gateways(2, upstream={"max_retries": 0, "timeout_s": 30})
    await simulator.script(["status=500"])  # only the first upstream call fails
    payload = body(seed=72, sim_fault="latency_ms=800")
    tasks = [post(http, replicas[i % 2], {**payload, "stream": i % 4 == 1}) for i in range(8)]
    answers = await asyncio.wait_for(asyncio.gather(*tasks), WAIT_S)
    failed = [a for a in answers if a.status != 200]
    for a in failed:
        assert_clean_error(a)
    assert [a.status for a in failed] == [500]  # the leader's client got the upstream error
    ok = [a for a in answers if a.status == 200]
    assert all(a.images == ok[0].images and len(a.images) == 1 and a.finish_reason == "stop" for a in ok)
    # one waiter took over: one more call, and the rest were served its answer
    assert await calls(simulator) == 2
    assert sorted(a.cache for a in ok) == ["HIT"] * 6 + ["MISS"]
    after = await post(http, replicas[0], payload)
    assert after.status == 200 and after.cache == "HIT"


async def assert_the_leader_served_the_waiter_who_stayed(http, simulator, leader, stayer, waiter_gw, payload) -> None:
    """After waiters left: the leader's one call completed uncancelled, the waiter who stayed got
    its answer as a hit, and the entry is stored for the next request."""
    first = await asyncio.wait_for(leader, WAIT_S)
    assert first.status == 200 and first.cache == "MISS"
    stayed = await asyncio.wait_for(stayer, WAIT_S)
    assert stayed.status == 200 and stayed.cache == "HIT" and stayed.images == first.images
    stats = await simulator.stats()
    assert (stats["calls"], stats["completed"], stats["cancelled"]) == (1, 1, 0)
    again = await post(http, waiter_gw, payload)
    assert again.cache == "HIT" and again.images == first.images


async def _inflight(http, gw: RunningGateway) -> float:
    return metric(await scrape(http, gw), "gateway_inflight_requests", team="alpha")


class FlightWatch:
    """Counts a gateway's cache lookups (the ``cache_read`` script) and single-flight lock
    attempts (a SET on ``...:lock``) seen since the watch began.

    A request whose lookup missed joins the flight in the same step as the lookup returns (no
    await in between), so a count of lookups is a count of requests in the flight; a replica's
    poller adds one lock attempt, then one lookup, per round, which ``joined`` leaves out."""

    def __init__(self) -> None:
        self.lookups = self.locks = 0

    @classmethod
    def on(cls, gw: RunningGateway) -> FlightWatch:
        """Watch an in-process gateway's store: a call is counted once it has returned."""
        watch, store = cls(), gw.app[STORE]
        run_script, set_ = store.run_script, store.set

        async def counted_run_script(name, keys, args, **kw):
            result = await run_script(name, keys, args, **kw)
            watch.lookups += name == "cache_read"
            return result

        async def counted_set(key, value, **kw):
            result = await set_(key, value, **kw)
            watch.locks += key.endswith(":lock")
            return result

        store.run_script, store.set = counted_run_script, counted_set
        return watch

    def joined(self, n: int) -> bool:
        """True once ``n`` requests that started after the watch are in the flight."""
        return self.lookups - self.locks >= n


async def test_a_waiters_disconnect_does_not_cancel_the_leader(gateways, http, simulator):
    """Leader on one replica; three waiters on the other (on Redis: the first polls the store
    for its replica, the others wait on it). The first two leave: nothing shared is cancelled."""
    leader_gw, waiter_gw = await gateways(2)
    payload = body(seed=73, sim_fault="latency_ms=2000")
    leader = asyncio.create_task(post(http, leader_gw, payload))
    await simulator.wait_for_stats(lambda s: s["calls"] == 1)
    base = 1 if waiter_gw is leader_gw else 0  # the leader's own request, on memory://
    async with aiohttp.ClientSession() as s1, aiohttp.ClientSession() as s2:
        waiters, watch = [], FlightWatch.on(waiter_gw)
        for session in (s1, s2, http):  # one at a time: the first to join polls for its replica
            waiters.append(asyncio.create_task(post(session, waiter_gw, payload)))
            await wait_for(lambda: watch.joined(len(waiters)))
        assert await _inflight(http, waiter_gw) == base + 3
        for leaving in waiters[:2]:
            leaving.cancel()
            with pytest.raises(asyncio.CancelledError):
                await leaving
    await wait_for(lambda: _is(_inflight(http, waiter_gw), base + 1))  # their handlers are gone
    assert (await simulator.stats())["inflight"]  # ... while the leader's call still runs

    await assert_the_leader_served_the_waiter_who_stayed(http, simulator, leader, waiters[2], waiter_gw, payload)
    assert await calls(simulator) == 1


async def test_when_the_leaders_client_leaves_a_waiter_takes_over(gateways, http, simulator):
    leader_gw, waiter_gw = await gateways(2)
    payload = body(seed=74, sim_fault="latency_ms=1500")
    async with aiohttp.ClientSession() as own:
        leader = asyncio.create_task(post(own, leader_gw, payload))
        await simulator.wait_for_stats(lambda s: s["calls"] == 1)
        waiter = asyncio.create_task(post(http, waiter_gw, payload))
        await wait_for(lambda: _is(_inflight(http, waiter_gw), 2 if waiter_gw is leader_gw else 1))
        leader.cancel()
        with pytest.raises(asyncio.CancelledError):
            await leader
    answer = await asyncio.wait_for(waiter, WAIT_S)
    assert answer.status == 200 and len(answer.images) == 1
    stats = await simulator.wait_for_stats(lambda s: s["cancelled"] == 1 and s["completed"] == 1)
    assert stats["calls"] == 2  # the leader's call was cancelled; the waiter made its own
    assert (await post(http, leader_gw, payload)).cache == "HIT"


async def _is(value, expected) -> bool:
    return (await value) == expected
