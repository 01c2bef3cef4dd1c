"""Typed application keys: the app's shared state, set once in ``http.app.create_app``. What
follows the config (it changes on reload) is only in ``RUNTIME``; a request reads it from its
own ``SNAPSHOT``."""
from __future__ import annotations

from typing import Callable

from aiohttp import web

from gateway.cache import Cache
from gateway.http.record import RequestRecord
from gateway.http.runtime import Runtime, Snapshot
from gateway.images.storage import ImageStorage
from gateway.limits.limiter import Limiter
from gateway.observability.metrics import Metrics
from gateway.store import Store
from gateway.upstream.client import Upstream

RUNTIME = web.AppKey("runtime", Runtime)
STORE = web.AppKey("store", Store)
LIMITER = web.AppKey("limiter", Limiter)
CACHE = web.AppKey("cache", Cache)
METRICS = web.AppKey("metrics", Metrics)
UPSTREAM = web.AppKey("upstream", Upstream)
IMAGE_STORAGE = web.AppKey("image_storage", ImageStorage)  # generated images behind links (images.storage)
CLOCK = web.AppKey("clock", Callable[[], float])  # epoch seconds; time.time unless a test injects one
RECORD = web.RequestKey("record", RequestRecord)  # per request: its facts, for metrics and the log
SNAPSHOT = web.RequestKey("snapshot", Snapshot)  # per request: the config it runs under, to its end
