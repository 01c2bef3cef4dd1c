"""The response cache: what is cacheable, its key, get/put in the store, and single-flight.

An image costs dollars and up to minutes; asked again deterministically, it is already paid
for. The key is a SHA-256 over everything that shapes the output (images by the hash of their
decoded bytes), hash-tagged ``gw:cache:{<hex>}`` so an entry (``...:entry``) and its
single-flight lock (``...:lock``) share one Cluster slot. The cache never fails a request: a
store error (counted by the store) is logged here and treated as a miss. Entries and their
rendering live in ``cache_entry``.

A lookup reads an entry's first ``FIRST_READ_BYTES`` with its length and TTL (script
``cache_read``). A small entry is then whole in memory (a ``CacheEntry``). A bigger one is a
``StoredEntry``: its header and first bytes, the rest read with plain GETRANGEs of
``READ_BYTES``, one range ahead, while ``hit_body`` writes the answer, each range
base64-encoded, written, then dropped. So answering a 2K image holds a few ranges, never the
whole entry or its base64 (nor the Redis client's buffer of a whole-entry reply). After each
range the entry is checked to still start with the same bytes (its random id), so a hit never
splices another put's bytes into an answer; an entry with under ``GRACE_S`` to live is read
whole at lookup, so its TTL cannot end a hit midway.

The handler's sequence::

    decision = decide(team, request, cache_control)
    hit = await cache.get(decision)                     # None unless decision.lookup
    if hit: serve it                                    # x-cache: HIT, age: hit[1]
    async with cache.single_flight(decision, upstream_timeout_s) as flight:
        if flight.entry: serve it as a hit              # age: flight.age_s
        else: call upstream, relay, build the entry or None;
              await flight.publish(entry)               # stores it, wakes the waiters

    serving a hit: size, pieces = hit_body(entry, ...); write every piece;
                   HitReadError from pieces: the entry could not be read to its end
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import re
import secrets
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import Any, AsyncIterator, Callable, Iterator

import orjson
import pybase64

from .cache_entry import SLICE_BYTES, CacheEntry, EntryFormatError, Plan, fill, json_plan, sse_plan
# re-exported, so the handler needs one import:
from .cache_entry import SSECollector, entry_from_json, render_json, render_json_chunks, render_sse  # noqa: F401
from .config import Team
from .errors import StoreUnavailable
from .store import Store, StoreError
from .validate import ChatRequest, ImageFact

log = logging.getLogger(__name__)

NOT_IN_KEY = frozenset({"stream", "stream_options", "user"})  # change the framing, not the answer
IMAGE_PART_TYPES = frozenset({"image", "image_url"})  # provider and OpenAI shapes of one image
_DIRECTIVE = re.compile(r'([!#$%&\'*+.^_`|~0-9A-Za-z-]+)(?:\s*=\s*(?:"(?:[^"\\]|\\.)*"|[^,\s]*))?')
_POLL_FIRST_S, _POLL_MAX_S = 0.05, 1.0  # a remote leader's entry is polled with this backoff
READ_BYTES = SLICE_BYTES  # raw bytes per read of an entry (a multiple of 3: whole base64 groups)
FIRST_READ_BYTES = 64 * 1024  # through the script (with length and TTL): small, as Lua hashes it
CHECK_BYTES = 64  # an entry's first bytes (magic, its random id, stored_at) that each later read checks
GRACE_S = 60.0  # an entry with less than this to live is read whole at lookup


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
    names = directives(cache_control)
    if "no-store" in names or not _cacheable(team.cache.mode, request.body):
        return BYPASS
    try:
        key = cache_key(team, request)
    except (ValueError, TypeError) as e:  # facts and parts disagree, or an unencodable body
        log.warning("request not cacheable: %s", e)
        return BYPASS
    return CacheDecision(key, lookup="no-cache" not in names, store=True, label="miss",
                         ttl_s=team.cache.ttl_s, max_entry_bytes=team.cache.max_entry_bytes)


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


class Flight:
    """One request's place in a single-flight: serve ``entry`` (``age_s``), or lead.

    A leader calls upstream and then ``publish``es what it got, None included.
    """

    __slots__ = ("entry", "age_s", "leader", "_cache", "_decision", "_future")

    def __init__(self, *, entry: CacheEntry | None = None, age_s: int = 0, cache: "Cache | None" = None,
                 decision: CacheDecision | None = None, future: asyncio.Future | None = None) -> None:
        self.entry, self.age_s, self.leader = entry, age_s, entry is None
        self._cache, self._decision, self._future = cache, decision, future

    async def publish(self, entry: CacheEntry | None) -> bool:
        """Hand the entry to this process's waiters, then store it; True when stored.

        None (failure, nothing cacheable) lets a waiter lead instead. The store write comes
        before the lock is released, so other replicas' waiters find the entry.
        """
        if entry is None or self._cache is None or self._decision is None:
            return False
        if self._future is not None and not self._future.done():
            self._future.set_result((entry, 0))
        return await self._cache.put(self._decision, entry)


class HitReadError(StoreUnavailable):
    """A hit's entry could not be read to its end: the store failed, or the entry expired or
    was replaced since the hit started. Raised by ``hit_body``'s pieces once the answer has
    begun, so the handler can only end it (an SSE error event, or a cut-off JSON body)."""

    def __init__(self, reason: str) -> None:
        super().__init__("The cached answer could not be read to its end; retry the request.")
        self.reason = reason

    def __str__(self) -> str:
        return self.reason


async def _read_range(store: Store, key: str, start: int, stop: int, check: bytes) -> bytes:
    """Bytes ``[start, stop)`` of the entry at ``key``, if it still starts with ``check`` (its
    random id) once they are read: so no answer ever splices two entries together. Two plain
    GETRANGEs, no script (see ``Store.get_range``); a hit reads one range ahead, which hides
    the second round trip."""
    try:
        data = await store.get_range(key, start, stop - 1)
        same = await store.get_range(key, 0, len(check) - 1) == check
    except StoreError as e:
        raise HitReadError(str(e)) from None
    if not same or len(data) != stop - start:
        raise HitReadError("the entry expired or was replaced while it was being read")
    return data


def _discard(task: asyncio.Future) -> None:
    """Cancel a read nobody will use; its outcome is retrieved, so none is reported as lost."""
    task.cancel()
    task.add_done_callback(lambda t: t.cancelled() or t.exception())


class StoredEntry:
    """A hit on an entry bigger than one read: its header (``entry``, images as StoredImage)
    and first bytes in memory; the rest stays in the store until ``hit_body`` streams it.

    Read-only, so one instance serves every waiter of a flight (each reads its own ranges).
    The entry's fields are readable here as on a CacheEntry.
    """

    __slots__ = ("entry", "_first", "_size", "_store", "_key", "_check")

    def __init__(self, entry: CacheEntry, first: bytes, size: int, store: Store, key: str, check: bytes) -> None:
        self.entry, self._first, self._size = entry, first, size
        self._store, self._key, self._check = store, key, check

    model = property(lambda self: self.entry.model)
    content = property(lambda self: self.entry.content)
    reasoning_content = property(lambda self: self.entry.reasoning_content)
    images = property(lambda self: self.entry.images)
    usage = property(lambda self: self.entry.usage)
    created = property(lambda self: self.entry.created)
    stored_at = property(lambda self: self.entry.stored_at)

    async def load(self) -> CacheEntry:
        """The whole entry in memory (one buffer of its size); HitReadError when it cannot be."""
        buf = bytearray(self._size)
        buf[:len(self._first)] = self._first
        for start in range(len(self._first), self._size, READ_BYTES):
            stop = min(self._size, start + READ_BYTES)
            buf[start:stop] = await _read_range(self._store, self._key, start, stop, self._check)
        return CacheEntry.decode(buf)

    def _ranges(self) -> list[tuple[int, int]]:
        """Every image's bytes as ranges of the entry, in order; each a whole number of 3-byte
        groups but an image's last, so their base64 pieces join into one valid string."""
        have, ranges = len(self._first), []
        for image in self.entry.images:
            pos, end = image.offset, image.offset + image.size
            if pos < have:  # the image starts within the first read
                cut = end if end <= have else pos + (have - pos) // 3 * 3
                if cut > pos:
                    ranges.append((pos, cut))
                    pos = cut
            for start in range(pos, end, READ_BYTES):
                ranges.append((start, min(end, start + READ_BYTES)))
        return ranges

    async def fill(self, plan: Plan) -> AsyncIterator[bytes]:
        """A plan's pieces, the base64 of the images read range by range, one range ahead: the
        store reads the next range while this one is encoded and written."""
        have, all_ranges = len(self._first), self._ranges()
        ranges = iter(all_ranges)
        reads = iter([r for r in all_ranges if r[1] > have])  # those not in the first read

        def read_next() -> asyncio.Future | None:
            r = next(reads, None)
            return None if r is None else asyncio.ensure_future(
                _read_range(self._store, self._key, r[0], r[1], self._check))

        ahead = read_next()  # in flight while the first pieces are written
        try:
            for item in plan:
                if type(item) is not int:
                    yield item
                    continue
                image = self.entry.images[item]
                pos, end = image.offset, image.offset + image.size
                while pos < end:
                    start, pos = next(ranges)
                    if pos <= have:
                        piece = pybase64.b64encode(memoryview(self._first)[start:pos])
                    else:
                        task, ahead = ahead, None
                        data = await task
                        ahead = read_next()
                        piece = pybase64.b64encode(data)
                        del data  # only the base64 lives on while it is written
                    yield piece
        finally:
            if ahead is not None:
                _discard(ahead)


