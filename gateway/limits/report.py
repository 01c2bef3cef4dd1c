"""``gateway usage``: the usage ledger of every team (or one), read from the store, as a table
or JSON.

The ledger lives in the store the gateways write (gateway/limits/ledger.py), so this command reads the
same numbers as ``GET /admin/usage`` without going through a gateway. The embedded store
(``memory://``) lives inside the gateway process and cannot be read from outside it.

Exit status: 0 with the report on stdout; 1 with one clear line on stderr when the period or
team is wrong, the store is the embedded one, or the store does not answer.
"""
from __future__ import annotations

import re
import sys
from datetime import date, datetime, timezone
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import orjson

from gateway.limits import ledger
from gateway.config import Config
from gateway.errors import StoreUnavailable
from gateway.store import connect

MONTH_RE = re.compile(r"^(\d{4})-(\d{2})$")

# (header, how to read it from one period of read_usage)
COLUMNS: tuple[tuple[str, Any], ...] = (
    ("REQUESTS", lambda u: u["requests"]),
    ("PROMPT", lambda u: u["tokens"]["prompt"]),
    ("COMPLETION", lambda u: u["tokens"]["completion"]),
    ("IMAGE", lambda u: u["tokens"]["image"]),
    ("REASONING", lambda u: u["tokens"]["reasoning"]),
    ("IMAGES_IN", lambda u: u["images_in"]),
    ("IMAGES_OUT", lambda u: u["images_out"]),
    ("COST_USD", lambda u: u["cost_usd"]),
    ("CACHE_HITS", lambda u: u["cache_hits"]),
    ("SAVED_TOKENS", lambda u: u["cache_saved_tokens"]),
)


class UsageError(Exception):
    """A problem the user can fix; its message is printed as is."""


def _fail(message: str) -> int:
    print(f"gateway usage: {message}", file=sys.stderr)
    return 1


def redact(url: str) -> str:
    """The store URL without its password, fit for a message."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    creds, _, hosts = parts.netloc.rpartition("@")
    user = creds.partition(":")[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{hosts}" if user else f"***@{hosts}"))


def parse_period(month: str | None, day: str | None, now: datetime | None = None) -> tuple[str, str]:
    """('day', 'YYYY-MM-DD') or ('month', 'YYYY-MM'); default: this UTC month."""
    if day is not None:
        try:
            return "day", date.fromisoformat(day).isoformat()
        except ValueError:
            raise UsageError(f"--day must be a date as YYYY-MM-DD, got {day!r}") from None
    if month is not None:
        m = MONTH_RE.match(month)
        if not m or not 1 <= int(m.group(2)) <= 12:
            raise UsageError(f"--month must be a month as YYYY-MM, got {month!r}")
        return "month", month
    now = now or datetime.now(timezone.utc)
    return "month", now.astimezone(timezone.utc).strftime("%Y-%m")


def _total(rows: list[dict[str, Any]]) -> dict[str, Any]:
    total: dict[str, Any] = {"requests": 0, "tokens": {}, "images_in": 0, "images_out": 0, "cost_usd": 0.0,
                             "cache_hits": 0, "cache_saved_tokens": 0}
    for row in rows:
        for key, value in row.items():
            if key == "tokens":
                for kind, n in value.items():
                    total["tokens"][kind] = total["tokens"].get(kind, 0) + n
            elif key in total:
                total[key] += value
    total["cost_usd"] = round(total["cost_usd"], 6)
    return total


def render_table(kind: str, period: str, rows: list[dict[str, Any]]) -> str:
    """A fixed-width table, one line per team, a TOTAL line when there are several."""
    header = ["TEAM", *(name for name, _ in COLUMNS)]
    lines = [[row["team"], *(_cell(name, get(row)) for name, get in COLUMNS)] for row in rows]
    if len(rows) > 1:
        total = _total(rows)
        lines.append(["TOTAL", *(_cell(name, get(total)) for name, get in COLUMNS)])
    widths = [max(len(line[i]) for line in [header, *lines]) for i in range(len(header))]

    def fmt(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    out = [f"Usage for {kind} {period} (UTC)", "", fmt(header), fmt(["-" * w for w in widths])]
    out += [fmt(line) for line in lines]
    return "\n".join(out)


def _cell(name: str, value: Any) -> str:
    return f"{value:.6f}" if name == "COST_USD" else str(value)


async def collect(config: Config, *, team: str | None = None, month: str | None = None,
                  day: str | None = None, store: Any = None) -> dict[str, Any]:
    """The report as data: {"period": "day"|"month", "day"|"month": ..., "data": [...], "total"}.

    Raises UsageError for a bad period or team, StoreUnavailable when the store does not answer.
    """
    kind, period = parse_period(month, day)
    teams = list(config.teams)
    if team is not None:
        teams = [t for t in teams if t.name == team]
        if not teams:
            known = ", ".join(t.name for t in config.teams) or "none"
            raise UsageError(f"unknown team {team!r} (teams in the config: {known})")
    own = store is None
    if own:
        store = await connect(config.store.url)
    try:
        rows = []
        for t in teams:
            if kind == "day":
                usage = (await ledger.read_usage(store, t.name, day=date.fromisoformat(period)))["day"]
            else:
                usage = (await ledger.read_usage(store, t.name, month=period))["month"]
            usage = {k: v for k, v in usage.items() if k not in ("date", "month", ledger.QUOTA_TOKENS)}
            rows.append({"team": t.name, **usage})
    finally:
        if own:
            await store.close()
    return {"object": "usage_report", "period": kind, kind: period, "data": rows, "total": _total(rows)}


async def print_usage(config: Config, *, team: str | None = None, month: str | None = None,
                      day: str | None = None, as_json: bool = False) -> int:
    """``gateway usage``: print the report; 0, or 1 with a message on stderr."""
    url = config.store.url
    if urlsplit(url).scheme.lower() == "memory":
        return _fail(
            "the store is the embedded one (store.url: memory://), which lives inside the gateway "
            "process, so there is nothing to read from here. Ask the running gateway instead: "
            "GET /admin/usage with an admin key (or GET /v1/usage with a team key), or set "
            "store.url to a Redis URL to keep usage outside the gateway."
        )
    try:
        parse_period(month, day)  # a bad period is reported before any connection is made
        store = await connect(url)
    except (UsageError, ValueError) as err:  # ValueError: a store URL the store module refuses
        return _fail(str(err))
    try:
        report = await collect(config, team=team, month=month, day=day, store=store)
    except UsageError as err:
        return _fail(str(err))
    except StoreUnavailable:
        reason = f" ({store.last_error})" if store.last_error else ""
        return _fail(f"the store at {redact(url)} is unavailable{reason}; is Redis running and is store.url right?")
    finally:
        await store.close()
    if as_json:
        sys.stdout.write(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        print(render_table(report["period"], report[report["period"]], report["data"]))
    return 0
