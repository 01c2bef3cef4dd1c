"""admit(team, request) -> Admission: per-team rate limits, concurrency leases and quotas, and
those of the account all teams share (``account:``).

The algorithms live only in gateway/lua/ (admit.lua, settle.lua, renew.lua); this module
builds their arguments and turns their answers into headers, errors and metrics. Admission is
one script call for all of a team's limits and the account's (checked, then consumed,
atomically, on Redis' own clock; every limits key shares one hash tag, see ledger.py);
settlement is one more. Per team, the keys and fixed script arguments are built once
(``_Plan``); a refusal by the account names it, and counts as ``account_<limit>``.

Every admission has an id. What admit.lua reserved (tokens, and the priced estimate against
``usd_per_month``) is recorded under it, so a settle trues up exactly that and is idempotent,
and an admission the gateway gave up on (the store answered too late, or the caller was
cancelled while its script was in flight) is released by its id once the store answers
again, even if the late admit runs after the release. ``Admission.release()`` is that release
for an admission the gateway took but will not use (an n-image request refused at a later
admission): as if it never happened, its request in requests_per_minute included. Settles and
releases that fail are kept and retried, never dropped silently.

Leases are short (``store.lease_ttl_s``) and renewed while their request lives by one
background task per replica: every third of the ttl, one renew.lua call per team for all of
that team's live admissions. A dead replica's slots come back within the ttl; a living
request keeps its slot however long it runs.

``metrics`` (optional) needs: ``rejection(team, limit)``, ``store_error(op)``,
``quota_remaining(team, quota, value)`` and ``account_quota_remaining(quota, value)``. Store errors are counted by the store's own
``on_error`` hook when it has one; the limiter counts them only when it does not.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import math
import os
import time
from collections import deque
from datetime import datetime, timezone
from typing import Any, Callable

from gateway.config import Account, Config, Limits, Quota, Team
from gateway.errors import QuotaExceeded, RateLimited, StoreUnavailable
from gateway.limits import ledger
from gateway.store import Store, StoreError
from gateway.usage import Usage, cost_usd, estimate
from gateway.validate import ChatRequest

log = logging.getLogger(__name__)

# How long the 'x' left by a settle or a release stands: longer than any script queued before
# it in a stalled store's sockets can still run late, and than a settle's retries take once
# the store answers again (they run on the next renewal ticks).
MARKER_TTL_S = 600
ACCOUNT = "account_"  # how admit.lua names the account's limits in a refusal
MAX_OWED = 100_000  # settles and releases kept for retry while the store is away; beyond, dropped (logged)


def format_duration(seconds: float) -> str:
    """OpenAI's reset format: "12ms", "1.2s", "6s", "1m30s", "2h0m5s"."""
    return format_ms(max(0, math.ceil(round(seconds * 1000, 6))))  # round first: 13.8 s is 13800 ms


def format_ms(ms: int) -> str:
    """format_duration of a whole number of milliseconds (>= 0)."""
    if ms < 1000:
        return f"{ms}ms"
    h, rest = divmod(ms, 3_600_000)
    m, rest = divmod(rest, 60_000)
    s = f"{rest / 1000:.3f}".rstrip("0").rstrip(".") + "s"
    if h:
        return f"{h}h{m}m{s}"
    return f"{m}m{s}" if m else s


def estimate_tokens(request: ChatRequest) -> int:
    """Tokens reserved before the call: usage.estimate's prompt (text and images) plus the
    completion (max_completion_tokens, else the model's default that covers one image)."""
    return estimate(request).total


def micro_usd(usd: float) -> int:
    """Dollars as the ledger's integer micro-dollars."""
    return round(usd * 1_000_000)


def limit_keys(team: str | None) -> tuple[str, str, str]:
    """(requests bucket, tokens bucket, leases) of a team, or of the account (``None``)."""
    p = ledger.ACCOUNT_PREFIX if team is None else ledger.team_prefix(team)
    return p + "rpm", p + "tpm", p + "leases"


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _arg(v: float | None) -> bytes:
    """A script argument as redis-py would send it ('' for None), encoded once, not per call."""
    return b"" if v is None else str(v).encode()


def _has_limits(lim: Limits, quota: Quota) -> bool:
    return not all(v is None for v in (lim.requests_per_minute, lim.tokens_per_minute, lim.max_concurrent,
                                      quota.tokens_per_day, quota.usd_per_day, quota.usd_per_month))


