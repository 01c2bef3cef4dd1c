"""The app's middleware, one job each, outermost first: ``request_id_middleware`` (the record every
later step writes into), ``observe_middleware`` (the status a request ends with, its metrics and
access line), ``error_middleware`` (every failure answered in the provider's shape),
``lifecycle_middleware`` (the request against the replica's drain). ``observe``
is also called by the server for the requests no handler saw (malformed HTTP). When tracing is
configured, ``trace_middleware`` goes between the first two: absent otherwise, it costs nothing."""
from __future__ import annotations

import asyncio
import logging
import re
from typing import TYPE_CHECKING

from aiohttp import web
from aiohttp.payload import Payload

from gateway.errors import (
    GatewayError,
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    RequestTooLarge,
    ShuttingDown,
    error_response,
)
from gateway.http.record import Phase, RequestRecord, new_request_id
from gateway.http.state import METRICS, RECORD, RUNTIME, SNAPSHOT
from gateway.observability.accesslog import current_request, write_access_log

if TYPE_CHECKING:  # OpenTelemetry is imported only when tracing is configured
    from gateway.observability.tracing import Tracing  # noqa: F401  (TRACING's type, named as a string)

log = logging.getLogger(__name__)

REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
UNMETERED_PATHS = frozenset({"/healthz", "/readyz"})  # probes: neither metrics nor access log (nor trace)
TRACING = web.AppKey["Tracing"]("tracing")  # set by the app's resources when tracing is configured


@web.middleware
async def request_id_middleware(request: web.Request, handler) -> web.StreamResponse:
    """The client's request id when it is a sane one, else a new one; the request's record; and
    the config snapshot it runs under to its end, whatever a reload does meanwhile."""
    request[SNAPSHOT] = request.app[RUNTIME].snapshot
    incoming = request.headers.get("X-Request-ID", "")
    request[RECORD] = rec = RequestRecord(
        request_id=incoming if REQUEST_ID_RE.match(incoming) else new_request_id(),
        method=request.method,
        path=request.path,
    )
    token = current_request.set(rec)  # every log line of this request names it
    try:
        return await handler(request)
    finally:
        current_request.reset(token)


@web.middleware
async def trace_middleware(request: web.Request, handler) -> web.StreamResponse:
    """The request's server span (continuing the client's ``traceparent``), ended with the status
    ``observe_middleware`` settled on, on every way out; probes and scrapes are not traced."""
    rec = request[RECORD]
    if rec.path in UNMETERED_PATHS or rec.path == request[SNAPSHOT].config.server.metrics_path:
        return await handler(request)
    resource = request.match_info.route.resource  # None: no route matched (a 404)
    trace = rec.trace = request.app[TRACING].start(request.headers, rec, resource and resource.canonical)
    rec.trace_id = trace.trace_id
    try:
        return await handler(request)
    finally:
        trace.finish(rec)


async def stamp_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare``: streamed answers are prepared inside the handler, so the headers
    are set here rather than on the middleware's way out. While the replica drains, every answer
    closes its connection: the client's next request opens a new one, to another replica (a
    kept-alive one would meet the closed listener's 503, and a proxy does not retry a POST)."""
    rec = request.get(RECORD)
    if rec is not None:
        response.headers["x-request-id"] = rec.request_id
    if request.app[RUNTIME].draining:
        response.force_close()
        response.headers["Connection"] = "close"


@web.middleware
async def observe_middleware(request: web.Request, handler) -> web.StreamResponse:
    """The status a request ends with (499 for a client gone before the last byte), then its
    metrics and access line: once, on every way out."""
    rec = request[RECORD]
    try:
        response = await handler(request)
    except asyncio.CancelledError:
        _client_gone(rec)
        observe(request.app, rec)
        raise
    except ConnectionResetError:  # the client went away and a write found out
        _client_gone(rec)
        observe(request.app, rec)
        return web.Response(status=499)  # aiohttp drops it quietly on the closed transport
    rec.status = response.status
    if type(response) is web.Response:  # a whole body, written by aiohttp after this returns
        body = response.body
        rec.bytes_out += body.size if isinstance(body, Payload) else len(body or b"")
    observe(request.app, rec)
    return response


