"""gateway.cache: the policy, the key, get/put, single-flight on one and on two replicas, and
big entries read from the store range by range while a hit is written."""
from __future__ import annotations

import asyncio
import os
import re
import time
from dataclasses import replace

import orjson
import pytest

from gateway import store as store_module
from gateway.cache.read import CHECK_BYTES, FIRST_READ_BYTES, GRACE_S, READ_BYTES
from gateway.cache import Cache, CacheDecision, HitReadError, StoredEntry, decide, hit_body
from gateway.cache.entry import CachedImage, CacheEntry
from gateway.config import CacheConfig, ModelConfig, Team
from gateway.store import StoreError
from gateway.validate import ChatRequest, ImageFact
from tests.fixtures.gateway import wait_for

MODEL_ID = "google/gemini-3-pro-image-preview"
MODEL = ModelConfig(id=MODEL_ID, upstream_id=MODEL_ID)
PROMPT = {"role": "user", "content": "an orange cat in an astronaut helmet"}
CAT, DOG = "a" * 64, "b" * 64  # sha256 of two input images
IMAGE = os.urandom(300_001)
ENTRY = CacheEntry(model=MODEL_ID, images=(CachedImage("image/jpeg", IMAGE),), usage={"total_tokens": 9}, created=1)


def team(name: str = "design", **cache) -> Team:
    return Team(name=name, cache=CacheConfig(**cache))


def chat(*, messages=(PROMPT,), images: tuple[str, ...] = (), **fields) -> ChatRequest:
    body = {"model": MODEL_ID, "messages": list(messages), **fields}
    facts = tuple(ImageFact(f"messages[0].content[{i}]", "image/png", 10, sha) for i, sha in enumerate(images))
    return ChatRequest(body=body, raw=orjson.dumps(body), model=MODEL, stream=bool(fields.get("stream")),
                       images=facts, text_chars=0, max_completion_tokens=None)


def key(request: ChatRequest, who: Team | None = None) -> str:
    decision = decide(who or team(mode="always"), request, None)
    assert decision.key is not None
    return decision.key


# ---- policy ---------------------------------------------------------------------------------

CACHED, NO_CACHE, BYPASS = (True, True, "miss"), (False, True, "miss"), (False, False, "bypass")


@pytest.mark.parametrize("mode, fields, cache_control, expected", [
    ("off", {"seed": 1}, None, BYPASS),
    ("off", {"temperature": 0}, None, BYPASS),
    ("deterministic", {}, None, BYPASS),
    ("deterministic", {"temperature": 0.7}, None, BYPASS),
    ("deterministic", {"seed": None}, None, BYPASS),
    ("deterministic", {"seed": 42}, None, CACHED),
    ("deterministic", {"seed": 0}, None, CACHED),
    ("deterministic", {"temperature": 0}, None, CACHED),
    ("deterministic", {"temperature": 0.0}, None, CACHED),
    ("always", {}, None, CACHED),
    ("always", {"temperature": 1.5}, None, CACHED),
    ("deterministic", {"seed": 1}, "no-cache", NO_CACHE),
    ("deterministic", {"seed": 1}, "No-Cache", NO_CACHE),
    ("always", {}, "max-age=0, no-cache", NO_CACHE),
    ("always", {}, "no-store", BYPASS),
    ("always", {}, "NO-STORE", BYPASS),
    ("always", {}, " private ,no-store ", BYPASS),
    ("always", {}, "no-cache, no-store", BYPASS),
    ("always", {}, 'community="x, no-store", max-age=5', CACHED),  # a quoted value is not a directive
    ("always", {}, "no-storex, xno-cache", CACHED),
    ("always", {}, "", CACHED),
])
def test_policy(mode, fields, cache_control, expected):
    decision = decide(team(mode=mode), chat(**fields), cache_control)
    assert (decision.lookup, decision.store, decision.label) == expected
    assert (decision.key is None) == (expected == BYPASS)


def test_policy_follows_the_team_override_and_carries_its_settings():
    request = chat()  # neither seed nor temperature 0
    assert decide(team("a"), request, None).label == "bypass"  # global default: deterministic
    decision = decide(team("b", mode="always", ttl_s=60, max_entry_mb=1), request, None)
    assert (decision.label, decision.ttl_s, decision.max_entry_bytes) == ("miss", 60, 1024 * 1024)


