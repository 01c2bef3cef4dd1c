"""create_app(config): the aiohttp application, its shared resources, middleware and routes."""
from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from typing import Any, Callable

import orjson
from aiohttp import web

from gateway import store as store_mod
from gateway.observability.accesslog import write_access_log
from gateway.http.auth import Authenticator
from gateway.cache import Cache
from gateway.config import Config
from gateway.errors import GatewayError, InvalidRequest, MethodNotAllowed, NotFound, RequestTooLarge, error_response
from gateway.limits.ledger import team_usage_report
from gateway.limits.limiter import Limiter
from gateway.observability.metrics import Metrics
from gateway.http.chat import chat_completions
from gateway.http.record import Phase, RequestRecord
from gateway.http.state import AUTH, CACHE, CLOCK, CONFIG, LIMITER, METRICS, RECORD, STORE, UPSTREAM
from gateway.upstream.client import Upstream

log = logging.getLogger(__name__)

REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
READY_TIMEOUT_S = 1.0
UNMETERED_PATHS = frozenset({"/healthz", "/readyz"})  # probes: neither metrics nor access log


def create_app(
    config: Config,
    *,
    store: Any = None,
    clock: Callable[[], float] | None = None,
    registry: Any = None,
) -> web.Application:
    """The gateway app. ``store`` and ``clock`` are injectable for tests; the app owns and
    closes only what it opened itself."""
    app = web.Application(middlewares=[gateway_middleware], client_max_size=config.server.max_body_bytes)
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
    app.on_response_prepare.append(_stamp_request_id)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/usage", team_usage)
    app.router.add_get("/admin/usage", admin_usage)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    if config.server.metrics_path:
        app.router.add_get(config.server.metrics_path, metrics_route)
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


@web.middleware
async def gateway_middleware(request: web.Request, handler) -> web.StreamResponse:
    """Request id, the provider's error shape for every failure, metrics and the access log."""
    incoming = request.headers.get("X-Request-ID", "")
    rec = RequestRecord(
        request_id=incoming if REQUEST_ID_RE.match(incoming) else uuid.uuid4().hex,
        method=request.method,
        path=request.path,
    )
    request[RECORD] = rec
    try:
        response = await handler(request)
    except GatewayError as err:
        response = _error(rec, err)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = _error(rec, _http_error(exc))
    except web.RequestPayloadError:  # aiohttp could not decode the body (chunks, gzip) as it was read
        response = _error(rec, InvalidRequest("The request body could not be read: its chunked or content "
                                              "encoding is not valid."))
    except asyncio.CancelledError:
        _client_gone(rec)
        _observe(request, rec)
        raise
    except ConnectionResetError:  # the client went away and a write found out
        _client_gone(rec)
        _observe(request, rec)
        return web.Response(status=499)  # aiohttp drops it quietly on the closed transport
    except Exception:
        log.exception("unhandled error (request %s)", rec.request_id)
        response = _error(rec, GatewayError("The gateway failed to handle this request."))
    rec.status = response.status
    if type(response) is web.Response:  # a whole body, written by aiohttp after this returns
        rec.bytes_out += response.content_length or 0
    _observe(request, rec)
    return response


def _client_gone(rec: RequestRecord) -> None:
    """A client that leaves before the last byte is a 499; one that leaves after it (curl closes
    at once) got its answer, and the status it was sent stays (noted when the answer started)."""
    if rec.phase < Phase.ANSWER_FINISHED:
        rec.status = 499


def _error(rec: RequestRecord, err: GatewayError) -> web.Response:
    rec.error_code = err.code
    return error_response(err)


def _http_error(exc: web.HTTPException) -> GatewayError:
    """aiohttp's own refusals (no such route, wrong method, body too large) in our shape."""
    if exc.status == 404:
        return NotFound("No route for this path. The gateway serves /v1/chat/completions, /v1/models and /v1/usage.")
    if exc.status == 405:
        return MethodNotAllowed("This route does not take that method.")
    if exc.status == 413:
        return RequestTooLarge("The request body is over the gateway's limit.")
    err = InvalidRequest(exc.reason or "The request was refused.")
    err.status = exc.status
    return err


def _observe(request: web.Request, rec: RequestRecord) -> None:
    if rec.path in UNMETERED_PATHS or rec.path == request.app[CONFIG].server.metrics_path:
        return
    rec.finish()
    request.app[METRICS].observe_request(rec)
    if request.app[CONFIG].logging.access_log:
        write_access_log(rec)


async def _stamp_request_id(request: web.Request, response: web.StreamResponse) -> None:
    rec = request.get(RECORD)
    if rec is not None:
        response.headers["x-request-id"] = rec.request_id


async def list_models(request: web.Request) -> web.Response:
    request[RECORD].team = request.app[AUTH].team(request).name
    created = int(time.time())
    data = [
        {"id": name, "object": "model", "created": created, "owned_by": model.id.split("/", 1)[0] if "/" in model.id else "gateway"}
        for model in request.app[CONFIG].models
        for name in (model.id, *model.aliases)
    ]
    return _json({"object": "list", "data": data})


async def team_usage(request: web.Request) -> web.Response:
    team = request.app[AUTH].team(request)
    request[RECORD].team = team.name
    return _json(await team_usage_report(request.app[STORE], team, request.app[CLOCK]()))


async def admin_usage(request: web.Request) -> web.Response:
    request.app[AUTH].admin(request)
    now = request.app[CLOCK]()
    teams = [await team_usage_report(request.app[STORE], team, now) for team in request.app[CONFIG].teams]
    return _json({"object": "list", "data": teams})


async def healthz(request: web.Request) -> web.Response:
    return _json({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    try:
        await asyncio.wait_for(request.app[STORE].ping(), READY_TIMEOUT_S)
    except Exception as exc:  # any failure means not ready; the reason is what operators need
        reason = "store: " + (str(exc) or type(exc).__name__)
        return _json({"status": "unavailable", "reason": reason}, status=503)
    return _json({"status": "ok", "store": request.app[CONFIG].store.url.split("://", 1)[0]})


async def metrics_route(request: web.Request) -> web.Response:
    body, content_type = request.app[METRICS].exposition()
    response = web.Response(body=body)
    response.headers["Content-Type"] = content_type
    return response


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")
