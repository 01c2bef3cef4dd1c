"""The config's schema, as data: ``SCHEMA`` maps each key to a check ``(value, path, problems) -> value``.

Leaf checks come from ``_rule``; ``_record`` and ``_list_of`` compose them and report unknown
keys. A check reports ``key.path: what is wrong`` into ``problems`` and returns ``SKIP`` for a
bad value; a value that used an unset variable is ``UNSET`` (reported already, by the loader).
Values are never echoed into problems: they may be secrets.
"""
from __future__ import annotations

import difflib
import math
import re
from typing import Any, Callable

Check = Callable[[Any, str, list[str]], Any]
SKIP = object()  # "leave this key out": a bad value (already reported), an absent section
UNSET = object()  # a value that used an unset variable (already reported)
TEAM_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


# ---- leaf checks: each reports "<path>: <message>" and returns SKIP when the value is bad
def _rule(test: Callable[[Any], Any], message: str, convert: Callable = lambda v: v) -> Check:
    def check(value: Any, path: str, problems: list[str]) -> Any:
        try:
            if test(value):
                return convert(value)
        except (ValueError, OverflowError):  # float(10**400)
            pass
        problems.append(f"{path}: {message}")
        return SKIP
    return check


def _text(pattern: str, message: str, convert: Callable = lambda v: v) -> Check:
    rx = re.compile(pattern, re.S)
    return _rule(lambda v: isinstance(v, str) and rx.fullmatch(v) is not None, message, convert)


def _one_of(*choices: str) -> Check:
    return _text("|".join(map(re.escape, choices)), "must be one of: " + ", ".join(choices))


def _nullable(check: Check) -> Check:  # null = unlimited, e.g. to lift an inherited limit
    return lambda v, path, problems: None if v is None else check(v, path, problems)


def _is_num(v: Any) -> bool:  # `type(v) is int`, not isinstance: YAML true must not pass as 1
    return type(v) is int or type(v) is float and math.isfinite(v)


POS_INT = _rule(lambda v: type(v) is int and v > 0, "must be a positive integer")
COUNT = _rule(lambda v: type(v) is int and v >= 0, "must be an integer >= 0")
PORT = _rule(lambda v: type(v) is int and 0 <= v <= 65535,
             "must be an integer from 0 to 65535 (0 = any free port)")
METRICS_PORT = _rule(lambda v: type(v) is int and 0 < v <= 65535,  # every worker binds the same one
                     "must be an integer from 1 to 65535, or null (metrics on server.port)")
POS_NUM = _rule(lambda v: _is_num(v) and v > 0, "must be a positive number", float)


def _at_most(check: Check, top: float) -> Check:
    """``check``, then a bound: limits and quotas as the Lua scripts take them (counts up to 1e12,
    dollars up to 1e6, i.e. 1e12 micro-dollars); a larger one would refuse every request."""
    over = _rule(lambda v: v <= top, f"must be at most {top:.0f}")

    def check_bounded(value: Any, path: str, problems: list[str]) -> Any:
        out = check(value, path, problems)
        return out if out is SKIP else over(out, path, problems)
    return check_bounded


LIMIT = _at_most(POS_INT, 10**12)
USD = _at_most(POS_NUM, 10**6)
PRICE = _rule(lambda v: _is_num(v) and v >= 0, "must be a number >= 0", float)
NON_NEG_NUM = _rule(lambda v: _is_num(v) and v >= 0, "must be a number >= 0", float)
BOOL = _rule(lambda v: type(v) is bool, "must be true or false")
TEXT = _text(r".*\S.*", "must be a non-empty string")
ANY_TEXT = _text(r".*", "must be a string")
URL_PATH = _text(r"/.*", "must start with /")
BASE_URL = _text(r"(?!.*/v1/?$)https?://[^/\s]+(/\S*)?", "must be an http:// or https:// URL of "
                 "the host root, without /v1 (the gateway appends /v1/chat/completions)")
STORE_URL = _text(r"(memory|redis|rediss|redis\+cluster)://.*",
                  "must start with memory://, redis://, rediss:// or redis+cluster://")
NAME = _text(TEAM_NAME.pattern, "must be letters, digits, '_', '.' or '-'")
KEY_HASH = _text(r"sha256:[0-9a-fA-F]{64}", "must be 'sha256:' and 64 hex digits, never a raw "
                 "key; make a key and its hash with `gateway keys new --team NAME`",
                 lambda v: v[7:].lower())


