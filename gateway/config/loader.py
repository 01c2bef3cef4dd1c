"""YAML text -> ``Config``: environment substitution, a schema walk, cross-checks.

The schema is data (``_SCHEMA``): each key maps to a check ``(value, path, problems) -> value``.
Leaf checks come from ``_rule``; ``_record`` and ``_list_of`` compose them and report unknown
keys. Every problem is collected as ``key.path: what is wrong`` and raised together at the end.

``${VAR}`` / ``${VAR:-default}`` (default also when VAR is empty; ``$${`` is a literal ``${``)
are replaced in the raw text. An unset variable or a malformed reference becomes a sentinel
that the walk reports at its key path, so one that appears only in a comment is harmless.
Values are never echoed into problems: they may be secrets.
"""
from __future__ import annotations

import difflib
import importlib.util
import math
import os
import re
import secrets
from dataclasses import replace
from typing import Any, Callable, Mapping

import yaml

from gateway import config as c

Check = Callable[[Any, str, list[str]], Any]
_SKIP = object()  # "leave this key out": a bad value (already reported), an absent section
_UNSET = object()  # a value that used an unset variable (already reported)
TEAM_NAME = re.compile(r"[A-Za-z0-9_.-]+")
# `$${` (an escaped `$`) | `${VAR}` or `${VAR:-default}` | anything else after `${` (malformed)
_REF = re.compile(r"\$(\$)(?=\{)|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}|\$\{[^}\n]*\}?")
DEFAULT_MODEL = c.ModelConfig(
    id=c.DEFAULT_MODEL_ID, upstream_id=c.DEFAULT_MODEL_ID,
    aliases=("gemini-3-pro-image-preview",), prices=c.Prices(2.0, 12.0, 120.0))


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


# ---- leaf checks: each reports "<path>: <message>" and returns _SKIP when the value is bad
def _rule(test: Callable[[Any], Any], message: str, convert: Callable = lambda v: v) -> Check:
    def check(value: Any, path: str, problems: list[str]) -> Any:
        try:
            if test(value):
                return convert(value)
        except (ValueError, OverflowError):  # float(10**400)
            pass
        problems.append(f"{path}: {message}")
        return _SKIP
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
            return _SKIP
        out = {}
        for key, v in value.items():
            if key not in fields:
                near = difflib.get_close_matches(str(key), fields, n=1)
                hint = f"did you mean '{near[0]}'?" if near else "known keys: " + ", ".join(fields)
                problems.append(f"{_join(path, key)}: unknown key ({hint})")
            elif v is not _UNSET and (r := fields[key](v, _join(path, key), problems)) is not _SKIP:
                out[key] = r
        problems.extend(f"{_join(path, k)}: is required" for k in required if k not in value)
        return out
    return check


def _list_of(item: Check) -> Check:
    """A list keeps ``_SKIP`` in place of bad items so that later paths keep their index."""
    def check(value: Any, path: str, problems: list[str]) -> Any:
        if value is None:
            return _SKIP
        if not isinstance(value, list):
            problems.append(f"{path}: must be a list")
            return _SKIP
        return [_SKIP if v is _UNSET else item(v, f"{path}[{i}]", problems)
                for i, v in enumerate(value)]
    return check


