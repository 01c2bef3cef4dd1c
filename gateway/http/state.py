"""Typed application keys: the app's shared state, set once in ``app.create_app``."""
from __future__ import annotations

from typing import Any

from aiohttp import web

from gateway.config import Config
from gateway.http.record import RequestRecord

CONFIG = web.AppKey("config", Config)
STORE = web.AppKey("store", Any)  # store.Store
LIMITER = web.AppKey("limiter", Any)  # limits.Limiter
CACHE = web.AppKey("cache", Any)  # cache.Cache
METRICS = web.AppKey("metrics", Any)  # metrics.Metrics
UPSTREAM = web.AppKey("upstream", Any)  # upstream.Upstream
AUTH = web.AppKey("auth", Any)  # auth.Authenticator
CLOCK = web.AppKey("clock", Any)  # () -> epoch seconds; time.time unless a test injects one
RECORD = web.RequestKey("record", RequestRecord)  # per request: its facts, for metrics and the log
