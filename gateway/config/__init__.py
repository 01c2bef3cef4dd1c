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
    metrics_port: int | None = None  # set: metrics_path only on this port (a NetworkPolicy filters by port)
    read_timeout_s: float = 30  # a client that sends no byte of its headers or body this long is cut off
    drain_delay_s: float = 5  # after SIGTERM: /readyz says 503 at once, new connections still taken this long
    shutdown_timeout_s: float = 315  # after SIGTERM: in-flight requests get this long (loader: upstream.timeout_s + 15)
    watch_config: bool = False  # reload when the config file changes (a Kubernetes ConfigMap update)

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
    usd_per_day: float | None = None  # the account's only: a team's schema has no such key
    usd_per_month: float | None = None


@dataclass(frozen=True, slots=True)
class Account:
    """The one shared upstream account, over all teams together (``account:``); only
    requests_per_minute, tokens_per_minute and max_concurrent of its ``limits`` apply."""

    limits: Limits = Limits()
    quota: Quota = Quota()


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
class S3Config:
    endpoint_url: str | None = None  # an S3-compatible service (MinIO, R2, ...); None = AWS
    region: str | None = None
    presign: bool = True  # links are the object store's presigned GET URLs, not the gateway's route


@dataclass(frozen=True, slots=True)
class ImagesConfig:
    """Generated images: inline base64 as the provider sends them, or stored once and linked."""

    delivery: str = "inline"  # inline | url
    storage: str = "store"  # store: the gateway's store; or s3://bucket/prefix
    url_ttl_s: int = 86400  # how long a link works (and the stored image at least lives)
    public_base_url: str | None = None  # how clients reach the gateway; None: the request's own
    signing_key: str = field(default="", repr=False)  # HMAC key of the links; required when any delivery is url
    max_n: int = 4  # the most images one /v1/images/* request may ask for
    s3: S3Config = S3Config()


@dataclass(frozen=True, slots=True)
class Team:
    name: str
    key_hashes: tuple[str, ...] = ()  # lowercase sha256 hex of each key, without the prefix
    limits: Limits = Limits()
    quota: Quota = Quota()
    cache: CacheConfig = CacheConfig()  # the global cache config with this team's overrides
    images: ImagesConfig = ImagesConfig()  # the global images config with this team's overrides


@dataclass(frozen=True, slots=True)
class AdminConfig:
    key_hashes: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class TracingConfig:
    """OpenTelemetry traces over OTLP/HTTP to ``<otlp_endpoint>/v1/traces`` (the ``otel`` extra)."""

    otlp_endpoint: str
    sample_ratio: float = 1.0  # of the traces this gateway starts; a client's sampled flag is followed
    service_name: str = "image-gateway"


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
    images: ImagesConfig = ImagesConfig()
    account: Account | None = None  # None: no account-wide limits
    logging: LoggingConfig = LoggingConfig()
    tracing: TracingConfig | None = None  # None: no tracing, nothing of OpenTelemetry imported
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
