"""admit(team, request) -> Admission: per-team rate limits, concurrency leases and quotas.

The algorithms live only in gateway/lua/admit.lua and settle.lua; this module builds their
arguments and turns their answers into headers, errors and metrics. Admission is one EVALSHA
for all of a team's limits (checked and consumed atomically, on Redis' own clock), settlement
is one more. A team with no limits and no quota skips admission; its settle still writes the
ledger. On one Redis node the store sends the scripts of requests that reach it in the same
event-loop tick as one pipeline (gateway/store_batch.py), which is what keeps this cheap on the hot
path; per team, the keys and fixed script arguments are built once (``_Plan``).

``metrics`` (optional) needs: ``rejection(team, limit)``, ``store_error(op)`` and
``quota_remaining(team, quota, value)``. Store errors are counted by the store's own
``on_error`` hook when it has one; the limiter counts them only when it does not.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import math
import os
import time
from datetime import datetime, timezone
from typing import Any, Callable, Protocol

from gateway.limits import ledger
from gateway.config import Config, Team
from gateway.errors import QuotaExceeded, RateLimited, StoreUnavailable
from gateway.store import Store, StoreError
from gateway.usage import Usage, estimate
from gateway.validate import ChatRequest

log = logging.getLogger(__name__)

LEASE_MARGIN_S = 5  # a lease outlives the longest request (the upstream timeout) by this much


class Admission(Protocol):
    headers: dict[str, str]  # x-ratelimit-* for the response

    async def settle(self, usage: Usage, *, cached: bool = False) -> None:
        """Exactly once per admitted request: release the lease, settle tokens/dollars, write the ledger."""


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


def limit_keys(team: str) -> tuple[str, str, str]:
    """(requests bucket, tokens bucket, leases) of a team; same hash tag as its ledger."""
    p = ledger.team_prefix(team)
    return p + "rpm", p + "tpm", p + "leases"


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _arg(v: float | None) -> bytes:
    """A script argument as redis-py would send it ('' for None), encoded once, not per call."""
    return b"" if v is None else str(v).encode()


class _LeaseIds:
    """Lease ids unique across processes and replicas without uuid4's cost per request: a random
    prefix per process (drawn again in a forked child) and a counter."""

    def __init__(self) -> None:
        self._reset()
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        self._prefix, self._count = os.urandom(9).hex() + ":", itertools.count(1)

    def next(self) -> str:
        return f"{self._prefix}{next(self._count):x}"


_lease_ids = _LeaseIds()


class _Plan:
    """What does not change between one team's requests, computed once: its keys, the fixed
    script arguments (already bytes, so redis-py does not encode them per call) and the header
    values of its limits."""

    __slots__ = ("team", "limited", "leased", "admit_keys", "admit_args", "tpm_key", "leases_key",
                 "settle_args", "rpm", "tpm")

    def __init__(self, team: Team, lease_ttl_s: float) -> None:
        lim, quota = team.limits, team.quota
        self.team = team
        self.limited = not (lim.requests_per_minute is None and lim.tokens_per_minute is None
                            and lim.max_concurrent is None and quota.tokens_per_day is None
                            and quota.usd_per_month is None)
        self.leased = lim.max_concurrent is not None
        rpm_key, self.tpm_key, self.leases_key = limit_keys(team.name)
        self.admit_keys = (rpm_key, self.tpm_key, self.leases_key, ledger.usage_prefix(team.name))
        usd = None if quota.usd_per_month is None else round(quota.usd_per_month * 1_000_000)
        # admit.lua ARGV[4..]: the arguments after now, tokens and lease id
        self.admit_args = (_arg(lim.requests_per_minute), _arg(lim.tokens_per_minute), _arg(lim.max_concurrent),
                           _arg(round(lease_ttl_s * 1000)), _arg(quota.tokens_per_day), _arg(usd),
                           _arg(ledger.DAY_TTL_S), ledger.QUOTA_TOKENS.encode(), ledger.COST_MICRO.encode())
        # settle.lua ARGV[5..9]: the arguments after now, reserved, charged and lease id
        self.settle_args = (_arg(lim.tokens_per_minute), _arg(ledger.DAY_TTL_S), _arg(ledger.MONTH_TTL_S),
                            ledger.QUOTA_TOKENS.encode(), ledger.COST_MICRO.encode())
        self.rpm = None if lim.requests_per_minute is None else str(lim.requests_per_minute)
        self.tpm = None if lim.tokens_per_minute is None else str(lim.tokens_per_minute)


class NoopAdmission:
    """For a gateway running without limits or store: no headers, nothing to settle."""

    headers: dict[str, str] = {}
    remaining: dict[str, Any] | None = None

    async def settle(self, usage: Usage, *, cached: bool = False) -> None:
        return None


class StoreAdmission:
    """One admitted request: its headers and the one settle() that trues up its reservation."""

    def __init__(self, limiter: "Limiter", team: Team, *, date: str, month: str, reserved: int = 0,
                 lease_id: str = "", headers: dict[str, str] | None = None, plan: _Plan | None = None) -> None:
        self.limiter, self.team, self.plan = limiter, team, plan
        self.date, self.month = date, month  # the UTC period the request belongs to
        self.reserved, self.lease_id = reserved, lease_id
        self.headers = headers or {}
        self.remaining: dict[str, Any] | None = None  # quota left after settle
        self._settled = False

    async def settle(self, usage: Usage, *, cached: bool = False) -> None:
        """Idempotent; never raises a store error; survives the caller being cancelled."""
        if self._settled:
            return
        self._settled = True
        await asyncio.shield(self.limiter._settle(self, usage, cached))


class Limiter:
    """Admission against the shared store; one instance per app, used by every request."""

    def __init__(self, store: Store, config: Config, *, on_error: str = "open", metrics: Any = None,
                 clock: Callable[[], float] | None = None, lease_ttl_s: float | None = None) -> None:
        if on_error not in ("open", "closed"):
            raise ValueError(f"store.on_error: must be open or closed, got {on_error!r}")
        self.store, self.config, self.on_error, self.metrics = store, config, on_error, metrics
        self.clock = clock  # injected UNIX time (tests); None: the store's own clock (TIME)
        self.lease_ttl_s = lease_ttl_s or config.upstream.timeout_s + LEASE_MARGIN_S
        self._degraded = False
        self._plans: dict[str, _Plan] = {}

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
        if plan is None or plan.team is not team:  # first request, or the team was reconfigured
            plan = self._plans[team.name] = _Plan(team, self.lease_ttl_s)
        return plan

    async def admit(self, team: Team, request: ChatRequest) -> StoreAdmission:
        """Raise RateLimited, QuotaExceeded, or StoreUnavailable (on_error: closed)."""
        plan = self._plan(team)
        if not plan.limited:
            return StoreAdmission(self, team, plan=plan, **self._local_period())
        tokens = estimate_tokens(request)
        lease_id = _lease_ids.next() if plan.leased else ""
        try:
            r = await self.store.run_script(
                "admit", plan.admit_keys, (self._now_arg(), tokens, lease_id, *plan.admit_args))
        except StoreError as e:
            self._store_failed("admit", e)
            if self.on_error == "closed":
                raise StoreUnavailable() from None
            return StoreAdmission(self, team, plan=plan, **self._local_period())
        if self._degraded:
            self._degraded = False
            log.info("store available again")
        headers = self._headers(plan, r)
        if not int(r[0]):
            limit = _s(r[1])
            if self.metrics is not None:
                self.metrics.rejection(team.name, limit)
            raise self._refusal(team, limit, int(r[2]), int(r[3]), tokens, headers)
        return StoreAdmission(self, team, date=_s(r[4]), month=_s(r[5]), reserved=tokens,
                              lease_id=lease_id, headers=headers, plan=plan)

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
    def _refusal(team: Team, limit: str, retry_ms: int, now_ms: int, tokens: int,
                 headers: dict[str, str]) -> RateLimited | QuotaExceeded:
        retry_s = retry_ms / 1000
        lim, q, who = team.limits, team.quota, f"team '{team.name}'"
        if limit in ("tokens_per_day", "usd_per_month"):
            resets = datetime.fromtimestamp((now_ms + retry_ms) / 1000, timezone.utc)
            at = resets.replace(microsecond=0).isoformat().replace("+00:00", "Z")
            amount = f"{q.tokens_per_day} tokens" if limit == "tokens_per_day" else f"${q.usd_per_month:g}"
            msg = f"Quota exceeded for {who}: {limit} ({amount}) is used up; it resets at {at}."
            return QuotaExceeded(msg, limit=limit, retry_after_s=retry_s, headers=headers)
        if limit == "max_concurrent":
            what = f"max_concurrent ({lim.max_concurrent} requests in flight)"
        elif limit == "tokens_per_minute":
            what = f"tokens_per_minute ({lim.tokens_per_minute}; this request reserves {tokens} tokens)"
        else:
            what = f"requests_per_minute ({lim.requests_per_minute})"
        msg = f"Rate limit reached for {who}: {what}. Retry in {format_duration(retry_s)}."
        return RateLimited(msg, limit=limit, retry_after_s=retry_s, headers=headers)

    async def _settle(self, adm: StoreAdmission, usage: Usage, cached: bool) -> None:
        team = adm.team
        plan = adm.plan if adm.plan is not None else self._plan(team)
        try:
            day_tokens, month_micro = await self.store.run_script(
                "settle",
                (plan.tpm_key, plan.leases_key, ledger.day_key(team.name, adm.date),
                 ledger.month_key(team.name, adm.month)),
                (self._now_arg(), adm.reserved, 0 if cached else usage.total, adm.lease_id, *plan.settle_args,
                 *ledger.increments(usage, cached=cached)),
            )
        except StoreError as e:
            self._store_failed("settle", e)
            return
        adm.remaining = ledger.remaining(team, int(day_tokens), int(month_micro))
        if self.metrics is not None:
            for quota, value in adm.remaining.items():
                if value is not None:
                    self.metrics.quota_remaining(team.name, quota, value)
