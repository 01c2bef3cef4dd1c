"""create_app(config): the aiohttp application, its shared resources, middleware and routes."""
from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from gateway import store as store_mod
from gateway.cache import Cache
from gateway.config import Config, TracingConfig
from gateway.http.chat import chat_completions
from gateway.http.files import image_file
from gateway.http.images import edits, generations
from gateway.http.health import healthz, metrics_exposition, readyz
from gateway.http.middleware import (
    TRACING,
    error_middleware,
    lifecycle_middleware,
    observe_middleware,
    request_id_middleware,
    stamp_request_id,
    trace_middleware,
)
from gateway.http.runtime import Runtime
from gateway.http.state import CACHE, CLOCK, IMAGE_STORAGE, LIMITER, METRICS, RUNTIME, STORE, UPSTREAM
from gateway.images.storage import open_storage
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
    config_path: str | None = None,
) -> web.Application:
    """The gateway app. ``store`` and ``clock`` are injectable for tests; the app owns and
    closes only what it opened itself. ``config_path``: the file a reload reads again."""
    app = web.Application(
        middlewares=[request_id_middleware, *([trace_middleware] if config.tracing else []),  # outermost first
                     observe_middleware, error_middleware, lifecycle_middleware],
        client_max_size=config.server.max_body_bytes,
    )
    app[CLOCK] = clock or time.time
    app[METRICS] = metrics = Metrics(
        registry=registry,
        enabled=config.server.metrics,
        model_ids=[m.id for m in config.models],
        teams=[t.name for t in config.teams],
        account=config.account is not None,
    )
    app[RUNTIME] = Runtime(config, metrics, path=config_path)
    app.cleanup_ctx.append(_resources(store, clock))
    app.on_response_prepare.append(stamp_request_id)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/images/generations", generations)
    app.router.add_post("/v1/images/edits", edits)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/usage", team_usage)
    app.router.add_get("/v1/images/files/{name}", image_file)
    app.router.add_get("/admin/usage", admin_usage)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    if config.server.metrics_port is None:  # else only gateway.server's metrics site serves them
        app.router.add_get(config.server.metrics_path, metrics_exposition)
    return app


def _resources(injected_store: Any, clock: Callable[[], float] | None):
    async def ctx(app: web.Application):
        runtime, metrics = app[RUNTIME], app[METRICS]
        config = runtime.snapshot.config
        store = injected_store or await store_mod.connect(config.store.url, on_error=metrics.store_error)
        upstream = Upstream(config.upstream, metrics)
        await upstream.start()
        app[STORE] = store
        app[UPSTREAM] = upstream
        app[LIMITER] = limiter = Limiter(store, config, on_error=config.store.on_error, metrics=metrics, clock=clock)
        limiter.start()  # renews leases, retries failed settles
        runtime.limiter = limiter
        app[CACHE] = Cache(store, **({"clock": clock} if clock else {}))
        app[IMAGE_STORAGE] = images = await open_storage(config.images, store)
        if config.tracing is not None:
            app[TRACING] = _tracing(config.tracing)
        try:
            yield
        finally:
            await limiter.close()
            await upstream.close()
            await images.close()
            if injected_store is None:
                await store.close()
            if TRACING in app:  # the last spans go out (blocking HTTP: off the loop)
                await asyncio.to_thread(app[TRACING].shutdown)

    return ctx


def _tracing(cfg: TracingConfig):
    """The tracer provider; OpenTelemetry is imported here, only when the config asks for it."""
    try:
        from gateway.observability.tracing import Tracing
    except ImportError as exc:
        raise RuntimeError(f"tracing is configured but OpenTelemetry is not installed ({exc.name}): "
                           "pip install 'image-gateway[otel]'") from None
    return Tracing(cfg)