def test_facts_that_disagree_with_the_parts_make_a_request_uncacheable():
    parts = [{"type": "image", "image": "data:image/png;base64,AAAA"}]
    assert decide(team(mode="always"), chat(messages=[{"role": "user", "content": parts}]), None).label == "bypass"
    assert decide(team(mode="always"), chat(images=(CAT,)), None).label == "bypass"


# ---- key ------------------------------------------------------------------------------------


def edit(image_part: dict, images: tuple[str, ...] = (CAT,), **fields) -> ChatRequest:
    content = [{"type": "text", "text": "add sunglasses"}, image_part]
    return chat(messages=[{"role": "user", "content": content}], images=images, **fields)


PROVIDER_PART = {"type": "image", "image": "data:image/png;base64,iVBORw0KGgo="}
OPENAI_PART = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBO\nRw0KGgo=", "detail": "high"}}


def test_key_is_hash_tagged_for_cluster():
    assert re.fullmatch(r"gw:cache:\{[0-9a-f]{64}\}", key(chat()))


def test_same_image_as_image_or_image_url_part_keys_the_same():
    assert key(edit(PROVIDER_PART)) == key(edit(OPENAI_PART))
    assert key(edit({"type": "image_url", "image_url": "data:image/png;base64,x"})) == key(edit(PROVIDER_PART))
    assert key(edit(PROVIDER_PART, images=(DOG,))) != key(edit(PROVIDER_PART))


@pytest.mark.parametrize("fields", [
    {"stream": True}, {"stream": True, "stream_options": {"include_usage": True}}, {"user": "someone"},
])
def test_framing_fields_are_not_in_the_key(fields):
    assert key(chat(seed=1, **fields)) == key(chat(seed=1))


@pytest.mark.parametrize("fields", [
    {"seed": 2}, {"temperature": 0}, {"top_p": 0.5}, {"max_completion_tokens": 100}, {"max_tokens": 100},
    {"stop": ["\n"]}, {"modalities": ["image", "text"]}, {"image_config": {"image_size": "4K"}},
    {"response_format": {"type": "json_object"}}, {"some_new_field": True}, {"model": "other/model"},
])
def test_every_field_that_shapes_the_output_is_in_the_key(fields):
    assert key(chat(**{"seed": 1, **fields})) != key(chat(seed=1))


def test_messages_count_in_order_with_their_roles():
    system = {"role": "system", "content": "be brief"}
    assert key(chat(messages=[system, PROMPT])) != key(chat(messages=[PROMPT, system]))
    assert key(chat(messages=[{**PROMPT, "role": "assistant"}])) != key(chat())


def test_field_order_does_not_matter():
    assert key(chat(seed=1, image_config={"a": 1, "b": 2})) == key(chat(image_config={"b": 2, "a": 1}, seed=1))


def test_scope_team_separates_teams_and_global_shares():
    request = chat(seed=1)
    assert key(request, team("a")) != key(request, team("b"))
    assert key(request, team("a", scope="global")) == key(request, team("b", scope="global"))
    assert key(request, team("a", scope="global")) != key(request, team("a"))


# ---- stores: a dict fake of the Store protocol, and the real memory:// one ------------------


