"""The response cache: what is cacheable, its key, and get/put of entries in the store.

An image costs dollars and up to minutes; asked again deterministically, it is already paid
for. The key is a SHA-256 over everything that shapes the output (images by the hash of their
decoded bytes), hash-tagged ``gw:cache:{<hex>}`` so an entry (``...:entry``) and its
single-flight lock (``...:lock``) share one Cluster slot. The cache never fails a request: a
store error (counted by the store) is logged here and treated as a miss. Entries and their
rendering live in ``entry``, reading a hit range by range in ``read``, and
single-flight in ``singleflight``; their public names are re-exported here, so the handler
needs one import.

The handler's sequence::

    decision = await decide_async(team, request, cache_control)
    hit = await cache.get(decision)                     # None unless decision.lookup
    if hit: serve it                                    # x-cache: HIT, age: hit[1]
    async with cache.single_flight(decision, seconds_left) as flight:  # to the request's deadline
        if flight.entry: serve it as a hit              # age: flight.age_s
        else: call upstream, relay, build the entry or None;
              await flight.publish(entry)               # stores it, wakes the waiters

    serving a hit: size, pieces = hit_body(entry, ...); write every piece;
                   HitReadError from pieces: the entry could not be read to its end
"""
from __future__ import annotations

import hashlib
import logging
import re
import time
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator

import orjson

from gateway import offload
from gateway.cache.entry import CacheEntry, EntryFormatError
# SSECollector, entry_from_answer and hit_body are re-exported: the handler needs one import.
from gateway.cache.entry import SSECollector, entry_from_answer  # noqa: F401
from gateway.cache.read import HitReadError, StoredEntry, hit_body, hit_links, open_entry  # noqa: F401
from gateway.config import Team
from gateway.cache.singleflight import Flight, SingleFlight
from gateway.store import Store, StoreError
from gateway.validate import ChatRequest, ImageFact

log = logging.getLogger(__name__)

NOT_IN_KEY = frozenset({"stream", "stream_options", "user"})  # change the framing, not the answer
IMAGE_PART_TYPES = frozenset({"image", "image_url"})  # provider and OpenAI shapes of one image
# Images larger in all are hashed in a thread: below offload.OFFLOAD_BYTES because hashlib hands
# the GIL back while it works, so the thread runs beside the loop (256 KiB is ~0.2 ms of SHA-256).
INLINE_HASH_BYTES = 256 * 1024
_DIRECTIVE = re.compile(r'([!#$%&\'*+.^_`|~0-9A-Za-z-]+)(?:\s*=\s*(?:"(?:[^"\\]|\\.)*"|[^,\s]*))?')


@dataclass(frozen=True, slots=True)
class CacheDecision:
    key: str | None  # "gw:cache:{<hex>}", base of the entry and lock keys; None: not cacheable
    lookup: bool
    store: bool
    label: str  # "miss" or "bypass"; the handler says "hit" when it serves an entry
    ttl_s: float = 0  # the team's cache settings, for put()
    max_entry_bytes: int = 0


BYPASS = CacheDecision(None, False, False, "bypass")


def directives(cache_control: str | None) -> set[str]:
    """Cache-Control directive names, lower-cased; values (quoted ones too) are skipped."""
    return {m.group(1).lower() for m in _DIRECTIVE.finditer(cache_control or "")}


def _cacheable(mode: str, body: dict[str, Any]) -> bool:
    if mode == "always":
        return True
    temperature = body.get("temperature")
    return mode == "deterministic" and (
        body.get("seed") is not None
        or (type(temperature) in (int, float) and temperature == 0)  # not bool False
    )


def decide(team: Team, request: ChatRequest, cache_control: str | None) -> CacheDecision:
    """Whether this request looks up and/or stores, under which key; never raises."""
    return _decide(team, request, directives(cache_control))


def _decide(team: Team, request: ChatRequest, names: set[str]) -> CacheDecision:
    if "no-store" in names or not _cacheable(team.cache.mode, request.body):
        return BYPASS
    try:
        key = cache_key(team, request)
    except (ValueError, TypeError) as e:  # facts and parts disagree, or an unencodable body
        log.warning("request not cacheable: %s", e)
        return BYPASS
    return CacheDecision(key, lookup="no-cache" not in names, store=True, label="miss",
                         ttl_s=team.cache.ttl_s, max_entry_bytes=team.cache.max_entry_bytes)


async def decide_async(team: Team, request: ChatRequest, cache_control: str | None) -> CacheDecision:
    """``decide``, with a cacheable request's images hashed first, off the event loop when big
    (SHA-256 of 45 MB of images is ~40 ms of CPU; hashlib hands the GIL back while it works)."""
    names = directives(cache_control)
    if "no-store" not in names and _cacheable(team.cache.mode, request.body):
        unhashed = [fact for fact in request.images if not fact.digest]
        await offload.run(lambda: [fact.sha256 for fact in unhashed], size=sum(fact.size for fact in unhashed),
                          threshold=INLINE_HASH_BYTES)
    return _decide(team, request, names)


