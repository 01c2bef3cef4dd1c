"""The one seam to the provider: a shared keep-alive ``ClientSession``, retries, error mapping.

aiohttp's exceptions stop here, those raised while reading a body included: what leaves this
module is an ``UpstreamResponse`` (any status: the relay decides what the client sees) whose
read methods raise only ``GatewayError``s, or a ``GatewayError``:

    ClientConnectorError, ConnectionTimeoutError (never connected) -> UpstreamUnavailable (502)
    ClientResponseError from the parser (not HTTP, bad framing)   -> UpstreamBadResponse (502)
    ServerDisconnectedError, ClientOSError, ClientPayloadError     -> UpstreamUnavailable (502)
    asyncio.TimeoutError / ServerTimeoutError                      -> UpstreamTimeout (504)

A request the provider may have received is never sent again (it may bill each copy): only
what cannot have started is retried: a connection never made, a 429, and a 503 that carries
``Retry-After`` (the provider asking us to come back). Every attempt, and every wait between
them, fits in the request's one deadline; a wait that would pass it is not taken, and the last
answer is final. Every failed attempt is counted in ``gateway_upstream_errors_total`` here (a
returned 429 or 5xx too: its ``counted`` is set); a failure found later in an answer not yet
counted is counted by the handler, by the error's ``kind``: each failure once.
"""
from __future__ import annotations

import asyncio
import contextvars
import logging
import random
import sys
import time
from typing import TYPE_CHECKING, Any, Callable

import aiohttp
from multidict import CIMultiDict
from yarl import URL

from gateway import offload
from gateway.config import UpstreamConfig
from gateway.errors import GatewayError, UpstreamBadResponse, UpstreamTimeout, UpstreamUnavailable
from gateway.upstream.secrets import KeyGuard

if TYPE_CHECKING:  # OpenTelemetry is imported only when tracing is configured
    from gateway.observability.tracing import RequestTrace, UpstreamSpan

log = logging.getLogger(__name__)

BACKOFF_BASE_S = 0.25
BACKOFF_CAP_S = 8.0
MAX_RETRY_AFTER_S = 30.0


def translate(exc: BaseException) -> GatewayError:
    """The one mapping of an aiohttp or timeout error to what the client sees."""
    if isinstance(exc, aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError):
        return UpstreamUnavailable("The upstream could not be reached.")
    if isinstance(exc, asyncio.TimeoutError | aiohttp.ServerTimeoutError):
        return UpstreamTimeout("The upstream did not answer in time.")
    if isinstance(exc, aiohttp.ClientResponseError):  # the HTTP parser's: a reply that is not HTTP
        return UpstreamBadResponse("The upstream's reply is not valid HTTP.")
    return UpstreamUnavailable("The upstream connection broke before its answer was complete.")


def _never_sent(exc: BaseException) -> bool:
    """True when the request cannot have reached the provider: the connection was never made."""
    return isinstance(exc, aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError)


class UpstreamResponse:
    """An open provider answer. Reads raise only ``GatewayError``s; ``waited_s`` adds up the
    time spent waiting on the provider (opening included), to keep it out of the overhead;
    ``counted`` is True when the seam already counted this answer as an upstream error (a 429
    or 5xx), so that a failure found in its body is not counted a second time. Its trace span
    (when tracing is on) ends when it is released."""

    __slots__ = ("_resp", "status", "headers", "content_type", "waited_s", "counted", "_span")

    def __init__(self, resp: aiohttp.ClientResponse, waited_s: float, counted: bool,
                 span: UpstreamSpan | None = None) -> None:
        self._resp = resp
        self.status, self.headers, self.content_type = resp.status, resp.headers, resp.content_type
        self.waited_s = waited_s
        self.counted = counted
        self._span = span

    async def read(self) -> bytes:
        """The whole body, each byte copied once: the pieces as the parser delivered them, joined
        off the loop when big (``offload.join``). aiohttp's ``read`` also joins the pieces buffered
        at each wake-up, on the loop: a second copy. The socket is read without pausing, as
        aiohttp's ``read`` does: the body is kept whole anyway."""
        content, pieces, size = self._resp.content, [], 0
        content.set_read_chunk_size(sys.maxsize)
        while True:
            piece, chunk_end = await self._wait(content.readchunk())
            if piece:
                pieces.append(piece)
                size += len(piece)
            elif not chunk_end:  # (b"", True) only marks the end of an HTTP chunk
                return await offload.join(pieces, size)

    async def read_bounded(self, limit: int) -> bytes:
        """The whole body, however many pieces it comes in; UpstreamBadResponse past ``limit``."""
        body = bytearray()
        while chunk := await self.readany():
            body += chunk
            if len(body) > limit:
                raise UpstreamBadResponse(f"The upstream's HTTP {self.status} body is over {limit} bytes.")
        return bytes(body)

    async def readany(self) -> bytes:
        """The next bytes as they came, b"" at the end."""
        return await self._wait(self._resp.content.readany())

    def release(self) -> None:
        self._resp.release()
        if self._span is not None:
            self._span.end()
            self._span = None

    async def _wait(self, read) -> bytes:
        started = time.perf_counter()
        try:
            return await read
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise translate(exc) from None
        finally:
            self.waited_s += time.perf_counter() - started


# The attempt's on_sent, read by the connector once a connection is ready: a context variable
# (set around the attempt, in its task) rather than aiohttp's tracing signals, whose awaits and
# parameter objects cost every request several times what this does.
_on_sent: contextvars.ContextVar[Callable[[], None] | None] = contextvars.ContextVar("upstream_on_sent",
                                                                                     default=None)