class FakeStore:
    """Store protocol over a dict; TTLs on the monotonic clock; the cache's two scripts
    (``cache_unlock``, ``cache_read``) as Python, to the letter of their Lua."""

    def __init__(self) -> None:
        self.data: dict[str, tuple[bytes, float]] = {}
        self.ttls: dict[str, float] = {}

    def _live(self, key: str) -> bytes | None:
        value, expires = self.data.get(key, (None, 0.0))
        return value if expires > time.monotonic() else None

    async def get(self, key: str) -> bytes | None:
        await asyncio.sleep(0)
        return self._live(key)

    async def set(self, key: str, value: bytes, *, ttl_s: float, only_if_absent: bool = False) -> bool:
        await asyncio.sleep(0)
        if only_if_absent and self._live(key) is not None:
            return False
        self.data[key], self.ttls[key] = (bytes(value), time.monotonic() + ttl_s), ttl_s
        return True

    async def delete(self, key: str) -> None:
        self.data.pop(key, None)

    async def get_range(self, key: str, start: int, end: int) -> bytes:
        await asyncio.sleep(0)
        return (self._live(key) or b"")[start : end + 1]

    async def get_ranges(self, key: str, ranges) -> list[bytes]:
        await asyncio.sleep(0)
        value = self._live(key) or b""
        return [value[start : end + 1] for start, end in ranges]

    async def run_script(self, name, keys, args):
        await asyncio.sleep(0)
        value = self._live(keys[0])
        if name == "cache_read":
            start, last, check = int(args[0]), int(args[1]), bytes(args[2])
            if not value or not value.startswith(check):
                return None
            ttl_ms = int((self.data[keys[0]][1] - time.monotonic()) * 1000)
            return [value[start:last + 1], len(value), ttl_ms]
        assert name == "cache_unlock"
        if value == str(args[0]).encode():
            del self.data[keys[0]]
            return 1
        return 0

    async def ping(self) -> None:
        pass

    async def close(self) -> None:
        pass


class DownStore(FakeStore):
    async def get(self, *args, **kwargs):
        raise StoreError("store down")

    set = delete = run_script = get


@pytest.fixture(params=["fake", "memory"])
async def store(request):
    if request.param == "fake":
        yield FakeStore()
        return
    try:
        real = await store_module.connect("memory://")
    except NotImplementedError:
        pytest.skip("store.connect('memory://') is not implemented yet")
    yield real
    await real.close()


def cacheable(**cache) -> CacheDecision:
    return decide(team(mode="always", **cache), chat(), None)


# ---- get / put ------------------------------------------------------------------------------


async def test_put_then_get_gives_the_entry_back_with_its_age(store):
    now = [1000.0]
    cache = Cache(store, clock=lambda: now[0])
    decision = cacheable()
    assert await cache.get(decision) is None
    assert await cache.put(decision, ENTRY, 60, 10 * 1024 * 1024)
    now[0] += 42.9
    entry, age = await cache.get(decision)
    assert age == 42 and bytes(entry.images[0].data) == IMAGE and entry.usage == ENTRY.usage


async def test_put_defaults_to_the_teams_ttl_and_size_limit():
    store = FakeStore()
    cache = Cache(store)
    assert await cache.put(cacheable(ttl_s=77), ENTRY)
    assert list(store.ttls.values()) == [77]
    assert not await cache.put(cacheable(max_entry_mb=0.1), ENTRY)  # 300 KB image over 100 KB


async def test_no_cache_stores_but_does_not_look_up_and_no_store_does_neither(store):
    cache = Cache(store)
    no_cache = decide(team(mode="always"), chat(), "no-cache")
    assert await cache.put(no_cache, ENTRY)
    assert await cache.get(no_cache) is None
    assert await cache.get(cacheable()) is not None
    no_store = decide(team(mode="always"), chat(seed=5), "no-store")
    assert not await cache.put(no_store, ENTRY)
    assert await cache.get(decide(team(mode="always"), chat(seed=5), None)) is None


async def test_over_size_entries_are_not_stored(store):
    cache = Cache(store)
    assert not await cache.put(cacheable(), ENTRY, 60, len(IMAGE))
    assert await cache.get(cacheable()) is None


async def test_an_unreadable_entry_is_a_miss(store):
    await store.set(cacheable().key + ":entry", b"garbage", ttl_s=60)
    assert await Cache(store).get(cacheable()) is None


async def test_store_errors_never_fail_the_request():
    cache, decision = Cache(DownStore()), cacheable()
    assert await cache.get(decision) is None
    assert not await cache.put(decision, ENTRY)
    async with cache.single_flight(decision, 1) as flight:
        assert flight.leader and flight.entry is None
        assert not await flight.publish(ENTRY)


# ---- single-flight --------------------------------------------------------------------------


