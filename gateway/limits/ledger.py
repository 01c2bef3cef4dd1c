"""The usage ledger: key names (shared with the Lua scripts through their arguments) and the
read side behind ``GET /v1/usage``, ``GET /admin/usage`` and ``gateway usage``.

Per team and UTC period, one hash each, written by settle.lua in the same round trip that
settles the request, and kept in the store so it survives gateway restarts:

    gw:{limits}:team:<name>:usage:day:YYYY-MM-DD   expires after ~40 days
    gw:{limits}:team:<name>:usage:month:YYYY-MM    expires after ~400 days

and the same for the account shared by all teams (``gw:{limits}:account:usage:...``), written
by the same settle whenever the account has limits, so it holds every team's usage since then.

Fields: requests, prompt/completion/image/reasoning/audio tokens, images_in, images_out,
cost_micro (integer micro-dollars: exact sums, no float drift), cache_hits, cache_saved_tokens;
the day hash also holds quota_tokens (settled tokens plus in-flight reservations: what
``tokens_per_day`` is checked against), the day and month hashes quota_micro (settled cost plus
the priced estimates of requests in flight: what ``usd_per_day`` and ``usd_per_month`` are
checked against).

Every limits key (buckets, leases, admission records, ledgers, of every team and of the
account) carries the one hash tag ``{limits}``: admit.lua checks a team and the account in one
atomic script, which Redis Cluster runs only on keys of one slot. So on a Cluster the limits
live on one shard (the cache spreads over all of them); at one script call per admission and
one per settle, a shard has room for far more requests than an upstream account allows. The tag
does not depend on whether ``account:`` is configured, so adding or removing it (on a reload)
moves no key and resets no quota.
"""
from __future__ import annotations

from datetime import date, datetime, timedelta, timezone
from functools import lru_cache
from typing import Any, Mapping

from gateway.config import Account, Limits, Quota, Team
from gateway.errors import StoreUnavailable
from gateway.store import StoreError, as_text
from gateway.usage import TOKEN_TYPES, Usage

DAY_TTL_S = 40 * 86400
MONTH_TTL_S = 400 * 86400
QUOTA_TOKENS = "quota_tokens"  # day field: tokens counted against tokens_per_day
QUOTA_MICRO = "quota_micro"  # day and month field: micro-dollars counted against usd_per_day/usd_per_month
COST_MICRO = "cost_micro"  # day and month field: micro-dollars spent
COUNTS = ("requests", *TOKEN_TYPES, "images_in", "images_out", COST_MICRO, "cache_hits", "cache_saved_tokens")


TAG = "gw:{limits}:"  # every limits key starts so: one Cluster hash slot (see above)
ACCOUNT_PREFIX = TAG + "account:"  # every key of the account starts so


def team_prefix(team: str) -> str:
    """Every key of a team starts so (team names hold no ':', so no team's keys meet another's)."""
    return f"{TAG}team:{team}:"


def usage_prefix(team: str | None) -> str:
    """The ledger of a team, or of the account (``None``)."""
    return (ACCOUNT_PREFIX if team is None else team_prefix(team)) + "usage:"


def day_key(team: str | None, day: date | str) -> str:
    return f"{usage_prefix(team)}day:{day if isinstance(day, str) else day.isoformat()}"


def month_key(team: str | None, month: str) -> str:
    return f"{usage_prefix(team)}month:{month}"