_LIMITS = {"requests_per_minute": _nullable(POS_INT), "tokens_per_minute": _nullable(POS_INT),
           "max_concurrent": _nullable(POS_INT), "max_images_per_request": POS_INT,
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
MIN_SIGNING_KEY = 32  # characters: an HMAC key must not be guessable
MAX_PRESIGN_S = 7 * 86400  # SigV4 presigned URLs live at most a week
_SCHEMA = _record({
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
        "quota": _record({"tokens_per_day": _nullable(POS_INT),
                          "usd_per_month": _nullable(POS_NUM)}),
        "cache": _record(_CACHE), "images": _record(_IMAGES_TEAM)}, required=("name",))),
    "admin": _record({"keys": _list_of(KEY_HASH)}),
    "account": _record({
        "limits": _record({k: _nullable(POS_INT) for k in ("requests_per_minute", "tokens_per_minute",
                                                            "max_concurrent")}),
        "quota": _record({"tokens_per_day": _nullable(POS_INT), "usd_per_day": _nullable(POS_NUM),
                          "usd_per_month": _nullable(POS_NUM)})}),
    "images": _record(_IMAGES),
    "logging": _record({"level": _one_of("debug", "info", "warning", "error"),
                        "format": _one_of("json", "text"), "access_log": BOOL}),
    "tracing": _record({"otlp_endpoint": _text(r"https?://[^/\s]+(/\S*)?", "must be an http:// or https:// "
                                               "URL (the collector's base; traces go to <it>/v1/traces)"),
                        "sample_ratio": _rule(lambda v: _is_num(v) and 0 <= v <= 1, "must be a number from 0 to 1",
                                              float),
                        "service_name": TEXT}, required=("otlp_endpoint",)),
})
_SIMPLE = {"server": c.ServerConfig, "upstream": c.UpstreamConfig, "store": c.StoreConfig,
           "cache": c.CacheConfig, "limits_defaults": c.Limits, "logging": c.LoggingConfig}


# ---- cross-checks and building -------------------------------------------------------------
def _unique(items: list[tuple[str, Any]], what: str, problems: list[str]) -> None:
    first: dict[Any, str] = {}
    for path, value in items:
        if value in first:
            problems.append(f"{path}: same {what} as {first[value]}")
        first.setdefault(value, path)


def _present(items: Any) -> list[tuple[int, Any]]:
    return [(i, v) for i, v in enumerate(items or ()) if v is not _SKIP]


def _check(data: Any, problems: list[str]) -> c.Config:
    """Walk, cross-check and build; raise ``ConfigError`` with ``problems`` if there are any."""
    tree = _SCHEMA({} if data is None else data, "", problems)
    if tree is _SKIP:
        raise c.ConfigError(problems)
    models, teams = tree.get("models"), _present(tree.get("teams"))
    if models == []:
        problems.append("models: must list at least one model (leave the key out for the default)")
    names = []
    for i, m in _present(models):
        names += [(f"models[{i}].id", m["id"])] if "id" in m else []
        names += [(f"models[{i}].aliases[{j}]", a) for j, a in _present(m.get("aliases"))]
    _unique(names, "model name", problems)
    _unique([(f"teams[{i}].name", t["name"]) for i, t in teams if "name" in t],
            "team name", problems)
    _unique([(f"{owner}.keys[{j}]", h)
             for owner, keys in [(f"teams[{i}]", t.get("keys")) for i, t in teams]
             + [("admin", tree.get("admin", {}).get("keys"))]
             for j, h in _present(keys)], "key hash", problems)
    server = tree.get("server", {})
    if server.get("metrics_port") is not None and server["metrics_port"] == server.get("port", c.ServerConfig().port):
        problems.append("server.metrics_port: must differ from server.port")
    _check_images(tree.get("images", {}), [(f"teams[{i}].images", t.get("images", {})) for i, t in teams],
                  problems)
    if problems:
        raise c.ConfigError(problems)

    def model(m: dict) -> c.ModelConfig:
        rest = {k: v for k, v in m.items() if k != "prices_usd_per_million"}
        return c.ModelConfig(**{**rest, "upstream_id": m.get("upstream_id", m["id"]),
                                "aliases": tuple(m.get("aliases") or ()),
                                "prices": c.Prices(**m.get("prices_usd_per_million", {}))})

    limits, cache = tree.get("limits_defaults", {}), tree.get("cache", {})
    images = c.ImagesConfig(**{**tree.get("images", {}), "s3": c.S3Config(**tree.get("images", {}).get("s3", {}))})
    upstream_timeout_s = tree.get("upstream", {}).get("timeout_s", c.UpstreamConfig().timeout_s)
    tree["server"] = {"shutdown_timeout_s": upstream_timeout_s + 15, **tree.get("server", {})}
    return c.Config(
        **{name: cls(**tree.get(name, {})) for name, cls in _SIMPLE.items()},
        models=tuple(model(m) for m in models) if models is not None else (DEFAULT_MODEL,),
        teams=tuple(c.Team(name=t["name"], key_hashes=tuple(t.get("keys") or ()),
                           limits=c.Limits(**{**limits, **t.get("limits", {})}),
                           quota=c.Quota(**t.get("quota", {})),
                           cache=c.CacheConfig(**{**cache, **t.get("cache", {})}),
                           images=replace(images, **t.get("images", {})))
                    for _, t in teams),
        images=images,
        admin=c.AdminConfig(key_hashes=tuple(tree.get("admin", {}).get("keys") or ())),
        tracing=c.TracingConfig(**tree["tracing"]) if "tracing" in tree else None,
        account=_account(tree["account"]) if "account" in tree else None)


