"""The limiter's background work, per replica: renewing the leases of the requests it runs,
and retrying the settles and releases the store did not answer.

Leases are short (``store.lease_ttl_s``) and renewed while their request lives by one task:
every third of the ttl, one renew.lua call per team for all of that team's live admissions
(grouped by the team's lease keys, so the requests of an old config's snapshot still in flight
after a reload share their team's call). A dead replica's slots come back within the ttl; a
living request keeps its slot however long it runs.

Settles and releases that fail are kept (up to ``MAX_OWED``) and retried, never dropped
silently; ``REPAY_BATCH`` at a time, so a store that just came back is not handed them all at
once."""
from __future__ import annotations

import asyncio
import itertools
import logging
import math
from collections import deque
from collections.abc import Callable
from typing import Any

from gateway.limits.plan import _Plan
from gateway.store import Store, StoreError

log = logging.getLogger(__name__)

MAX_OWED = 100_000  # settles and releases kept for retry while the store is away; beyond, dropped (logged)
REPAY_BATCH = 500  # owed scripts in flight at once


class Renewer:
    """The live leases and what is owed to the store, held by the ``Limiter``. ``start()`` runs
    the renewal task; ``close()`` stops it. Store errors go to ``metrics.store_error(op)`` unless
    the store counts them itself (its ``on_error`` hook)."""

    def __init__(self, store: Store, lease_ttl_s: float, *, on_error: str, metrics: Any,
                 clock: Callable[[], float] | None) -> None:
        self.store, self.lease_ttl_s, self.on_error, self.metrics = store, lease_ttl_s, on_error, metrics
        self.clock = clock  # injected UNIX time (tests); None: the store's own clock (TIME)
        self._degraded = False
        # the admissions being renewed, by their team's lease keys, with a plan that names them
        self._live: dict[tuple[str, ...], tuple[_Plan, set[str]]] = {}
        self._owed: deque[tuple[str, tuple, tuple]] = deque()  # settle.lua calls to repeat until they answer
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._tick_s = lease_ttl_s / 3  # a lease is renewed twice before it could run out

    def now_arg(self) -> Any:
        """The scripts' ``now`` argument: the injected clock's ms, or empty for the store's TIME."""
        return b"" if self.clock is None else self.clock() * 1000

    def store_failed(self, op: str, err: StoreError) -> None:
        """Count a store error; warn once per outage."""
        if self.metrics is not None and getattr(self.store, "on_error", None) is None:
            self.metrics.store_error(op)
        if not self._degraded:
            self._degraded = True
            log.warning("store unavailable (%s): on_error=%s", err, self.on_error)

    def store_answered(self) -> None:
        """End the outage ``store_failed`` warned of, if any."""
        if self._degraded:
            self._degraded = False
            log.info("store available again")

    def track(self, plan: _Plan, admission_id: str) -> None:
        """Renew this admission's lease from now on."""
        entry = self._live.get(plan.leases_keys)
        if entry is None:
            entry = self._live[plan.leases_keys] = (plan, set())
        entry[1].add(admission_id)

    # ---- settles and releases ---------------------------------------------------------------------

    async def settle(self, plan: _Plan, admission_id: str, args: tuple) -> list | None:
        """The settle.lua call (a settle or a release) that ends an admission, no longer renewed
        from now on: its answer, or None when the store failed and the call is owed (retried)."""
        entry = self._live.get(plan.leases_keys)
        if entry is not None:
            entry[1].discard(admission_id)
        keys = plan.settle_keys(admission_id)
        try:
            return await self.store.run_script("settle", keys, args)
        except StoreError as e:
            self.store_failed("settle", e)
            self.owe(keys, args)
            return None

    def release_later(self, plan: _Plan, admission_id: str) -> None:
        """Undo, by its id, an admission the gateway gave up on; done by the renewal task."""
        self.owe(plan.settle_keys(admission_id), plan.release_args(self.now_arg(), admission_id))

    def owe(self, keys: tuple, args: tuple) -> None:
        """Keep a settle.lua call to retry until the store answers it; wake the task to try."""
        if len(self._owed) >= MAX_OWED:
            self._dropped(1)
            self._owed.popleft()
        self._owed.append(("settle", keys, args))
        self._wake.set()

    def _dropped(self, n: int) -> None:
        log.error("%d settle(s) or release(s) dropped: the store stayed unavailable; usage is missing from the "
                  "ledger and reservations stay charged", n)
        if self.metrics is not None:
            self.metrics.store_error("settle_dropped")

    @property
    def owed(self) -> int:
        """Settles and releases waiting for the store to answer."""
        return len(self._owed)

    # ---- the renewal task -------------------------------------------------------------------------

    def start(self) -> None:
        """Run the renewal task (call from within the running loop)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="limiter-renewal")

    async def close(self) -> None:
        """Stop the renewal task; make one last attempt at what is still owed."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        await self.repay()
        if self._owed:
            self._dropped(len(self._owed))
            self._owed.clear()

    async def _run(self) -> None:
        """Every tick, renew; and retry what is owed, at once when something new is. Each call
        may wait up to two ticks for a slow store, so renewals overlap rather than wait for one
        another: a lease runs out only if none of them gets through in its ttl."""
        jobs: set[asyncio.Task] = set()
        repaying: asyncio.Task | None = None
        loop = asyncio.get_running_loop()
        next_renewal = loop.time()
        try:
            while True:
                try:
                    async with asyncio.timeout_at(next_renewal):
                        await self._wake.wait()
                except TimeoutError:
                    next_renewal += self._tick_s
                    jobs.add(task := loop.create_task(self.renew()))
                    task.add_done_callback(jobs.discard)
                self._wake.clear()
                if self._owed and (repaying is None or repaying.done()):
                    jobs.add(repaying := loop.create_task(self.repay()))
                    repaying.add_done_callback(jobs.discard)
        finally:
            for task in jobs:
                task.cancel()
            await asyncio.gather(*jobs, return_exceptions=True)

    async def renew(self) -> None:
        """One renew.lua call per team with live admissions here: its leases, and theirs in the
        account's."""
        calls = []
        for keys, (plan, ids) in list(self._live.items()):
            if not ids:
                del self._live[keys]
                continue
            ids_now = tuple(ids)
            calls.append(self.store.run_script(
                "renew", (*keys, *map(plan.record_key, ids_now)),
                (self.now_arg(), math.ceil(self.lease_ttl_s * 1000), len(keys), *ids_now),
                timeout_s=2 * self._tick_s))
        for result in await asyncio.gather(*calls, return_exceptions=True):
            if isinstance(result, StoreError):  # the next tick tries again, well within the ttl
                self.store_failed("renew", result)
            elif isinstance(result, Exception):
                log.error("lease renewal failed", exc_info=result)

    async def repay(self) -> None:
        """Run what is owed, ``REPAY_BATCH`` at a time, oldest first, until the store fails one:
        what failed, and what was not tried, stays owed (in place) for the next tick."""
        while self._owed:
            batch = list(itertools.islice(self._owed, REPAY_BATCH))
            results = await asyncio.gather(
                *(self.store.run_script(*call, timeout_s=2 * self._tick_s) for call in batch), return_exceptions=True)
            done, failed = set(), False
            for call, result in zip(batch, results):
                if isinstance(result, StoreError):
                    failed = True
                    continue
                done.add(id(call))  # the batch holds every call: no id is reused meanwhile
                if isinstance(result, Exception):  # a bug, not the store: retrying would not help
                    log.error("an owed settle failed", exc_info=result)
                    self._dropped(1)
            if not done:
                return
            log.info("%d owed settle(s) or release(s) done", len(done))
            self._forget(done)
            if failed:
                return

    def _forget(self, done: set[int]) -> None:
        """Take the calls done out of the owed, from its head (where a batch comes from);
        empties ``done``."""
        kept = []
        while done and self._owed:
            call = self._owed.popleft()
            if id(call) in done:
                done.discard(id(call))
            else:
                kept.append(call)
        self._owed.extendleft(reversed(kept))
