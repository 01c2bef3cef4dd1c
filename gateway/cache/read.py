"""Reading a cache hit out of the store, range by range, while its answer is written.

A lookup reads an entry's first ``FIRST_READ_BYTES`` with its length and TTL (script
``cache_read``). A small entry is then whole in memory (a ``CacheEntry``). A bigger one is a
``StoredEntry``: its header and first bytes, the rest read with plain GETRANGEs of
``READ_BYTES``, one range ahead, while ``hit_body`` writes the answer, each range
base64-encoded, written, then dropped. So answering a 2K image holds a few ranges, never the
whole entry or its base64 (nor the Redis client's buffer of a whole-entry reply). After each
range the entry is checked to still start with the same bytes (its random id), so a hit never
splices another put's bytes into an answer; an entry with under ``GRACE_S`` to live is read
whole at lookup, so its TTL cannot end a hit midway.

Serving a hit: ``size, pieces = hit_body(entry, ...)``; write every piece; HitReadError from
the pieces means the entry could not be read to its end.
"""
from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, AsyncIterator, Iterator, Sequence

import pybase64

from gateway.cache.entry import CacheEntry, EntryFormatError
from gateway.cache.replay import SLICE_BYTES, Plan, fill, json_plan, sse_plan
from gateway.errors import StoreUnavailable
from gateway.store import Store, StoreError

if TYPE_CHECKING:
    from gateway.images.deliver import Links

log = logging.getLogger(__name__)

READ_BYTES = SLICE_BYTES  # raw bytes per read of an entry (a multiple of 3: whole base64 groups)
FIRST_READ_BYTES = 64 * 1024  # through the script (with length and TTL): small, as Lua hashes it
CHECK_BYTES = 64  # an entry's first bytes (magic, its random id, stored_at) that each later read checks
GRACE_S = 60.0  # an entry with less than this to live is read whole at lookup


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
    GETRANGEs in one round trip, no script (see ``Store.get_ranges``), the check after the
    data; a hit reads one range ahead."""
    try:
        data, head = await store.get_ranges(key, ((start, stop - 1), (0, len(check) - 1)))
        same = head == check
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


async def open_entry(store: Store, key: str) -> CacheEntry | StoredEntry | None:
    """The entry at ``key`` from its first read: whole when it fits, else a StoredEntry.

    Raises StoreError, EntryFormatError or HitReadError; the cache treats each as a miss.
    """
    got = await store.run_script("cache_read", [key], [0, FIRST_READ_BYTES - 1, b""])
    if not got:
        return None
    first, size, ttl_ms = bytes(got[0]), int(got[1]), int(got[2])
    head_end = CacheEntry.head_size(first)
    check = first[:min(CHECK_BYTES, head_end)]
    if len(first) < head_end <= size:  # a header longer than one read: a very long text
        first += await _read_range(store, key, len(first), head_end, check)
    entry, whole = CacheEntry.read_head(first)
    if whole != size:
        raise EntryFormatError("image lengths do not match the entry size")
    if size <= len(first):
        return CacheEntry.decode(first)
    stored = StoredEntry(entry, first, size, store, key, check)
    if size <= READ_BYTES:  # one more read makes it whole: no range streaming for it
        return await stored.load()
    if 0 <= ttl_ms < GRACE_S * 1000:  # it could expire while a hit streams it: take it now
        return await stored.load()
    return stored


def hit_body(entry: CacheEntry | StoredEntry, *, stream: bool, include_usage: bool = False,
             request_id: str, urls: Sequence[str | None] = ()) -> tuple[int | None, AsyncIterator[bytes]]:
    """A hit's answer: (Content-Length, or None for the SSE stream; its pieces, to write in order).
    ``urls`` (from ``hit_links``): links that stand for the images, None where one stays inline.

    The pieces of a StoredEntry raise HitReadError when the entry cannot be read to its end.
    """
    head = entry.entry if isinstance(entry, StoredEntry) else entry
    if stream:
        size, plan = None, sse_plan(head, include_usage, request_id, urls)
    else:
        size, plan = json_plan(head, request_id, urls)
    if isinstance(entry, StoredEntry):
        return size, entry.fill(plan)
    return size, _pieces(fill(plan, entry.images))


async def _pieces(pieces: Iterator[bytes]) -> AsyncIterator[bytes]:
    for piece in pieces:
        yield piece


async def hit_links(entry: CacheEntry | StoredEntry, links: "Links") -> tuple[CacheEntry, tuple[str | None, ...]]:
    """A hit answering with links: the entry in memory and a fresh link to each of its images.
    Images are stored by their content, so a hit stores nothing new (it lengthens the stored
    image's life). An image stays inline (None) when the image storage fails or cannot hold its
    type: the answer still goes out. HitReadError when the entry cannot be read."""
    if isinstance(entry, StoredEntry):
        entry = await entry.load()
    urls: list[str | None] = []
    for image in entry.images:
        try:
            urls.append(await links.link(image.data, image.mime))
        except (StoreError, ValueError) as e:  # ValueError: a type links do not serve
            log.warning("cached image kept inline: %s", e)
            urls.append(None)
    return entry, tuple(urls)