# ---- composite checks ----------------------------------------------------------------------
def _record(fields: dict[str, Check], required: tuple[str, ...] = ()) -> Check:
    def check(value: Any, path: str, problems: list[str]) -> Any:
        if value is None:  # `server:` with everything below commented out
            value = {}
        if not isinstance(value, dict):
            problems.append(f"{path or 'config'}: must be a mapping")
            return SKIP
        out = {}
        for key, v in value.items():
            if key not in fields:
                near = difflib.get_close_matches(str(key), fields, n=1)
                hint = f"did you mean '{near[0]}'?" if near else "known keys: " + ", ".join(fields)
                problems.append(f"{join(path, key)}: unknown key ({hint})")
            elif v is not UNSET and (r := fields[key](v, join(path, key), problems)) is not SKIP:
                out[key] = r
        problems.extend(f"{join(path, k)}: is required" for k in required if k not in value)
        return out
    return check


def _list_of(item: Check) -> Check:
    """A list keeps ``SKIP`` in place of bad items so that later paths keep their index."""
    def check(value: Any, path: str, problems: list[str]) -> Any:
        if value is None:
            return SKIP
        if not isinstance(value, list):
            problems.append(f"{path}: must be a list")
            return SKIP
        return [SKIP if v is UNSET else item(v, f"{path}[{i}]", problems)
                for i, v in enumerate(value)]
    return check


_LIMITS = {"requests_per_minute": _nullable(LIMIT), "tokens_per_minute": _nullable(LIMIT),
           "max_concurrent": _nullable(LIMIT), "max_images_per_request": POS_INT,
           "max_image_mb": POS_NUM}
_CACHE = {"mode": _one_of("off", "deterministic", "always"), "ttl_s": POS_INT,
          "max_entry_mb": POS_NUM, "scope": _one_of("team", "global")}
_IMAGES_TEAM = {"delivery": _one_of("inline", "url"), "url_ttl_s": POS_INT, "max_n": POS_INT,
                "public_base_url": _nullable(_text(r"https?://[^/\s]+(/\S*)?", "must be an http:// or "
                                                   "https:// URL", lambda v: v.rstrip("/")))}
_IMAGES = {**_IMAGES_TEAM, "signing_key": _rule(lambda v: v is None or isinstance(v, str), "must be a string",
                                                lambda v: v or ""),  # empty: ${VAR:-} unset
           "storage": _text(r"store|s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/\S*)?",
                            "must be store or s3://bucket/prefix"),
           "s3": _record({"endpoint_url": _nullable(_text(r"https?://\S+", "must be an http:// or https:// URL")),
                          "region": _nullable(TEXT), "presign": BOOL})}
SCHEMA = _record({
    "server": _record({"host": TEXT, "port": PORT, "max_body_mb": POS_NUM,
                       "metrics_path": URL_PATH, "metrics": BOOL, "metrics_port": _nullable(METRICS_PORT),
                       "read_timeout_s": POS_NUM, "drain_delay_s": NON_NEG_NUM,
                       "shutdown_timeout_s": POS_NUM, "watch_config": BOOL}),
    "upstream": _record({"base_url": BASE_URL, "api_key": ANY_TEXT, "timeout_s": POS_NUM,
                         "connect_timeout_s": POS_NUM, "max_retries": COUNT}),
    "models": _list_of(_record({
        "id": TEXT, "aliases": _list_of(TEXT), "upstream_id": TEXT,
        "prices_usd_per_million": _record({"prompt": PRICE, "completion": PRICE, "image": PRICE}),
        "default_completion_tokens": POS_INT, "max_completion_tokens": POS_INT},
        required=("id",))),
    "limits_defaults": _record(_LIMITS),
    "store": _record({"url": STORE_URL, "on_error": _one_of("open", "closed"),
                      "lease_ttl_s": POS_NUM}),
    "cache": _record(_CACHE),
    "teams": _list_of(_record({
        "name": NAME, "keys": _list_of(KEY_HASH), "limits": _record(_LIMITS),
        "quota": _record({"tokens_per_day": _nullable(LIMIT),
                          "usd_per_month": _nullable(USD)}),
        "cache": _record(_CACHE), "images": _record(_IMAGES_TEAM)}, required=("name",))),
    "admin": _record({"keys": _list_of(KEY_HASH)}),
    "account": _record({
        "limits": _record({k: _nullable(LIMIT) for k in ("requests_per_minute", "tokens_per_minute",
                                                          "max_concurrent")}),
        "quota": _record({"tokens_per_day": _nullable(LIMIT), "usd_per_day": _nullable(USD),
                          "usd_per_month": _nullable(USD)})}),
    "images": _record(_IMAGES),
    "logging": _record({"level": _one_of("debug", "info", "warning", "error"),
                        "format": _one_of("json", "text"), "access_log": BOOL}),
    "tracing": _record({"otlp_endpoint": _text(r"https?://[^/\s]+(/\S*)?", "must be an http:// or https:// "
                                               "URL (the collector's base; traces go to <it>/v1/traces)"),
                        "sample_ratio": _rule(lambda v: _is_num(v) and 0 <= v <= 1, "must be a number from 0 to 1",
                                              float),
                        "service_name": TEXT}, required=("otlp_endpoint",)),
})