def _check_images(images: dict, teams: list[tuple[str, dict]], problems: list[str]) -> None:
    """Links need a signing key when anything delivers them; presigned S3 links live a week at
    most; S3 storage needs the ``s3`` extra."""
    urls = [path for path, i in [("images", images), *teams] if i.get("delivery") == "url"]
    key = images.get("signing_key", "")
    if urls and not key and not any(p.startswith("images.signing_key:") for p in problems):  # not twice
        problems.append(f"images.signing_key: is required when {urls[0]}.delivery is url "
                        f"(write ${{IMAGE_URL_SIGNING_KEY}}; make one with `openssl rand -hex 32`)")
    elif key and len(key) < MIN_SIGNING_KEY:
        problems.append(f"images.signing_key: must be at least {MIN_SIGNING_KEY} characters")
    if not images.get("storage", "store").startswith("s3://"):
        return
    if importlib.util.find_spec("aiobotocore") is None:
        problems.append("images.storage: s3:// needs the s3 extra: pip install 'image-gateway[s3]'")
    if images.get("s3", {}).get("presign", True):
        problems.extend(f"{path}.url_ttl_s: must be at most {MAX_PRESIGN_S} (a week) with presigned S3 links"
                        for path, i in [("images", images), *teams] if i.get("url_ttl_s", 0) > MAX_PRESIGN_S)


def _account(a: dict) -> c.Account | None:
    """``account:`` as configured; None when it sets no limit at all (nothing to check)."""
    account = c.Account(limits=c.Limits(**a.get("limits", {})), quota=c.Quota(**a.get("quota", {})))
    return None if account == c.Account() else account


# ---- text -> data --------------------------------------------------------------------------
class _Loader(yaml.SafeLoader):
    """Safe YAML with only true/false as booleans (so `mode: off` is the string "off") and
    duplicate keys recorded instead of silently keeping the last."""

    duplicates: list[str]  # "line N: duplicate key ..." found while constructing; set per load
    yaml_implicit_resolvers = {
        ch: [(tag, rx) for tag, rx in rs if tag != "tag:yaml.org,2002:bool"]
        for ch, rs in yaml.SafeLoader.yaml_implicit_resolvers.items()}

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        keys = [k for k, _ in node.value if isinstance(k, yaml.ScalarNode)]
        self.duplicates += [f"line {k.start_mark.line + 1}: duplicate key '{k.value}'"
                            for i, k in enumerate(keys) if k.value in {p.value for p in keys[:i]}]
        return super().construct_mapping(node, deep)


