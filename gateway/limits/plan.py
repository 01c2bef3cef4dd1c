"""What does not change between one team's admissions under one config, computed once: the
keys, the scripts' fixed arguments and the header values (``_Plan``), and the admission ids.

``Plans`` builds a config's plans once, with that config's own account, and keeps those of
the few configs before it: a request admitted just after a reload, under the snapshot it
arrived with, is checked against that snapshot's teams and account, not the new ones."""
from __future__ import annotations

import itertools
import math
import os
from collections import deque
from typing import Any

from gateway.config import Account, Config, Limits, Quota, Team
from gateway.limits import ledger

# How long the 'x' left by a settle or a release stands: longer than any script queued before
# it in a stalled store's sockets can still run late, and than a settle's retries take once
# the store answers again (they run on the next renewal ticks).
MARKER_TTL_S = 600
# Configs whose plans are kept: a request is admitted within moments of arriving, so one
# that saw more reloads than this in between is not to be expected.
KEEP_CONFIGS = 4


def micro_usd(usd: float) -> int:
    """Dollars as the ledger's integer micro-dollars."""
    return round(usd * 1_000_000)


def limit_keys(team: str | None) -> tuple[str, str, str]:
    """(requests bucket, tokens bucket, leases) of a team, or of the account (``None``)."""
    p = ledger.ACCOUNT_PREFIX if team is None else ledger.team_prefix(team)
    return p + "rpm", p + "tpm", p + "leases"


def _arg(v: float | None) -> bytes:
    """A script argument as redis-py would send it ('' for None), encoded once, not per call."""
    return b"" if v is None else str(v).encode()


def _micro_or_none(usd: float | None) -> int | None:
    return None if usd is None else micro_usd(usd)


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
    """One team's keys and those of the account (when it has limits), the fixed script
    arguments (already bytes, so redis-py does not encode them per call) and the header values
    of the team's limits."""

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

    def release_args(self, now: Any, admission_id: str) -> tuple:
        """settle.lua's arguments that undo an admission by its id, as if it never happened
        (no charge, no ledger row, its request back in requests_per_minute)."""
        return (now, admission_id, b"", 0, 0, 0, b"", b"", *self.settle_args)


class Plans:
    """The plans of the current config and of the ``KEEP_CONFIGS - 1`` before it, by ``Team``
    object: a config's teams are its own objects, so a team is found with its config's account.
    A ``Team`` of no known config (built by hand) gets a plan with the current account, kept
    until the next config."""

    def __init__(self, config: Config, lease_ttl_s: float) -> None:
        self.lease_ttl_s = lease_ttl_s
        self._configs: deque[dict[int, _Plan]] = deque(maxlen=KEEP_CONFIGS)
        self._by_team: dict[int, _Plan] = {}  # by id(team): each plan holds its team, so no id is reused meanwhile
        self.add(config)

    def add(self, config: Config) -> None:
        """A new config: its plans, built once; the oldest kept config's are dropped."""
        self._account = config.account
        self._configs.append({id(t): _Plan(t, config.account, self.lease_ttl_s) for t in config.teams})
        self._by_team = {k: p for plans in self._configs for k, p in plans.items()}

    def of(self, team: Team) -> _Plan:
        plan = self._by_team.get(id(team))
        if plan is None:
            plan = self._by_team[id(team)] = _Plan(team, self._account, self.lease_ttl_s)
        return plan