class _Ids:
    """Admission ids unique across processes and replicas without uuid4's cost per request: a
    random prefix per process (drawn again in a forked child) and a counter."""

    def __init__(self) -> None:
        self._reset()
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        self._prefix, self._count = os.urandom(9).hex() + ":", itertools.count(1)

    def next(self) -> str:
        return f"{self._prefix}{next(self._count):x}"


_ids = _Ids()


class _Plan:
    """What does not change between one team's requests, computed once: its keys and those of
    the account (when it has limits), the fixed script arguments (already bytes, so redis-py
    does not encode them per call) and the header values of the team's limits."""

    __slots__ = ("team", "account", "limited", "admit_keys", "admit_args", "tpm_key", "leases_keys",
                 "settle_args", "rpm", "tpm")

    def __init__(self, team: Team, account: Account | None, lease_ttl_s: float) -> None:
        self.team, self.account = team, account
        scopes = [(team.name, team.limits, team.quota)]
        if account is not None and _has_limits(account.limits, account.quota):
            scopes.append((None, account.limits, account.quota))
        self.limited = any(_has_limits(lim, quota) for _, lim, quota in scopes)
        keys = [(*limit_keys(name), ledger.usage_prefix(name)) for name, _, _ in scopes]
        self.tpm_key = keys[0][1]
        self.leases_keys = tuple(k[2] for k in keys)
        self.admit_keys = tuple(k for scope in keys for k in scope)  # admit.lua and settle.lua KEYS[2..]
        fields = (ledger.QUOTA_TOKENS.encode(), ledger.QUOTA_MICRO.encode())
        ttls = (_arg(ledger.DAY_TTL_S), _arg(ledger.MONTH_TTL_S))
        # admit.lua ARGV[5..]: the arguments after now, tokens, micro-$ and admission id
        self.admit_args = (_arg(math.ceil(lease_ttl_s * 1000)), *ttls, *fields, *(
            _arg(v) for _, lim, q in scopes
            for v in (lim.requests_per_minute, lim.tokens_per_minute, lim.max_concurrent, q.tokens_per_day,
                      _micro_or_none(q.usd_per_day), _micro_or_none(q.usd_per_month))))
        # settle.lua ARGV[9..]
        self.settle_args = (*ttls, *fields, _arg(MARKER_TTL_S * 1000), *(
            _arg(v) for _, lim, _ in scopes for v in (lim.requests_per_minute, lim.tokens_per_minute)))
        lim = team.limits
        self.rpm = None if lim.requests_per_minute is None else str(lim.requests_per_minute)
        self.tpm = None if lim.tokens_per_minute is None else str(lim.tokens_per_minute)

    @property
    def with_account(self) -> bool:
        return len(self.leases_keys) == 2

    def record_key(self, admission_id: str) -> str:
        return f"{ledger.team_prefix(self.team.name)}adm:{admission_id}"

    def settle_keys(self, admission_id: str) -> tuple[str, ...]:
        """settle.lua's KEYS: the admission's record, then admit.lua's keys of every scope."""
        return (self.record_key(admission_id), *self.admit_keys)


def _micro_or_none(usd: float | None) -> int | None:
    return None if usd is None else micro_usd(usd)


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
        await asyncio.shield(self.limiter._settle_call(self, self.limiter._release_args(self.plan, self.id)))


