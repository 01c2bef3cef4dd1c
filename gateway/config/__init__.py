"""The gateway's configuration: frozen dataclasses and the one loader.

This module is the only reader of the environment: ``${VAR}`` and ``${VAR:-default}`` in the
YAML text are replaced before parsing, so secrets never have to live in the file. Every
problem is reported with its key path (``teams[2].limits.requests_per_minute: ...``) and
unknown keys are errors, so a typo never passes silently.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Mapping

DEFAULT_MODEL_ID = "google/gemini-3-pro-image-preview"


class ConfigError(Exception):
    """Every problem found in a config, each as ``key.path: what is wrong``."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = "0.0.0.0"
    port: int = 8080
    max_body_mb: float = 100
    metrics_path: str = "/metrics"
    metrics: bool = True  # off only to measure the gateway without them
    read_timeout_s: float = 30  # a client that sends no byte of its headers or body this long is cut off

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    base_url: str = "https://api.yisu.com"
    api_key: str = ""
    timeout_s: float = 300  # one deadline per request, from admission: attempts, their waits, single-flight
    connect_timeout_s: float = 10
    max_retries: int = 2  # retried only what cannot have started: no connection, 429, 503 with Retry-After


@dataclass(frozen=True, slots=True)
class Prices:
    """US dollars per million tokens; image tokens are the image part of completion tokens."""

    prompt: float = 0.0
    completion: float = 0.0
    image: float = 0.0


@dataclass(frozen=True, slots=True)
class ModelConfig:
    id: str
    upstream_id: str
    aliases: tuple[str, ...] = ()
    prices: Prices = Prices()
    # Completion tokens reserved before the call when the request sets no max: one image
    # (1120 tokens at 1K/2K) plus the model's reasoning (~700-900).
    default_completion_tokens: int = 2200
    max_completion_tokens: int = 32768  # the model's output cap: a larger max_(completion_)tokens is a 400


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-team limits; ``None`` means unlimited."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    max_concurrent: int | None = None
    max_images_per_request: int = 14
    max_image_mb: float = 7

    @property
    def max_image_bytes(self) -> int:
        return int(self.max_image_mb * 1024 * 1024)


@dataclass(frozen=True, slots=True)
class Quota:
    tokens_per_day: int | None = None
    usd_per_month: float | None = None


@dataclass(frozen=True, slots=True)
class CacheConfig:
    mode: str = "deterministic"  # off | deterministic | always
    ttl_s: int = 86400
    max_entry_mb: float = 64
    scope: str = "team"  # team | global

    @property
    def max_entry_bytes(self) -> int:
        return int(self.max_entry_mb * 1024 * 1024)


@dataclass(frozen=True, slots=True)
class StoreConfig:
    url: str = "memory://"
    on_error: str = "open"  # open | closed
    lease_ttl_s: float = 15  # a max_concurrent slot of a dead replica comes back within this; renewed while its request lives


@dataclass(frozen=True, slots=True)
class Team:
    name: str
    key_hashes: tuple[str, ...] = ()  # lowercase sha256 hex of each key, without the prefix
    limits: Limits = Limits()
    quota: Quota = Quota()
    cache: CacheConfig = CacheConfig()  # the global cache config with this team's overrides


@dataclass(frozen=True, slots=True)
class AdminConfig:
    key_hashes: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class LoggingConfig:
    level: str = "info"  # debug | info | warning | error
    format: str = "json"  # json | text
    access_log: bool = True


@dataclass(frozen=True, slots=True)
class Config:
    server: ServerConfig = ServerConfig()
    upstream: UpstreamConfig = UpstreamConfig()
    models: tuple[ModelConfig, ...] = ()
    limits_defaults: Limits = Limits()
    store: StoreConfig = StoreConfig()
    cache: CacheConfig = CacheConfig()
    teams: tuple[Team, ...] = ()
    admin: AdminConfig = AdminConfig()
    logging: LoggingConfig = LoggingConfig()
    _model_index: Mapping[str, ModelConfig] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        index: dict[str, ModelConfig] = {}
        for m in self.models:
            for name in (m.id, *m.aliases):
                index[name] = m
        object.__setattr__(self, "_model_index", index)

    def model(self, name: str) -> ModelConfig | None:
        """The configured model for an id or alias, or None."""
        return self._model_index.get(name)


def load(path: str | os.PathLike, env: Mapping[str, str] | None = None) -> Config:
    """Read, substitute ``${VAR}`` from ``env`` (default ``os.environ``), parse and check."""
    from gateway.config.loader import load_text  # the schema walker lives beside, to keep this file short

    with open(path, encoding="utf-8") as f:
        text = f.read()
    return load_text(text, os.environ if env is None else env)