def nth(decision: CacheDecision, i: int) -> CacheDecision:
    """The decision for answer ``i`` of several to one request (the Images API's ``n``): answer 0
    has the request's own key, each other one a key of its own, so ``n`` images are ``n``
    entries (and ``n`` flights), never one image repeated."""
    if decision.key is None or i == 0:
        return decision
    digest = hashlib.sha256(f"{decision.key}#{i}".encode()).hexdigest()
    return replace(decision, key=f"gw:cache:{{{digest}}}")


def cache_key(team: Team, request: ChatRequest) -> str:
    """The store key: SHA-256 over the canonical body, namespaced by team unless scope is global.

    Every body field is in except NOT_IN_KEY. Image parts (``image`` or ``image_url``) become
    ``{"image_sha256": ...}``: base64 wrapping, part shape and ``detail`` do not count (the
    provider's ``image`` parts have no ``detail`` and the model has no such setting).
    """
    images = iter(request.images)
    body = {k: v for k, v in request.body.items() if k not in NOT_IN_KEY}
    body["messages"] = [_message(m, images) for m in request.body.get("messages") or ()]
    if next(images, None) is not None:
        raise ValueError("more image facts than image parts")
    scope = ["global"] if team.cache.scope == "global" else ["team", team.name]
    canonical = orjson.dumps({"v": 1, "scope": scope, "body": _numbers(body)}, option=orjson.OPT_SORT_KEYS)
    return f"gw:cache:{{{hashlib.sha256(canonical).hexdigest()}}}"


def _numbers(value: Any) -> Any:
    """``value`` with integral floats as ints: ``0.0`` and ``0`` are one JSON number, one key."""
    if type(value) is float:
        return int(value) if value.is_integer() and abs(value) < 2**53 else value  # exact as ints
    if isinstance(value, dict):
        return {k: _numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_numbers(v) for v in value]
    return value


def _message(message: Any, images: Iterator[ImageFact]) -> Any:
    content = message.get("content") if isinstance(message, dict) else None
    if not isinstance(content, list):
        return message
    return {**message, "content": [_part(p, images) for p in content]}


def _part(part: Any, images: Iterator[ImageFact]) -> Any:
    if not (isinstance(part, dict) and part.get("type") in IMAGE_PART_TYPES):
        return part
    fact = next(images, None)
    if fact is None:
        raise ValueError("fewer image facts than image parts")
    return {"image_sha256": fact.sha256}



class Cache:
    """Entries in the store, and single-flight for identical requests in flight.

    Store errors are counted by the store itself; here they are logged and become misses.
    """

    def __init__(self, store: Store, *, clock: Callable[[], float] = time.time) -> None:
        self._store, self._clock = store, clock
        self._flights = SingleFlight(store, read=self._read, put=self.put)

    async def get(self, decision: CacheDecision) -> tuple[CacheEntry, int] | None:
        """The entry and its age in whole seconds, or None (no lookup, a miss, a store error)."""
        if decision.key is None or not decision.lookup:
            return None
        return await self._read(decision.key)

    async def _read(self, key: str) -> tuple["CacheEntry | StoredEntry", int] | None:
        try:
            entry = await open_entry(self._store, key + ":entry")
        except (StoreError, EntryFormatError, HitReadError) as e:
            log.warning("cache read failed, treated as a miss: %s", e)
            return None
        return None if entry is None else (entry, max(0, int(self._clock() - entry.stored_at)))

    async def put(self, decision: CacheDecision, entry: CacheEntry | None, ttl_s: float | None = None,
                  max_entry_bytes: int | None = None) -> bool:
        """Store a complete success; False when not stored (no-store, over-size, store error).

        ``ttl_s`` and ``max_entry_bytes`` default to the team's, carried by the decision.
        """
        if decision.key is None or not decision.store or entry is None:
            return False
        ttl_s = decision.ttl_s if ttl_s is None else ttl_s
        max_entry_bytes = decision.max_entry_bytes if max_entry_bytes is None else max_entry_bytes
        entry = replace(entry, stored_at=self._clock())
        size = entry.encoded_size()
        if size > max_entry_bytes:
            log.info("cache entry not stored: %d bytes, over max_entry_mb (%d bytes)", size, max_entry_bytes)
            return False
        try:
            return bool(await self._store.set(decision.key + ":entry", entry.encode(), ttl_s=ttl_s))
        except StoreError as e:
            log.warning("cache write failed, entry not stored: %s", e)
            return False

    def single_flight(self, decision: CacheDecision, timeout_s: float) -> AbstractAsyncContextManager[Flight]:
        """One upstream call for identical in-flight requests; see ``SingleFlight.join``."""
        return self._flights.join(decision, timeout_s)