class Limiter:
    """Admission against the shared store; one instance per app, used by every request.
    ``start()`` runs the renewal task (leases, retries); ``close()`` stops it."""

    def __init__(self, store: Store, config: Config, *, on_error: str = "open", metrics: Any = None,
                 clock: Callable[[], float] | None = None, lease_ttl_s: float | None = None) -> None:
        if on_error not in ("open", "closed"):
            raise ValueError(f"store.on_error: must be open or closed, got {on_error!r}")
        self.store, self.config, self.on_error, self.metrics = store, config, on_error, metrics
        self.clock = clock  # injected UNIX time (tests); None: the store's own clock (TIME)
        self.lease_ttl_s = lease_ttl_s or config.store.lease_ttl_s
        self._degraded = False
        self._plans: dict[str, _Plan] = {}
        self._live: dict[_Plan, set[str]] = {}  # the admissions being renewed, by the plan they were admitted on
        self._owed: deque[tuple[str, tuple, tuple]] = deque()  # settle.lua calls to repeat until they answer
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._tick_s = self.lease_ttl_s / 3  # a lease is renewed twice before it could run out

    # ---- admission ----------------------------------------------------------------------------

    def _now_arg(self) -> Any:
        return b"" if self.clock is None else self.clock() * 1000

    def _store_failed(self, op: str, err: StoreError) -> None:
        if self.metrics is not None and getattr(self.store, "on_error", None) is None:
            self.metrics.store_error(op)
        if not self._degraded:
            self._degraded = True
            log.warning("store unavailable (%s): on_error=%s", err, self.on_error)

    def _plan(self, team: Team) -> _Plan:
        plan = self._plans.get(team.name)
        if plan is None or plan.team is not team:  # another config's Team (a reload): its limits may differ
            plan = self._plans[team.name] = _Plan(team, self.config.account, self.lease_ttl_s)
        return plan

    def reconfigure(self, config: Config) -> None:
        """A reloaded config, for the admissions to come; those made already settle by their own
        plans. (The lease ttl, and so the renewal tick, stays: ``store.*`` needs a restart.)"""
        self.config, self.on_error = config, config.store.on_error
        self._plans.clear()

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
                                            (self._now_arg(), tokens, micro, aid, *plan.admit_args), **wait)
        except asyncio.CancelledError:  # the script may run all the same: undo it by its id
            self._release(plan, aid)
            raise
        except StoreError as e:
            self._release(plan, aid)  # it may have run, or run late
            if not getattr(e, "down", True):  # slow, not down: not a case for on_error
                raise StoreUnavailable("The limits store did not answer in time; retry shortly.") from None
            self._store_failed("admit", e)
            if self.on_error == "closed":
                raise StoreUnavailable() from None
            return Admission(self, plan, _ids.next(), **self._local_period())  # unchecked, but settled
        if self._degraded:
            self._degraded = False
            log.info("store available again")
        headers = self._headers(plan, r)
        if not int(r[0]):
            limit = _s(r[1])
            if self.metrics is not None:
                self.metrics.rejection(team.name, limit)
            raise self._refusal(plan, limit, int(r[2]), int(r[3]), tokens, headers)
        adm = Admission(self, plan, aid, date=_s(r[4]), month=_s(r[5]), reserved=tokens,
                        reserved_micro=micro, headers=headers)
        self._live.setdefault(plan, set()).add(aid)
        return adm

    def _local_period(self) -> dict[str, str]:
        date, month = ledger.period(self.clock() if self.clock else time.time())
        return {"date": date, "month": month}

    @staticmethod
    def _headers(plan: _Plan, r: list) -> dict[str, str]:
        """x-ratelimit-* from admit.lua's answer (levels at r[6:10])."""
        h: dict[str, str] = {}
        if plan.rpm is not None:
            h["x-ratelimit-limit-requests"] = plan.rpm
            h["x-ratelimit-remaining-requests"] = str(int(r[6]))
            h["x-ratelimit-reset-requests"] = format_ms(int(r[7]))
        if plan.tpm is not None:
            h["x-ratelimit-limit-tokens"] = plan.tpm
            h["x-ratelimit-remaining-tokens"] = str(int(r[8]))
            h["x-ratelimit-reset-tokens"] = format_ms(int(r[9]))
        return h

    @staticmethod
    def _refusal(plan: _Plan, limit: str, retry_ms: int, now_ms: int, tokens: int,
                 headers: dict[str, str]) -> RateLimited | QuotaExceeded:
        """The 429 of the ``limit`` admit.lua named: the team's, or the account's (``account_...``)."""
        retry_s = retry_ms / 1000
        name = limit.removeprefix(ACCOUNT)
        if name != limit:
            owner, who = plan.account, "the account (shared by all teams)"
        else:
            owner, who = plan.team, f"team '{plan.team.name}'"
        lim, q = owner.limits, owner.quota
        if name in ("tokens_per_day", "usd_per_day", "usd_per_month"):
            resets = datetime.fromtimestamp((now_ms + retry_ms) / 1000, timezone.utc)
            at = resets.replace(microsecond=0).isoformat().replace("+00:00", "Z")
            amount = f"{q.tokens_per_day} tokens" if name == "tokens_per_day" else f"${getattr(q, name):g}"
            msg = f"Quota exceeded for {who}: {name} ({amount}) is used up; it resets at {at}."
            return QuotaExceeded(msg, limit=limit, retry_after_s=retry_s, headers=headers)
        if name == "max_concurrent":
            what = f"max_concurrent ({lim.max_concurrent} requests in flight)"
        elif name == "tokens_per_minute":
            what = f"tokens_per_minute ({lim.tokens_per_minute}; this request reserves {tokens} tokens)"
        else:
            what = f"requests_per_minute ({lim.requests_per_minute})"
        msg = f"Rate limit reached for {who}: {what}. Retry in {format_duration(retry_s)}."
        return RateLimited(msg, limit=limit, retry_after_s=retry_s, headers=headers)

    # ---- settlement and release -----------------------------------------------------------------

    async def _settle(self, adm: Admission, usage: Usage, cached: bool) -> None:
        plan = adm.plan
        charged, micro = (0, 0) if cached else (usage.total, micro_usd(usage.cost_usd))
        args = (self._now_arg(), adm.id, charged, micro, adm.reserved, adm.reserved_micro, adm.date, adm.month,
                *plan.settle_args, *ledger.increments(usage, cached=cached))
        r = await self._settle_call(adm, args)
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

    async def _settle_call(self, adm: Admission, args: tuple) -> list | None:
        """The settle.lua call (a settle or a release) that ends an admission, no longer renewed
        from now on: its answer, or None when the store failed and the call is owed (retried)."""
        live = self._live.get(adm.plan)
        if live is not None:
            live.discard(adm.id)
        keys = adm.plan.settle_keys(adm.id)
        try:
            return await self.store.run_script("settle", keys, args)
        except StoreError as e:
            self._store_failed("settle", e)
            self._owe(keys, args)
            return None

    def _release_args(self, plan: _Plan, admission_id: str) -> tuple:
        """settle.lua's arguments that undo an admission by its id, as if it never happened
        (no charge, no ledger row, its request back in requests_per_minute)."""
        return (self._now_arg(), admission_id, b"", 0, 0, 0, b"", b"", *plan.settle_args)

    def _release(self, plan: _Plan, admission_id: str) -> None:
        """Undo, by its id, an admission the gateway gave up on; done by the renewal task."""
        self._owe(plan.settle_keys(admission_id), self._release_args(plan, admission_id))

    def _owe(self, keys: tuple, args: tuple) -> None:
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
        await self._repay()
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
                    jobs.add(task := loop.create_task(self._renew()))
                    task.add_done_callback(jobs.discard)
                self._wake.clear()
                if self._owed and (repaying is None or repaying.done()):
                    jobs.add(repaying := loop.create_task(self._repay()))
                    repaying.add_done_callback(jobs.discard)
        finally:
            for task in jobs:
                task.cancel()
            await asyncio.gather(*jobs, return_exceptions=True)

    async def _renew(self) -> None:
        """One renew.lua call per team (per plan) with live admissions here: its leases, and
        theirs in the account's."""
        calls = []
        for plan, ids in list(self._live.items()):
            if not ids:
                del self._live[plan]
                continue
            ids_now = tuple(ids)
            calls.append(self.store.run_script(
                "renew", (*plan.leases_keys, *map(plan.record_key, ids_now)),
                (self._now_arg(), math.ceil(self.lease_ttl_s * 1000), len(plan.leases_keys), *ids_now),
                timeout_s=2 * self._tick_s))
        for result in await asyncio.gather(*calls, return_exceptions=True):
            if isinstance(result, StoreError):  # the next tick tries again, well within the ttl
                self._store_failed("renew", result)
            elif isinstance(result, Exception):
                log.error("lease renewal failed", exc_info=result)

    @property
    def owed(self) -> int:
        """Settles and releases waiting for the store to answer."""
        return len(self._owed)

    async def _repay(self) -> None:
        """Run what is owed; what fails stays owed (in place), for the next tick."""
        owed = list(self._owed)
        if not owed:
            return
        results = await asyncio.gather(*(self.store.run_script(*call, timeout_s=2 * self._tick_s) for call in owed),
                                       return_exceptions=True)
        done = set()
        for call, result in zip(owed, results):
            if isinstance(result, StoreError):
                continue
            done.add(id(call))
            if isinstance(result, Exception):  # a bug, not the store: retrying would not help
                log.error("an owed settle failed", exc_info=result)
                self._dropped(1)
        if done:
            self._owed = deque(call for call in self._owed if id(call) not in done)
            log.info("%d owed settle(s) or release(s) done", len(done))
