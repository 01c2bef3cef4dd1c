"""YAML text -> ``Config``: environment substitution, a schema walk, cross-checks, building.

The walk is ``gateway.config.schema.SCHEMA``; the checks that span keys (unique names, images'
signing key and S3 rules) are here. Every problem is collected as ``key.path: what is wrong``
and raised together at the end.

``${VAR}`` / ``${VAR:-default}`` (default also when VAR is empty; ``$${`` is a literal ``${``)
are replaced in the raw text. An unset variable or a malformed reference becomes a sentinel
that the walk reports at its key path, so one that appears only in a comment is harmless.
Values are never echoed into problems: they may be secrets.
"""
from __future__ import annotations

import importlib.util
import os
import re
import secrets
from dataclasses import replace
from typing import Any, Mapping

import yaml

from gateway import config as c
from gateway.config.schema import SCHEMA, SKIP, UNSET, join

# `$${` (an escaped `$`) | `${VAR}` or `${VAR:-default}` | anything else after `${` (malformed)
_REF = re.compile(r"\$(\$)(?=\{)|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}|\$\{[^}\n]*\}?")
DEFAULT_MODEL = c.ModelConfig(
    id=c.DEFAULT_MODEL_ID, upstream_id=c.DEFAULT_MODEL_ID,
    aliases=("gemini-3-pro-image-preview",), prices=c.Prices(2.0, 12.0, 120.0))
MIN_SIGNING_KEY = 32  # characters: an HMAC key must not be guessable
MAX_PRESIGN_S = 7 * 86400  # SigV4 presigned URLs live at most a week
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
    return [(i, v) for i, v in enumerate(items or ()) if v is not SKIP]


def _check(data: Any, problems: list[str]) -> c.Config:
    """Walk, cross-check and build; raise ``ConfigError`` with ``problems`` if there are any."""
    tree = SCHEMA({} if data is None else data, "", problems)
    if tree is SKIP:
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
    """Report each sentinel at its key path and replace its value with ``UNSET``."""
    def report(s: str, where: str) -> bool:
        hits = [what for sentinel, (_, what) in pending.items() if sentinel in s]
        problems.extend(f"{where or 'config'}: {what}" for what in hits)
        return bool(hits)

    if isinstance(node, dict):
        return {k: _mark_unresolved(v, join(path, k), pending, problems)
                for k, v in node.items() if not (isinstance(k, str) and report(k, join(path, k)))}
    if isinstance(node, list):
        return [_mark_unresolved(v, f"{path}[{i}]", pending, problems) for i, v in enumerate(node)]
    return UNSET if isinstance(node, str) and report(node, path) else node


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
