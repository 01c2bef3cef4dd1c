"""admit(team, request) -> Admission: per-team rate limits, concurrency leases and quotas, and
those of the account all teams share (``account:``).

The algorithms live only in gateway/lua/ (admit.lua, settle.lua, renew.lua); this module
builds their calls from a team's plan (plan.py) and turns their answers into headers and
errors (answers.py) and metrics. Admission is one script call for all of a team's limits and
the account's (checked, then consumed, atomically, on Redis' own clock; every limits key
shares one hash tag, see ledger.py); settlement is one more. A refusal by the account names
it, and counts as ``account_<limit>``.

Every admission has an id. What admit.lua reserved (tokens, and the priced estimate against
``usd_per_month``) is recorded under it, so a settle trues up exactly that and is idempotent,
and an admission the gateway gave up on (the store answered too late, or the caller was
cancelled while its script was in flight) is released by its id once the store answers
again, even if the late admit runs after the release. ``Admission.release()`` is that release
for an admission the gateway took but will not use (an n-image request refused at a later
admission): as if it never happened, its request in requests_per_minute included. Lease
renewal and the retries of failed settles and releases are the ``Renewer``'s (leases.py),
which the limiter holds as ``leases``.

``metrics`` (optional) needs: ``rejection(team, limit)``, ``store_error(op)``,
``quota_remaining(team, quota, value)`` and ``account_quota_remaining(quota, value)``. Store errors are counted by the store's own
``on_error`` hook when it has one; the limiter counts them only when it does not.
"""
from __future__ import annotations

import asyncio
import time
from typing import Any, Callable

from gateway.config import Config, Team
from gateway.errors import StoreUnavailable
from gateway.limits import answers, ledger
from gateway.limits.leases import Renewer
from gateway.limits.plan import Plans, _ids, _Plan, micro_usd
from gateway.store import Store, StoreError, as_text
from gateway.usage import Usage, cost_usd, estimate
from gateway.validate import ChatRequest


class Admission:
    """One admitted request: its headers and the one settle() that trues up its reservation (or
    the one release() that undoes it)."""

    __slots__ = ("limiter", "plan", "id", "date", "month", "reserved", "reserved_micro", "headers",
                 "remaining", "_settled")

    def __init__(self, limiter: "Limiter", plan: _Plan, admission_id: str, *, date: str, month: str,
                 reserved: int = 0, reserved_micro: int = 0, headers: dict[str, str] | None = None) -> None:
        self.limiter, self.plan, self.id = limiter, plan, admission_id
        self.date, self.month = date, month  # the UTC period the request belongs to
        self.reserved, self.reserved_micro = reserved, reserved_micro
        self.headers: dict[str, str] = headers or {}  # x-ratelimit-* for the response
        self.remaining: dict[str, Any] | None = None  # quota left after settle
        self._settled = False

    async def settle(self, usage: Usage, *, cached: bool = False) -> None:
        """Exactly once per admitted request: release the lease, true up the reservation, write
        the ledger. Idempotent; never raises a store error (a failed settle is retried later);
        survives the caller being cancelled."""
        if self._settled:
            return
        self._settled = True
        await asyncio.shield(self.limiter._settle(self, usage, cached))

    async def release(self) -> None:
        """Instead of settle(), for an admission nothing ran on (one of an n-image request's,
        when a later one was refused): undo it as if it never happened. Its lease, its token
        and dollar reservations and its request in requests_per_minute come back, in the team's
        and the account's scopes, and the ledger counts nothing. Same guarantees as settle()."""
        if self._settled:
            return
        self._settled = True
        leases = self.limiter.leases
        await asyncio.shield(leases.settle(self.plan, self.id, self.plan.release_args(leases.now_arg(), self.id)))