_Loader.add_implicit_resolver("tag:yaml.org,2002:bool",
                              re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


def _substitute(text: str, env: Mapping[str, str]) -> tuple[str, dict[str, tuple[int, str]]]:
    """The text with references replaced; unresolved ones become sentinels -> (line, problem)."""
    tag, pending = f"__gateway_unresolved_{secrets.token_hex(6)}_", {}

    def replace(m: re.Match) -> str:
        if m.group(1):
            return "$"
        name, default, value = m.group(2), m.group(3), env.get(m.group(2) or "")
        if name and default is not None:
            return value or default
        if name and value is not None:
            return value
        sentinel = f"{tag}{len(pending)}__"
        what = f"environment variable {name} is not set" if name else \
            f"malformed reference {m.group(0)!r} (write ${{VAR}} or ${{VAR:-default}})"
        pending[sentinel] = (text.count("\n", 0, m.start()) + 1, what)
        return sentinel

    return _REF.sub(replace, text), pending


def _mark_unresolved(node: Any, path: str, pending: dict, problems: list[str]) -> Any:
    """Report each sentinel at its key path and replace its value with ``_UNSET``."""
    def report(s: str, where: str) -> bool:
        hits = [what for sentinel, (_, what) in pending.items() if sentinel in s]
        problems.extend(f"{where or 'config'}: {what}" for what in hits)
        return bool(hits)

    if isinstance(node, dict):
        return {k: _mark_unresolved(v, _join(path, k), pending, problems)
                for k, v in node.items() if not (isinstance(k, str) and report(k, _join(path, k)))}
    if isinstance(node, list):
        return [_mark_unresolved(v, f"{path}[{i}]", pending, problems) for i, v in enumerate(node)]
    return _UNSET if isinstance(node, str) and report(node, path) else node


def _read_yaml(text: str) -> tuple[Any, list[str]]:
    loader = _Loader(text)  # raises ReaderError on a character YAML does not allow
    loader.duplicates = []
    try:
        return loader.get_single_data(), loader.duplicates
    finally:
        loader.dispose()


def load_text(text: str, env: Mapping[str, str]) -> c.Config:
    """Substitute ``${VAR}`` from ``env``, parse the YAML and check it; raise ``ConfigError``."""
    text, pending = _substitute(text, env)
    try:
        data, problems = _read_yaml(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        pos = getattr(e, "position", None)  # ReaderError
        where = (f"line {mark.line + 1}, column {mark.column + 1}" if mark else
                 f"line {text.count(chr(10), 0, pos) + 1}" if pos is not None else "config")
        said = ", ".join(filter(None, (getattr(e, "context", None), getattr(e, "problem", None))))
        raise c.ConfigError([f"{where}: YAML syntax error: {said or str(e).splitlines()[0]}"]
                            + [f"line {n}: {problem}" for n, problem in pending.values()]) from None
    return _check(_mark_unresolved(data, "", pending, problems), problems)


def parse(data: Any) -> c.Config:
    """Check already-parsed YAML data (``None`` = all defaults); raise ``ConfigError``."""
    return _check(data, [])


def check_config(path: str | os.PathLike, env: Mapping[str, str] | None = None) -> list[str]:
    """Every problem of the config file at ``path`` (``[]`` = valid); ``env`` defaults to the
    process environment, read by ``config.load``."""
    try:
        c.load(path, env)
    except c.ConfigError as e:
        return e.problems
    except (OSError, UnicodeDecodeError) as e:
        return [f"{os.fspath(path)}: cannot read: {getattr(e, 'strerror', None) or e}"]
    return []


# Keys whose value is a secret -> the variable the example config takes it from.
_SECRETS = {"upstream.api_key": "UPSTREAM_API_KEY", "images.signing_key": "IMAGE_URL_SIGNING_KEY"}


def literal_secrets(path: str | os.PathLike) -> list[str]:
    """Warnings, by key path, for secrets written in the file instead of taken from ``${VAR}``
    (a ``${VAR:-default}`` default counts as written): a file gets copied and committed.

    The file is read again with an empty environment, so every reference stays a sentinel: a
    value holding one came from the environment. An unreadable file gives none (``check_config``
    says why)."""
    try:
        with open(path, encoding="utf-8") as f:
            text, pending = _substitute(f.read(), {})
        data = _read_yaml(text)[0]
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return []
    warnings = []
    for key_path, var in _SECRETS.items():
        value = data
        for key in key_path.split("."):
            value = value.get(key) if isinstance(value, dict) else None
        if isinstance(value, str) and value.strip() and not any(s in value for s in pending):
            warnings.append(f"{key_path}: a secret written in the file; secrets belong in the "
                            f"environment: write ${{{var}}} and export {var}")
    return warnings