class Upstream:
    """Counts calls, and the requests that missed the cache and joined a flight (``handle``);
    fails the first ``failures`` calls; ``gate`` holds every call until set."""

    def __init__(self, failures: int = 0, result: CacheEntry | None = ENTRY) -> None:
        self.calls, self.joined, self.failures, self.result = 0, 0, failures, result
        self.gate = asyncio.Event()
        self.gate.set()

    async def __call__(self) -> CacheEntry | None:
        self.calls += 1
        await self.gate.wait()
        if self.calls <= self.failures:
            raise RuntimeError("upstream failed")
        return self.result


async def handle(cache: Cache, upstream: Upstream, timeout_s: float = 5) -> tuple[str, CacheEntry | None]:
    """What the request handler does: lookup, then single-flight, then lead or serve."""
    decision = cacheable()
    hit = await cache.get(decision)
    if hit is not None:
        return "hit", hit[0]
    upstream.joined += 1  # no await until it waits in the flight, or leads
    async with cache.single_flight(decision, timeout_s) as flight:
        if flight.entry is not None:
            return "waited", flight.entry
        entry = await upstream()
        await flight.publish(entry)
        return "led", entry


async def run_all(*requests):
    """Every request, each in its own task; a hang fails the test instead of stalling it."""
    return await asyncio.wait_for(asyncio.gather(*requests, return_exceptions=True), 20)


async def joined(upstream: Upstream, requests: int, calls: int = 1) -> None:
    """Until ``requests`` missed the cache into the flight and the leader(s) called upstream."""
    await wait_for(lambda: upstream.joined == requests and upstream.calls == calls)


async def all_waiting_then_answer(upstream: Upstream, requests: list[asyncio.Task]) -> list:
    """Hold the upstream until every request waits on the one leader, then let it answer."""
    upstream.gate.clear()
    await joined(upstream, len(requests))
    upstream.gate.set()
    return await run_all(*requests)


def served(results) -> list[bytes]:
    return [bytes(r[1].images[0].data) for r in results if isinstance(r, tuple) and r[1] is not None]


async def test_concurrent_identical_requests_make_one_upstream_call(store):
    cache, upstream = Cache(store), Upstream()
    results = await all_waiting_then_answer(upstream, [asyncio.create_task(handle(cache, upstream)) for _ in range(20)])
    assert upstream.calls == 1
    assert sorted(r[0] for r in results) == ["led"] + ["waited"] * 19
    assert served(results) == [IMAGE] * 20
    again = await handle(cache, upstream)
    assert again[0] == "hit" and bytes(again[1].images[0].data) == IMAGE and upstream.calls == 1


async def test_two_replicas_on_one_store_make_one_upstream_call(store):
    replicas, upstream = [Cache(store), Cache(store)], Upstream()
    requests = [asyncio.create_task(handle(replicas[i % 2], upstream)) for i in range(20)]
    results = await all_waiting_then_answer(upstream, requests)
    assert upstream.calls == 1
    assert served(results) == [IMAGE] * 20


async def test_a_failed_leader_hands_over_to_one_waiter(store):
    cache, upstream = Cache(store), Upstream(failures=1)
    results = await all_waiting_then_answer(upstream, [asyncio.create_task(handle(cache, upstream)) for _ in range(10)])
    assert upstream.calls == 2
    assert sum(isinstance(r, RuntimeError) for r in results) == 1
    assert served(results) == [IMAGE] * 9


async def test_a_failed_leader_on_another_replica_hands_over(store):
    a, b, upstream = Cache(store), Cache(store), Upstream(failures=1)
    upstream.gate.clear()
    leader = asyncio.create_task(handle(a, upstream))
    await joined(upstream, 1)  # it holds the lock
    waiters = [asyncio.create_task(handle(b, upstream)) for _ in range(5)]
    await joined(upstream, 6)
    upstream.gate.set()
    results = await run_all(leader, *waiters)
    assert isinstance(results[0], RuntimeError)
    assert upstream.calls == 2 and served(results) == [IMAGE] * 5


async def test_when_every_attempt_fails_every_request_returns(store):
    cache, upstream = Cache(store), Upstream(result=None)  # the upstream answers with errors
    a, b = Cache(store), Cache(store)
    results = await all_waiting_then_answer(upstream, [asyncio.create_task(handle(c, upstream))
                                                       for c in (cache, cache, a, b, b)])
    assert [r[0] for r in results].count("led") == 5 and upstream.calls == 5