def period(ts: float) -> tuple[str, str]:
    """('YYYY-MM-DD', 'YYYY-MM') of a UNIX time, in UTC."""
    return _period_of_day(int(ts // 86400))


@lru_cache(maxsize=4)
def _period_of_day(day: int) -> tuple[str, str]:
    d = (_EPOCH + timedelta(days=day)).isoformat()
    return d, d[:7]


_EPOCH = date(1970, 1, 1)


def increments(usage: Usage, *, cached: bool) -> list[Any]:
    """Ledger field/increment pairs for settle.lua, in COUNTS order, zeros left out. A cache hit
    is charged nothing: it counts as a request, a hit and its images, and its tokens as saved."""
    if cached:
        pairs = [("requests", 1), ("images_in", usage.images_in), ("images_out", usage.images_out),
                 ("cache_hits", 1), ("cache_saved_tokens", usage.total)]
    else:
        pairs = [("requests", 1), ("prompt", usage.prompt), ("completion", usage.completion),
                 ("image", usage.image), ("reasoning", usage.reasoning), ("audio", usage.audio),
                 ("images_in", usage.images_in), ("images_out", usage.images_out),
                 (COST_MICRO, round(usage.cost_usd * 1_000_000))]
    return [x for field, n in pairs if n for x in (field, int(n))]


def _decode(flat: list[Any] | None) -> dict[str, int]:
    flat = flat or []
    return {as_text(flat[i]): int(flat[i + 1]) for i in range(0, len(flat) - 1, 2)}


def _shape(raw: Mapping[str, int]) -> dict[str, Any]:
    return {
        "requests": raw.get("requests", 0),
        "tokens": {t: raw.get(t, 0) for t in TOKEN_TYPES},
        "images_in": raw.get("images_in", 0),
        "images_out": raw.get("images_out", 0),
        "cost_usd": raw.get(COST_MICRO, 0) / 1_000_000,
        "cache_hits": raw.get("cache_hits", 0),
        "cache_saved_tokens": raw.get("cache_saved_tokens", 0),
    }


async def read_usage(store: Any, team_name: str | None, *, day: date | None = None,
                     month: str | None = None) -> dict:
    """The ledger of a team (of the account: ``None``) for ``day`` and/or ``month``
    ('YYYY-MM'), in one round trip.

    Returns {"day": {"date": ..., requests, tokens{...}, images_in, images_out, cost_usd,
    cache_hits, cache_saved_tokens, quota_tokens (and the account's quota_micro)},
    "month": {"month": ..., same but quota_micro}}, holding only the periods asked for (both
    None: today and this month, UTC). Raises StoreUnavailable.
    """
    if day is None and month is None:
        today = datetime.now(timezone.utc).date()
        day, month = today, today.isoformat()[:7]
    keys, names = [], []
    if day is not None:
        keys.append(day_key(team_name, day))
        names.append("day")
    if month is not None:
        keys.append(month_key(team_name, month))
        names.append("month")
    try:
        raw = await store.run_script("usage", keys, [])
    except StoreError:
        raise StoreUnavailable("The usage ledger is unavailable; try again shortly.") from None
    out: dict[str, Any] = {}
    for name, flat in zip(names, raw):
        fields = _decode(flat)
        if name == "day":
            out["day"] = {"date": day.isoformat(), **_shape(fields), QUOTA_TOKENS: fields.get(QUOTA_TOKENS, 0)}
            if team_name is None:  # what usd_per_day is checked against
                out["day"][QUOTA_MICRO] = fields.get(QUOTA_MICRO, 0)
        else:
            out["month"] = {"month": month, **_shape(fields), QUOTA_MICRO: fields.get(QUOTA_MICRO, 0)}
    return out


def remaining(quota: Quota, day_tokens: int, month_micro: int,
              day_micro: int | None = None) -> dict[str, float | None]:
    """What is left of each quota (None: no such quota), in-flight reservations deducted; never
    below zero. ``usd_per_day`` (the account's) only when ``day_micro`` is given."""
    def usd(limit: float | None, micro: int) -> float | None:
        return None if limit is None else max(0.0, round(limit - micro / 1_000_000, 6))

    left = {"tokens_per_day": None if quota.tokens_per_day is None else max(0, quota.tokens_per_day - day_tokens)}
    if day_micro is not None:
        left["usd_per_day"] = usd(quota.usd_per_day, day_micro)
    left["usd_per_month"] = usd(quota.usd_per_month, month_micro)
    return left


async def _report(store: Any, team_name: str | None, limits: Limits, quota: Quota, now: datetime | float) -> dict:
    """Today, this month, the limits and what remains, of a team or of the account (``None``)."""
    when = now if isinstance(now, datetime) else datetime.fromtimestamp(now, timezone.utc)
    today = when.astimezone(timezone.utc).date()
    usage = await read_usage(store, team_name, day=today, month=today.isoformat()[:7])
    day, month = usage["day"], usage["month"]
    quotas = {"tokens_per_day": quota.tokens_per_day, "usd_per_month": quota.usd_per_month}
    if team_name is None:
        quotas["usd_per_day"] = quota.usd_per_day
    return {
        "day": day,
        "month": month,
        "limits": {
            "requests_per_minute": limits.requests_per_minute,
            "tokens_per_minute": limits.tokens_per_minute,
            "max_concurrent": limits.max_concurrent,
        },
        "quota": quotas,
        "remaining": remaining(quota, day[QUOTA_TOKENS], month[QUOTA_MICRO], day.get(QUOTA_MICRO)),
    }


async def team_usage_report(store: Any, team: Team, now: datetime | float) -> dict:
    """What ``GET /v1/usage`` answers: today, this month, the team's limits and what remains."""
    return {"team": team.name, **await _report(store, team.name, team.limits, team.quota, now)}


async def account_usage_report(store: Any, account: Account, now: datetime | float) -> dict:
    """The account's part of ``GET /admin/usage``: every team's usage since the account has
    limits, its limits and what remains of its quotas."""
    return await _report(store, None, account.limits, account.quota, now)