class Limiter:
    """Admission against the shared store; one instance per app, used by every request.
    ``start()`` runs its ``leases``' renewal task (leases, retries); ``close()`` stops it."""

    def __init__(self, store: Store, config: Config, *, on_error: str = "open", metrics: Any = None,
                 clock: Callable[[], float] | None = None, lease_ttl_s: float | None = None) -> None:
        if on_error not in ("open", "closed"):
            raise ValueError(f"store.on_error: must be open or closed, got {on_error!r}")
        self.store, self.config, self.metrics, self.clock = store, config, metrics, clock
        self.leases = Renewer(store, lease_ttl_s or config.store.lease_ttl_s, on_error=on_error, metrics=metrics,
                              clock=clock)
        self._plans = Plans(config, self.leases.lease_ttl_s)

    def start(self) -> None:
        """Run the renewal task (call from within the running loop)."""
        self.leases.start()

    async def close(self) -> None:
        """Stop the renewal task; make one last attempt at what is still owed."""
        await self.leases.close()

    def _plan(self, team: Team) -> _Plan:
        return self._plans.of(team)

    def reconfigure(self, config: Config) -> None:
        """A reloaded config, for the admissions to come; those made already settle by their own
        plans, and a request of an earlier snapshot is still admitted by its config's. (The lease
        ttl, and so the renewal tick, stays: ``store.*`` needs a restart.)"""
        self.config, self.leases.on_error = config, config.store.on_error
        self._plans.add(config)

    async def admit(self, team: Team, request: ChatRequest, *, deadline: float | None = None) -> Admission:
        """Raise RateLimited, QuotaExceeded, or StoreUnavailable (the store slower than
        ``deadline``, event-loop time; or down with on_error: closed)."""
        plan = self._plan(team)
        if not plan.limited:
            return Admission(self, plan, _ids.next(), **self._local_period())
        usage = estimate(request)
        tokens, micro = usage.total, micro_usd(cost_usd(usage.prompt, usage.completion, usage.image,
                                                        request.model.prices))
        aid = _ids.next()
        wait = {} if deadline is None else {"timeout_s": max(0.0, deadline - asyncio.get_running_loop().time())}
        try:
            r = await self.store.run_script("admit", (plan.record_key(aid), *plan.admit_keys),
                                            (self.leases.now_arg(), tokens, micro, aid, *plan.admit_args), **wait)
        except asyncio.CancelledError:  # the script may run all the same: undo it by its id
            self.leases.release_later(plan, aid)
            raise
        except StoreError as e:
            self.leases.release_later(plan, aid)  # it may have run, or run late
            if not getattr(e, "down", True):  # slow, not down: not a case for on_error
                raise StoreUnavailable("The limits store did not answer in time; retry shortly.") from None
            self.leases.store_failed("admit", e)
            if self.leases.on_error == "closed":
                raise StoreUnavailable() from None
            return Admission(self, plan, _ids.next(), **self._local_period())  # unchecked, but settled
        self.leases.store_answered()
        headers = answers.headers(plan, r)
        if not int(r[0]):
            limit = as_text(r[1])
            if self.metrics is not None:
                self.metrics.rejection(team.name, limit)
            raise answers.refusal(plan, limit, int(r[2]), int(r[3]), tokens, headers)
        self.leases.track(plan, aid)
        return Admission(self, plan, aid, date=as_text(r[4]), month=as_text(r[5]), reserved=tokens,
                         reserved_micro=micro, headers=headers)

    def _local_period(self) -> dict[str, str]:
        date, month = ledger.period(self.clock() if self.clock else time.time())
        return {"date": date, "month": month}

    async def _settle(self, adm: Admission, usage: Usage, cached: bool) -> None:
        plan = adm.plan
        charged, micro = (0, 0) if cached else (usage.total, micro_usd(usage.cost_usd))
        args = (self.leases.now_arg(), adm.id, charged, micro, adm.reserved, adm.reserved_micro, adm.date, adm.month,
                *plan.settle_args, *ledger.increments(usage, cached=cached))
        r = await self.leases.settle(plan, adm.id, args)
        if r is None or not int(r[0]):
            return
        adm.remaining = ledger.remaining(plan.team.quota, int(r[1]), int(r[3]))
        account = ledger.remaining(plan.account.quota, int(r[4]), int(r[6]), int(r[5])) if plan.with_account else {}
        if self.metrics is not None:
            for quota, value in adm.remaining.items():
                if value is not None:
                    self.metrics.quota_remaining(plan.team.name, quota, value)
            for quota, value in account.items():
                if value is not None:
                    self.metrics.account_quota_remaining(quota, value)
