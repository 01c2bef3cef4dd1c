"""What a client sees of admit.lua's answer: the x-ratelimit-* headers of an admission, and the
429 of a refusal, naming the team's limit or the account's (``account_<limit>``)."""
from __future__ import annotations

import math
from datetime import datetime, timezone

from gateway.errors import QuotaExceeded, RateLimited
from gateway.limits.plan import _Plan

ACCOUNT = "account_"  # how admit.lua names the account's limits in a refusal


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


def headers(plan: _Plan, r: list) -> dict[str, str]:
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


def refusal(plan: _Plan, limit: str, retry_ms: int, now_ms: int, tokens: int,
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