def answered(request: web.BaseRequest) -> bool:
    """Whether the request's client has every byte of its answer (its handler may still be
    settling, caching, logging)."""
    rec = request.get(RECORD)
    return rec is not None and rec.phase >= Phase.ANSWER_FINISHED


def _client_gone(rec: RequestRecord) -> None:
    """A client that leaves before the last byte is a 499; one that leaves after it (curl closes
    at once) got its answer, and the status it was sent stays (noted when the answer started)."""
    if rec.phase < Phase.ANSWER_FINISHED:
        rec.status = 499


def observe(app: web.Application, rec: RequestRecord) -> None:
    """A finished request into the metrics and the access log (probes and scrapes excepted)."""
    config = app[RUNTIME].snapshot.config
    if rec.path in UNMETERED_PATHS or rec.path == config.server.metrics_path:
        return
    rec.finish()
    app[METRICS].observe_request(rec)
    if config.logging.access_log:
        write_access_log(rec)


@web.middleware
async def error_middleware(request: web.Request, handler) -> web.StreamResponse:
    """Every failure as the provider's JSON error, unless the answer already started: then only
    a cut body (a second status line would land inside the first answer's body). A departed
    client's (cancelled, reset) is left to ``observe_middleware``."""
    rec = request[RECORD]
    try:
        return await handler(request)
    except ConnectionResetError:
        raise
    except GatewayError as exc:
        err = exc
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        err = _http_error(exc, request.app)
    except web.RequestPayloadError:  # aiohttp could not decode the body (chunks, gzip) as it was read
        err = InvalidRequest("The request body could not be read: its chunked or content encoding is not valid.")
    except Exception:
        log.exception("unhandled error (request %s)", rec.request_id)
        err = GatewayError("The gateway failed to handle this request.")
    if rec.phase >= Phase.ANSWER_STARTED:  # a status line is out: a second one would land in the body
        log.warning("answer cut short after it started (request %s): %s", rec.request_id, err.code)
        return _cut_answer(request, rec, err.code)
    rec.error_code = err.code
    return error_response(err)


def _cut_answer(request: web.Request, rec: RequestRecord, code: str) -> web.Response:
    """End an answer whose status line went out by closing its connection (the client sees a cut
    body). The Response returned is never written: aiohttp finds the transport closing."""
    rec.error_code = code
    if request.transport is not None:
        request.transport.close()
    return web.Response(status=rec.status)


def _http_error(exc: web.HTTPException, app: web.Application) -> GatewayError:
    """aiohttp's own refusals (no such route, wrong method, body too large) in our shape."""
    if exc.status == 404:
        return NotFound(f"No route for this path. The gateway serves {_served_routes(app)}.")
    if exc.status == 405:
        return MethodNotAllowed("This route does not take that method.")
    if exc.status == 413:
        return RequestTooLarge("The request body is over the gateway's limit.")
    err = InvalidRequest(exc.reason or "The request was refused.")
    err.status = exc.status
    return err


def _served_routes(app: web.Application) -> str:
    """Every route the app serves, read from its router (``app.create_app`` is the one list)."""
    return ", ".join(f"{route.method} {route.resource.canonical}" for route in app.router.routes()
                     if route.method != "HEAD" and route.resource is not None)


@web.middleware
async def lifecycle_middleware(request: web.Request, handler) -> web.StreamResponse:
    """The request against the replica's drain: refused with 503 ``shutting_down`` once the
    listener has closed (it came on a kept-alive connection); counted while it runs, so the drain
    waits for it; ended with 503 ``shutting_down`` when the shutdown timeout cancels it before its
    answer started (``chat`` ends a started answer itself; ``error_middleware`` cuts any other).
    The probes are exempt: ``/readyz`` says ``draining`` to the end."""
    runtime = request.app[RUNTIME]
    if request.path in UNMETERED_PATHS:
        return await handler(request)
    if runtime.closed:
        raise ShuttingDown()
    with runtime.running(asyncio.current_task(), request[RECORD]):
        try:
            return await handler(request)
        except asyncio.CancelledError:
            err = runtime.cut_off()
            if err is None:
                raise
            raise err from None