@pytest.mark.parametrize("where", ["same replica", "other replica"])
async def test_a_stuck_leader_does_not_hold_waiters_past_the_timeout(store, where):
    a = Cache(store)
    b = a if where == "same replica" else Cache(store)
    stuck, upstream = Upstream(), Upstream()
    stuck.gate.clear()
    leader = asyncio.create_task(handle(a, stuck))
    await joined(stuck, 1)  # it holds the lock
    results = await run_all(*(handle(b, upstream, timeout_s=0.3) for _ in range(3)))
    assert [r[0] for r in results].count("led") >= 1 and served(results) == [IMAGE] * 3
    leader.cancel()
    await asyncio.gather(leader, return_exceptions=True)


async def test_a_waiters_cancellation_does_not_cancel_the_leader_or_other_waiters(store):
    cache, upstream = Cache(store), Upstream()
    upstream.gate.clear()
    leader = asyncio.create_task(handle(cache, upstream))
    await joined(upstream, 1)
    leaving, staying = (asyncio.create_task(handle(cache, upstream)) for _ in range(2))
    await joined(upstream, 3)
    leaving.cancel()
    await asyncio.wait([leaving])
    upstream.gate.set()
    results = await run_all(leader, staying)
    assert [r[0] for r in results] == ["led", "waited"] and upstream.calls == 1
    assert leaving.cancelled()


async def test_a_leaders_client_leaving_hands_over_to_a_waiter(store):
    cache, upstream = Cache(store), Upstream()
    upstream.gate.clear()
    leader = asyncio.create_task(handle(cache, upstream))
    await joined(upstream, 1)
    waiters = [asyncio.create_task(handle(cache, upstream)) for _ in range(5)]
    await joined(upstream, 6)
    leader.cancel()
    await joined(upstream, 6, calls=2)  # a waiter took over
    upstream.gate.set()
    results = await run_all(*waiters)
    assert upstream.calls == 2 and served(results) == [IMAGE] * 5
    assert sorted(r[0] for r in results) == ["led"] + ["waited"] * 4


async def test_the_lock_is_released_only_while_it_is_still_ours(store):
    cache, decision = Cache(store), cacheable()
    lock = decision.key + ":lock"
    async with cache.single_flight(decision, 5) as flight:
        assert flight.leader and await store.get(lock) is not None
    assert await store.get(lock) is None  # released on exit
    async with cache.single_flight(decision, 5) as flight:
        await store.set(lock, b"someone else", ttl_s=60)  # ours expired and another took it
    assert await store.get(lock) == b"someone else"


async def test_no_cache_requests_lead_at_once_and_their_result_is_stored(store):
    cache, upstream = Cache(store), Upstream()
    upstream.gate.clear()
    pending = asyncio.create_task(handle(cache, upstream))
    await joined(upstream, 1)
    no_cache = decide(team(mode="always"), chat(), "no-cache")
    async with cache.single_flight(no_cache, 5) as flight:  # another flight is running: no wait
        assert flight.leader
        assert await flight.publish(ENTRY)
    assert (await cache.get(cacheable()))[0].images[0].data == IMAGE
    upstream.gate.set()
    await run_all(pending)


# ---- big entries: read in ranges while the hit is written ---------------------------------

BIG = os.urandom(2 * READ_BYTES + 12_345)  # past the first read: two more reads, a short last one
BIG_ENTRY = CacheEntry(model=MODEL_ID, content="here", reasoning_content="hmm", usage={"total_tokens": 9}, created=1,
                       images=(CachedImage("image/jpeg", BIG), CachedImage("image/png", IMAGE[:1001])))


