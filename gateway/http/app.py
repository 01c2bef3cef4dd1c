"""create_app(config): the aiohttp application, its shared resources, middleware and routes."""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from gateway import store as store_mod
from gateway.cache import Cache
from gateway.config import Config
from gateway.http.auth import Authenticator
from gateway.http.chat import chat_completions
from gateway.http.health import healthz, metrics_exposition, readyz
from gateway.http.middleware import (
    error_middleware,
    observe_middleware,
    request_id_middleware,
    stamp_request_id,
)
from gateway.http.state import (
    AUTH,
    CACHE,
    CLOCK,
    CONFIG,
    LIMITER,
    METRICS,
    STORE,
    UPSTREAM,
)
from gateway.http.usage import admin_usage, list_models, team_usage
from gateway.limits.limiter import Limiter
from gateway.observability.metrics import Metrics
from gateway.upstream.client import Upstream


def create_app(
    config: Config,
    *,
    store: Any = None,
    clock: Callable[[], float] | None = None,
    registry: Any = None,
) -> web.Application:
    """The gateway app. ``store`` and ``clock`` are injectable for tests; the app owns and
    closes only what it opened itself."""
    app = web.Application(
        middlewares=[request_id_middleware, observe_middleware, error_middleware],  # outermost first
        client_max_size=config.server.max_body_bytes,
    )
    app[CONFIG] = config
    app[CLOCK] = clock or time.time
    app[AUTH] = Authenticator(config)
    app[METRICS] = Metrics(
        registry=registry,
        enabled=config.server.metrics,
        model_ids=[m.id for m in config.models],
        teams=[t.name for t in config.teams],
    )
    app.cleanup_ctx.append(_resources(store, clock))
    app.on_response_prepare.append(stamp_request_id)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/usage", team_usage)
    app.router.add_get("/admin/usage", admin_usage)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    if config.server.metrics_path:
        app.router.add_get(config.server.metrics_path, metrics_exposition)
    return app


def _resources(injected_store: Any, clock: Callable[[], float] | None):
    async def ctx(app: web.Application):
        config, metrics = app[CONFIG], app[METRICS]
        store = injected_store or await store_mod.connect(config.store.url, on_error=metrics.store_error)
        upstream = Upstream(config.upstream, metrics)
        await upstream.start()
        app[STORE] = store
        app[UPSTREAM] = upstream
        app[LIMITER] = limiter = Limiter(store, config, on_error=config.store.on_error, metrics=metrics, clock=clock)
        limiter.start()  # renews leases, retries failed settles
        app[CACHE] = Cache(store, **({"clock": clock} if clock else {}))
        try:
            yield
        finally:
            await limiter.close()
            await upstream.close()
            if injected_store is None:
                await store.close()

    return ctx