class _Connector(aiohttp.TCPConnector):
    async def connect(self, req, traces, timeout):
        """A connection is ready and the request is about to go out: from now it may be billed."""
        conn = await super().connect(req, traces, timeout)
        on_sent = _on_sent.get()
        if on_sent is not None:
            on_sent()
        return conn


class Upstream:
    """Opens requests to the provider's chat completions endpoint; ``guard`` keeps its key in."""

    def __init__(self, cfg: UpstreamConfig, metrics: Any = None, *, sleep=asyncio.sleep) -> None:
        self.cfg = cfg
        self.guard = KeyGuard(cfg.api_key)
        self.url = URL(cfg.base_url.rstrip("/") + "/v1/chat/completions")  # parsed once, not per request
        self._base_headers = CIMultiDict({  # every request's, copied (in C) and completed per request
            "Authorization": f"Bearer {cfg.api_key}",
            "Content-Type": "application/json",
            "Accept-Encoding": "identity",
            "User-Agent": "image-gateway",
        })
        self.metrics = metrics
        self._sleep = sleep
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        connector = _Connector(limit=0, keepalive_timeout=60, ttl_dns_cache=300)
        # Our User-Agent is in every request's headers: no skip_auto_headers, which aiohttp turns
        # into new header sets on every request.
        self._session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,  # we ask for identity; bytes are relayed as they come
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _headers(self, request_id: str) -> CIMultiDict:
        headers = self._base_headers.copy()
        headers["X-Request-ID"] = request_id
        return headers

    async def open(self, body: bytes, *, request_id: str, model: str, deadline: float | None = None,
                   on_sent: Callable[[], None] | None = None, trace: RequestTrace | None = None) -> UpstreamResponse:
        """POST ``body``; retry what cannot have started; return the first final response.

        ``deadline`` (``loop.time()``; default ``timeout_s`` from now) bounds the attempts, the
        waits between them and the reading of the answer. ``on_sent`` is called each time the
        request is about to reach the provider (a connection is ready). With ``trace``, the call
        is a CLIENT span whose ``traceparent`` the provider gets, with an event per retry."""
        assert self._session is not None, "Upstream.start() was not awaited"
        headers = self._headers(request_id)
        if trace is None:
            return await self._open(body, headers, model, deadline, on_sent, None)
        span = trace.upstream(model)
        span.inject(headers)
        try:
            resp = await self._open(body, headers, model, deadline, on_sent, span)
        except BaseException as exc:
            span.end(exc)
            raise
        span.answered(resp.status)
        return resp

    async def _open(self, body: bytes, headers: CIMultiDict, model: str, deadline: float | None,
                    on_sent: Callable[[], None] | None, span: UpstreamSpan | None) -> UpstreamResponse:
        loop = asyncio.get_running_loop()
        if deadline is None:
            deadline = loop.time() + self.cfg.timeout_s
        attempts, waited = self.cfg.max_retries + 1, 0.0
        for attempt in range(attempts):
            last = attempt == attempts - 1
            remaining = deadline - loop.time()
            if remaining <= 0:
                self._error("timeout", model, None)
                raise UpstreamTimeout("The upstream did not answer in time.")
            timeout = aiohttp.ClientTimeout(total=remaining, sock_connect=min(remaining, self.cfg.connect_timeout_s))
            started = time.perf_counter()
            sent = _on_sent.set(on_sent)
            try:
                resp = await self._session.post(self.url, data=body, headers=headers, timeout=timeout)
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                waited += time.perf_counter() - started
                err = translate(exc)
                retry = _never_sent(exc)
                self._error("connect" if retry else err.kind, model, started)
                delay = self._backoff(attempt)
                if last or not retry or loop.time() + delay >= deadline:
                    raise err from None
                if span is not None:
                    span.retry(attempt + 1, "connect")
                await self._sleep(delay)
                continue
            finally:
                _on_sent.reset(sent)
            waited += time.perf_counter() - started
            self._done(model, resp.status, started)
            counted = resp.status == 429 or resp.status >= 500
            if counted:
                self._error("status_429" if resp.status == 429 else "status_5xx", model, None)
            if last or resp.status not in (429, 503):  # the answer, as nearly every one is
                return UpstreamResponse(resp, waited, counted, span)
            delay = _retry_after(resp.headers)
            retryable = resp.status == 429 or delay is not None  # a 503 is retried only when it says when
            delay = self._backoff(attempt) if delay is None else delay
            if not retryable or loop.time() + delay >= deadline:
                return UpstreamResponse(resp, waited, counted, span)
            resp.release()
            if span is not None:
                span.retry(attempt + 1, str(resp.status))
            log.info("upstream answered %s; retrying (attempt %d of %d)", resp.status, attempt + 2, attempts)
            await self._sleep(delay)
        raise AssertionError("unreachable")

    def _backoff(self, attempt: int) -> float:
        """Exponential backoff with full jitter."""
        return random.uniform(0, min(BACKOFF_CAP_S, BACKOFF_BASE_S * (2**attempt)))

    def _error(self, kind: str, model: str, started: float | None) -> None:
        if self.metrics is not None:
            self.metrics.upstream_error(kind)
            if started is not None:
                self.metrics.upstream_done(model, kind, time.perf_counter() - started)

    def _done(self, model: str, status: int, started: float) -> None:
        if self.metrics is not None:
            self.metrics.upstream_done(model, status, time.perf_counter() - started)


def _retry_after(headers) -> float | None:
    """Seconds the upstream asked us to wait (``retry-after-ms`` or ``retry-after``), capped."""
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            return min(MAX_RETRY_AFTER_S, max(0.0, float(value) * scale))
        except ValueError:
            continue
    return None