class Reads:
    """Wraps a store: counts the entry reads (the lookup's script, then GETRANGEs of data; the
    64-byte id checks apart), the most in flight at once, and can fail one."""

    def __init__(self, store) -> None:
        self.store, self.sizes, self.checks, self.inflight, self.most = store, [], 0, 0, 0
        self.fail_at: int | None = None  # the index of the read that raises StoreError

    def __getattr__(self, name):
        return getattr(self.store, name)

    async def _counted(self, size: int, read):
        self.sizes.append(size)
        if self.fail_at == len(self.sizes) - 1:
            raise StoreError("store down")
        self.inflight += 1
        self.most = max(self.most, self.inflight)
        try:
            return await read()
        finally:
            self.inflight -= 1

    async def run_script(self, name, keys, args):
        if name != "cache_read":
            return await self.store.run_script(name, keys, args)
        return await self._counted(int(args[1]) - int(args[0]) + 1, lambda: self.store.run_script(name, keys, args))

    async def get_range(self, key, start, end):
        if start == 0 and end == CHECK_BYTES - 1:
            self.checks += 1
            return await self.store.get_range(key, start, end)
        return await self._counted(end - start + 1, lambda: self.store.get_range(key, start, end))

    async def get_ranges(self, key, ranges):
        """Counts each range as get_range would (the id checks apart); a read that fails fails
        the whole round trip."""
        data = [(start, end) for start, end in ranges if not (start == 0 and end == CHECK_BYTES - 1)]
        self.checks += len(ranges) - len(data)
        if not data:
            return await self.store.get_ranges(key, ranges)
        for start, end in data[:-1]:
            self.sizes.append(end - start + 1)
            if self.fail_at == len(self.sizes) - 1:
                raise StoreError("store down")
        start, end = data[-1]
        return await self._counted(end - start + 1, lambda: self.store.get_ranges(key, ranges))


async def body_of(entry, stream: bool = False, include_usage: bool = False) -> tuple[int | None, list[bytes]]:
    size, pieces = hit_body(entry, stream=stream, include_usage=include_usage, request_id="req-1")
    return size, [piece async for piece in pieces]


async def test_a_big_entry_is_read_in_ranges_and_answers_byte_identical(store):
    cache, decision = Cache(store), cacheable()
    assert await cache.put(decision, BIG_ENTRY)
    hit, _ = await cache.get(decision)
    assert isinstance(hit, StoredEntry)  # only its header and first bytes are in memory
    assert (hit.content, hit.usage, len(hit.images)) == ("here", {"total_tokens": 9}, 2)
    whole = await hit.load()
    assert [bytes(i.data) for i in whole.images] == [BIG, IMAGE[:1001]]

    size, pieces = await body_of(hit)
    assert b"".join(pieces) == b"".join((await body_of(whole))[1]) and size == sum(map(len, pieces))
    assert max(map(len, pieces)) <= READ_BYTES // 3 * 4  # one range's base64 at a time
    for include_usage in (False, True):
        size, pieces = await body_of(hit, stream=True, include_usage=include_usage)
        assert size is None
        assert b"".join(pieces) == b"".join((await body_of(whole, stream=True, include_usage=include_usage))[1])


async def test_a_big_hit_reads_one_range_ahead_never_the_whole_entry(store):
    reads = Reads(store)
    cache, decision = Cache(reads), cacheable()
    await cache.put(decision, BIG_ENTRY)
    hit, _ = await cache.get(decision)
    await body_of(hit)
    assert reads.sizes[0] == FIRST_READ_BYTES and max(reads.sizes[1:]) <= READ_BYTES  # the lookup, then ranges
    overlap = sum(reads.sizes) - len(BIG_ENTRY.encode())
    assert 0 <= overlap < CHECK_BYTES  # each byte read once, but for a few re-read at range edges
    assert reads.most == 1 and reads.checks == len(reads.sizes) - 1  # one range ahead, each checked


async def test_an_entry_of_one_range_is_whole_at_lookup(store):
    reads = Reads(store)
    cache = Cache(reads)
    await cache.put(cacheable(), ENTRY)
    hit, _ = await cache.get(cacheable())
    assert isinstance(hit, CacheEntry) and bytes(hit.images[0].data) == IMAGE
    assert reads.sizes[0] == FIRST_READ_BYTES and len(reads.sizes) == 2  # the lookup, then the rest


