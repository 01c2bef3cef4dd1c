"""Typed application keys: the app's shared state, set once in ``http.app.create_app``."""
from __future__ import annotations

from typing import Callable

from aiohttp import web

from gateway.cache import Cache
from gateway.config import Config
from gateway.http.auth import Authenticator
from gateway.http.record import RequestRecord
from gateway.limits.limiter import Limiter
from gateway.observability.metrics import Metrics
from gateway.store import Store
from gateway.upstream.client import Upstream

CONFIG = web.AppKey("config", Config)
STORE = web.AppKey("store", Store)
LIMITER = web.AppKey("limiter", Limiter)
CACHE = web.AppKey("cache", Cache)
METRICS = web.AppKey("metrics", Metrics)
UPSTREAM = web.AppKey("upstream", Upstream)
AUTH = web.AppKey("auth", Authenticator)
CLOCK = web.AppKey("clock", Callable[[], float])  # epoch seconds; time.time unless a test injects one
RECORD = web.RequestKey("record", RequestRecord)  # per request: its facts, for metrics and the log
