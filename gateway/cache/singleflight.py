"""Single-flight: one upstream call for identical cacheable requests in flight.

Within a process, waiters share one future. Across replicas, the first request of each
process takes the store lock ``gw:cache:{<hex>}:lock``, hash-tagged like its entry
(``...:entry``) so both share one Cluster slot; the other replicas poll the store for the
leader's entry. A store error makes a request lead unlocked: single-flight never fails one.
"""
from __future__ import annotations

import asyncio
import logging
import random
import secrets
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, AsyncIterator, Awaitable, Callable

from gateway.cache.entry import CacheEntry
from gateway.store import Store, StoreError

if TYPE_CHECKING:
    from gateway.cache import CacheDecision
    from gateway.cache.read import StoredEntry

    Hit = tuple[CacheEntry | StoredEntry, int]  # an entry and its age in whole seconds

log = logging.getLogger("gateway.cache")  # the cache's logger, as before the split: logs name it

_POLL_FIRST_S, _POLL_MAX_S = 0.05, 1.0  # a remote leader's entry is polled with this backoff


class Flight:
    """One request's place in a single-flight: serve ``entry`` (``age_s``), or lead.

    A leader calls upstream and then ``publish``es what it got, None included.
    """

    __slots__ = ("entry", "age_s", "leader", "_put", "_decision", "_future")

    def __init__(self, *, entry: CacheEntry | StoredEntry | None = None, age_s: int = 0,
                 put: Callable[[CacheDecision, CacheEntry], Awaitable[bool]] | None = None,
                 decision: CacheDecision | None = None, future: asyncio.Future | None = None) -> None:
        self.entry, self.age_s, self.leader = entry, age_s, entry is None
        self._put, self._decision, self._future = put, decision, future

    async def publish(self, entry: CacheEntry | None) -> bool:
        """Hand the entry to this process's waiters, then store it; True when stored.

        None (failure, nothing cacheable) lets a waiter lead instead. The store write comes
        before the lock is released, so other replicas' waiters find the entry.
        """
        if entry is None or self._put is None or self._decision is None:
            return False
        if self._future is not None and not self._future.done():
            self._future.set_result((entry, 0))
        return await self._put(self._decision, entry)


class SingleFlight:
    """The flights of one Cache: ``read`` looks an entry up by base key, ``put`` stores one."""

    def __init__(self, store: Store, read: Callable[[str], Awaitable[Hit | None]],
                 put: Callable[[CacheDecision, CacheEntry], Awaitable[bool]]) -> None:
        self._store, self._read, self._put = store, read, put
        # key -> future of (entry, age_s), or of None when the flight failed
        self._flights: dict[str, asyncio.Future] = {}

    @asynccontextmanager
    async def join(self, decision: CacheDecision, timeout_s: float) -> AsyncIterator[Flight]:
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
            yield Flight(put=self._put, decision=decision)
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
                yield Flight(put=self._put, decision=decision, future=future)
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
                return Flight(put=self._put, decision=decision)
            if result is not None:
                return Flight(entry=result[0], age_s=result[1])
        return None

    async def _join_store(self, key: str, deadline: float,
                          lock_ttl_s: float) -> tuple[Hit | None, str | None]:
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