async def test_an_entry_replaced_mid_hit_ends_the_hit_instead_of_splicing_it(store):
    cache, decision = Cache(store), cacheable()
    await cache.put(decision, BIG_ENTRY)
    hit, _ = await cache.get(decision)
    expected = b"".join((await body_of(await hit.load()))[1])
    _, pieces = hit_body(hit, stream=False, request_id="req-1")
    got = [await anext(pieces), await anext(pieces)]  # the start, and the first read's image bytes
    other = CachedImage("image/jpeg", os.urandom(len(BIG)))  # same sizes: only the id tells them apart
    assert await cache.put(decision, replace(BIG_ENTRY, images=(other, BIG_ENTRY.images[1])))
    with pytest.raises(HitReadError):
        async for piece in pieces:
            got.append(piece)
    assert expected.startswith(b"".join(got))  # what went out is the old entry's, never mixed


async def test_an_entry_gone_mid_hit_ends_the_hit(store):
    cache, decision = Cache(store), cacheable()
    await cache.put(decision, BIG_ENTRY)
    hit, _ = await cache.get(decision)
    _, pieces = hit_body(hit, stream=True, request_id="req-1")
    await anext(pieces)
    await store.delete(decision.key + ":entry")  # expired, or evicted
    with pytest.raises(HitReadError):
        async for _ in pieces:
            pass


async def test_a_store_error_mid_hit_ends_the_hit(store):
    reads = Reads(store)
    cache, decision = Cache(reads), cacheable()
    await cache.put(decision, BIG_ENTRY)
    hit, _ = await cache.get(decision)
    reads.fail_at = 2  # the second range
    with pytest.raises(HitReadError) as e:
        await body_of(hit)
    assert e.value.code == "store_unavailable" and "store down" in str(e.value)


async def test_a_client_leaving_mid_hit_cancels_the_read_ahead(store):
    cache, decision = Cache(store), cacheable()
    await cache.put(decision, BIG_ENTRY)
    hit, _ = await cache.get(decision)
    _, pieces = hit_body(hit, stream=False, request_id="req-1")
    await anext(pieces)  # a read is in flight now
    reads = [t for t in asyncio.all_tasks() if "_read_range" in repr(t.get_coro())]
    assert reads
    await pieces.aclose()
    await asyncio.wait(reads)
    assert all(t.cancelled() for t in reads)


async def test_an_entry_near_its_expiry_is_read_whole_at_lookup(store):
    cache, decision = Cache(store), cacheable()
    await cache.put(decision, BIG_ENTRY, GRACE_S / 2, 64 * 1024 * 1024)
    hit, _ = await cache.get(decision)
    assert isinstance(hit, CacheEntry)  # in memory: expiring now cannot cut its answer short
    await store.delete(decision.key + ":entry")
    _, pieces = await body_of(hit)
    assert b"".join(pieces) == b"".join((await body_of(BIG_ENTRY))[1])  # whole, though the store lost it


async def test_a_header_longer_than_one_read(store):
    cache, decision = Cache(store), cacheable()
    long_text = replace(BIG_ENTRY, content="x" * (READ_BYTES + 999))
    await cache.put(decision, long_text)
    hit, _ = await cache.get(decision)
    assert hit.content == long_text.content
    _, pieces = await body_of(hit)
    doc = orjson.loads(b"".join(pieces))
    assert doc["choices"][0]["message"]["content"] == long_text.content


async def test_a_big_entry_shorter_than_its_header_says_is_a_miss(store):
    cache, decision = Cache(store), cacheable()
    await store.set(decision.key + ":entry", BIG_ENTRY.encode()[:-1], ttl_s=60)
    assert await cache.get(decision) is None


async def test_waiters_on_two_replicas_share_a_big_entry(store):
    replicas, upstream = [Cache(store), Cache(store)], Upstream(result=BIG_ENTRY)
    requests = [asyncio.create_task(handle(replicas[i % 2], upstream)) for i in range(6)]
    results = await all_waiting_then_answer(upstream, requests)
    assert upstream.calls == 1
    bodies = {bytes(b"".join((await body_of(entry))[1])) for _, entry in results}
    assert len(bodies) == 1  # the leader's entry in memory, the others' from the store: same answer
    assert any(isinstance(entry, StoredEntry) for _, entry in results)
