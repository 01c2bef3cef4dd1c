"""The one seam to the provider: a shared keep-alive ``ClientSession``, retries, error mapping.

aiohttp's exceptions stop here. What leaves this module is either an open upstream response
(any status: the relay decides what the client sees) or a ``GatewayError``:

    aiohttp.ClientConnectorError, ServerDisconnectedError, ... -> UpstreamUnavailable (502)
    asyncio.TimeoutError / ServerTimeoutError                  -> UpstreamTimeout (504)

Retries (connection errors, 429, 502, 503, 504) happen only here, and so only before the
gateway has sent the client a single byte.
"""
from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
from multidict import CIMultiDict

from gateway.config import UpstreamConfig
from gateway.errors import UpstreamTimeout, UpstreamUnavailable

log = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({429, 502, 503, 504})
BACKOFF_BASE_S = 0.25
BACKOFF_CAP_S = 8.0
MAX_RETRY_AFTER_S = 30.0


@dataclass(slots=True)
class Attempted:
    """An open upstream response and how long the upstream took to start answering."""

    response: aiohttp.ClientResponse
    waited_s: float


class Upstream:
    """Opens requests to the provider's chat completions endpoint."""

    def __init__(self, cfg: UpstreamConfig, metrics: Any = None, *, sleep=asyncio.sleep) -> None:
        self.cfg = cfg
        self.url = cfg.base_url.rstrip("/") + "/v1/chat/completions"
        self.metrics = metrics
        self._sleep = sleep
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=60, ttl_dns_cache=300)
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=self.cfg.timeout_s, sock_connect=self.cfg.connect_timeout_s),
            auto_decompress=False,  # we ask for identity; bytes are relayed as they come
            skip_auto_headers=("User-Agent",),
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _headers(self, request_id: str) -> CIMultiDict:
        return CIMultiDict(
            {
                "Authorization": f"Bearer {self.cfg.api_key}",
                "Content-Type": "application/json",
                "Accept-Encoding": "identity",
                "X-Request-ID": request_id,
                "User-Agent": "image-gateway",
            }
        )

    async def open(self, body: bytes, *, request_id: str, model: str) -> Attempted:
        """POST ``body``; retry what is retryable; return the first final response."""
        assert self._session is not None, "Upstream.start() was not awaited"
        attempts = self.cfg.max_retries + 1
        waited = 0.0
        for attempt in range(attempts):
            last = attempt == attempts - 1
            started = time.perf_counter()
            try:
                resp = await self._session.post(self.url, data=body, headers=self._headers(request_id))
            except (asyncio.TimeoutError, aiohttp.ServerTimeoutError) as exc:
                waited += time.perf_counter() - started
                self._error("timeout", model, started)
                # A whole-request timeout already spent the client's patience: never retry it.
                if last or not isinstance(exc, aiohttp.ServerTimeoutError):
                    raise UpstreamTimeout("The upstream did not answer in time.") from None
            except aiohttp.ClientError:
                waited += time.perf_counter() - started
                self._error("connect", model, started)
                if last:
                    raise UpstreamUnavailable("The upstream could not be reached.") from None
            else:
                waited += time.perf_counter() - started
                if resp.status in RETRY_STATUSES:
                    self._error("status_429" if resp.status == 429 else "status_5xx", model, None)
                if resp.status not in RETRY_STATUSES or last:
                    self._done(model, resp.status, started)
                    return Attempted(resp, waited)
                delay = _retry_after(resp.headers)
                self._done(model, resp.status, started)
                resp.release()
                log.info("upstream answered %s; retrying (attempt %d of %d)", resp.status, attempt + 2, attempts)
                await self._sleep(delay if delay is not None else self._backoff(attempt))
                continue
            await self._sleep(self._backoff(attempt))
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