def hit_body(entry: "CacheEntry | StoredEntry", *, stream: bool, include_usage: bool = False,
             request_id: str) -> tuple[int | None, AsyncIterator[bytes]]:
    """A hit's answer: (Content-Length, or None for the SSE stream; its pieces, to write in order).

    The pieces of a StoredEntry raise HitReadError when the entry cannot be read to its end.
    """
    head = entry.entry if isinstance(entry, StoredEntry) else entry
    if stream:
        size, plan = None, sse_plan(head, include_usage, request_id)
    else:
        size, plan = json_plan(head, request_id)
    if isinstance(entry, StoredEntry):
        return size, entry.fill(plan)
    return size, _pieces(fill(plan, entry.images))


async def _pieces(pieces: Iterator[bytes]) -> AsyncIterator[bytes]:
    for piece in pieces:
        yield piece


class Cache:
    """Entries in the store, and single-flight for identical requests in flight.

    Store errors are counted by the store itself; here they are logged and become misses.
    """

    def __init__(self, store: Store, *, clock: Callable[[], float] = time.time) -> None:
        self._store, self._clock = store, clock
        # key -> future of (entry, age_s), or of None when the flight failed
        self._flights: dict[str, asyncio.Future] = {}

    async def get(self, decision: CacheDecision) -> tuple[CacheEntry, int] | None:
        """The entry and its age in whole seconds, or None (no lookup, a miss, a store error)."""
        if decision.key is None or not decision.lookup:
            return None
        return await self._read(decision.key)

    async def _read(self, key: str) -> tuple["CacheEntry | StoredEntry", int] | None:
        try:
            entry = await self._open(key + ":entry")
        except (StoreError, EntryFormatError, HitReadError) as e:
            log.warning("cache read failed, treated as a miss: %s", e)
            return None
        return None if entry is None else (entry, max(0, int(self._clock() - entry.stored_at)))

    async def _open(self, key: str) -> "CacheEntry | StoredEntry | None":
        """The entry at ``key`` from its first read: whole when it fits, else a StoredEntry."""
        got = await self._store.run_script("cache_read", [key], [0, FIRST_READ_BYTES - 1, b""])
        if not got:
            return None
        first, size, ttl_ms = bytes(got[0]), int(got[1]), int(got[2])
        head_end = CacheEntry.head_size(first)
        check = first[:min(CHECK_BYTES, head_end)]
        if len(first) < head_end <= size:  # a header longer than one read: a very long text
            first += await _read_range(self._store, key, len(first), head_end, check)
        entry, whole = CacheEntry.read_head(first)
        if whole != size:
            raise EntryFormatError("image lengths do not match the entry size")
        if size <= len(first):
            return CacheEntry.decode(first)
        stored = StoredEntry(entry, first, size, self._store, key, check)
        if size <= READ_BYTES:  # one more read makes it whole: no range streaming for it
            return await stored.load()
        if 0 <= ttl_ms < GRACE_S * 1000:  # it could expire while a hit streams it: take it now
            return await stored.load()
        return stored

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

    @asynccontextmanager
    async def single_flight(self, decision: CacheDecision, timeout_s: float) -> AsyncIterator[Flight]:
        """One upstream call for identical in-flight requests, in this process and across replicas.

        In a process, waiters share one future. The first request of a process also takes the
        store lock (TTL ``timeout_s``), or, while another replica holds it, polls the store for
        that replica's entry on behalf of its process. A leader that fails or leaves releases
        both, and one waiter leads in its place. A waiter still without an answer after
        ``timeout_s`` leads too (unlocked), so none waits longer. Cancelling a waiter touches
        nothing shared. After a store error a request leads unlocked. Requests that skip the
        lookup (no-cache) or are not cacheable lead at once, without coordination.
        """
        key = decision.key
        if key is None or not decision.lookup:
            yield Flight(cache=self, decision=decision)
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        joined = await self._join_local(decision, deadline)
        if joined is not None:
            yield joined
            return
        future = loop.create_future()
        self._flights[key] = future
        token: str | None = None
        try:
            entry, token = await self._join_store(key, deadline, timeout_s)
            if entry is not None:
                future.set_result(entry)
                yield Flight(entry=entry[0], age_s=entry[1])
            else:
                yield Flight(cache=self, decision=decision, future=future)
        finally:
            try:
                if token is not None:
                    await asyncio.shield(self._unlock(key, token))
            finally:  # waiters wake after the lock is gone, so one of them can take it
                if self._flights.get(key) is future:
                    del self._flights[key]
                if not future.done():
                    future.set_result(None)

    async def _join_local(self, decision: CacheDecision, deadline: float) -> Flight | None:
        """Wait for this process's flight on the key; None when there is none (any more)."""
        while (future := self._flights.get(decision.key)) is not None:
            # shield: our cancellation or timeout must not cancel the shared future. Not
            # wait_for: on 3.11 it swallows our cancellation when the future finishes at the
            # same moment, and a waiter whose client left would go on (and even lead).
            try:
                async with asyncio.timeout_at(deadline):
                    result = await asyncio.shield(future)
            except TimeoutError:
                log.warning("single-flight wait timed out; calling upstream without the lock")
                return Flight(cache=self, decision=decision)
            if result is not None:
                return Flight(entry=result[0], age_s=result[1])
        return None

    async def _join_store(self, key: str, deadline: float,
                          lock_ttl_s: float) -> tuple[tuple[CacheEntry, int] | None, str | None]:
        """(entry, None) when another replica produced it; (None, token) to lead with the lock;
        (None, None) to lead without it (store error, or the deadline passed)."""
        loop = asyncio.get_running_loop()
        token, delay = secrets.token_hex(16), _POLL_FIRST_S
        while True:
            try:
                locked = await self._store.set(key + ":lock", token.encode(), ttl_s=lock_ttl_s,
                                               only_if_absent=True)
            except StoreError as e:
                log.warning("cache lock failed, leading without it: %s", e)
                return None, None
            hit = await self._read(key)  # also when locked: the last leader may just have finished
            if hit is not None:
                if locked:
                    await self._unlock(key, token)
                return hit, None
            if locked:
                return None, token
            remaining = deadline - loop.time()
            if remaining <= 0:
                log.warning("single-flight wait timed out; calling upstream without the lock")
                return None, None
            await asyncio.sleep(min(remaining, delay * random.uniform(0.5, 1.0)))
            delay = min(delay * 2, _POLL_MAX_S)

    async def _unlock(self, key: str, token: str) -> None:
        try:
            await self._store.run_script("cache_unlock", [key + ":lock"], [token])
        except StoreError as e:
            log.warning("cache unlock failed, the lock's TTL ends it: %s", e)
