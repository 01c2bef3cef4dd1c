"""Upstream response -> client response, JSON or SSE, reading usage on the way.

JSON bodies reach the client as the upstream's own bytes (parsed once for usage, never
re-encoded). SSE chunks are written to the client as they arrive, byte for byte; the
``EventScanner`` watches them go by. Upstream errors pass through in the provider's shape
with the upstream key redacted; anything else the upstream does wrong becomes one of our
errors. Once a stream has started, a failure is a final ``data: {"error": ...}`` event.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from gateway.errors import GatewayError, UpstreamBadResponse, UpstreamTimeout, UpstreamUnavailable
from gateway.http.record import RequestRecord
from gateway.upstream.sse import EventScanner, event_data

log = logging.getLogger(__name__)

# Headers never copied from the upstream: hop-by-hop ones, framing we redo, and ones that
# belong to the gateway (request ids, the rate limits of *our* account at the provider).
DROPPED_HEADERS = frozenset(
    h.lower()
    for h in (
        "Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization", "TE", "Trailer",
        "Transfer-Encoding", "Upgrade", "Content-Length", "Content-Encoding", "Set-Cookie",
        "Server", "Date", "X-Request-ID", "Alt-Svc", "Via",
    )
)
MAX_ERROR_BODY = 1 << 20
OFFLOAD_PARSE_BYTES = 1 << 20  # parse JSON this large in a thread, off the event loop


def passthrough_headers(headers) -> dict[str, str]:
    return {
        k: v
        for k, v in headers.items()
        if k.lower() not in DROPPED_HEADERS and not k.lower().startswith("x-ratelimit-")
    }


def redact(body: bytes, secret: str) -> bytes:
    """Remove the upstream key, and any 8+ character piece of it, from an error body."""
    if not secret:
        return body
    key = secret.encode()
    if key in body:
        body = body.replace(key, b"[redacted]")
    n = 8
    if len(key) > n:
        for i in range(len(key) - n + 1):
            piece = key[i : i + n]
            if piece in body:
                body = body.replace(piece, b"[redacted]")
    return body


async def parse_json(data: bytes | bytearray | memoryview) -> Any:
    if len(data) > OFFLOAD_PARSE_BYTES:
        return await asyncio.to_thread(orjson.loads, data)
    return orjson.loads(data)


@dataclass(slots=True)
class Relayed:
    """What came back: the usage object if any, images out, and whether it was complete."""

    usage: dict | None = None
    images_out: int = 0
    finish_reason: str | None = None
    complete: bool = False  # a 200 JSON body, or a stream that reached [DONE]
    parsed: dict | None = None  # the JSON body (non-streaming 200 only)
    failure: str | None = None  # upstream error kind when a stream broke after its first byte


async def error_passthrough(resp: aiohttp.ClientResponse, api_key: str, rec: RequestRecord) -> web.Response:
    """A non-200 upstream answer: the provider's JSON error as it was sent, key redacted."""
    if resp.status in (401, 403):
        # The provider refused *our* key: not the client's fault, and not theirs to see.
        log.error("upstream refused the gateway's API key (HTTP %s)", resp.status)
        raise UpstreamBadResponse("The upstream refused the gateway's credentials; contact the gateway operator.")
    started = time.perf_counter()
    try:
        body = await resp.content.read(MAX_ERROR_BODY)
    except (aiohttp.ClientError, asyncio.TimeoutError):
        body = b""
    finally:
        rec.upstream_s += time.perf_counter() - started
        resp.release()
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        parsed = None
    if not isinstance(parsed, dict) or not isinstance(parsed.get("error"), dict):
        raise UpstreamBadResponse(f"The upstream answered HTTP {resp.status} without a JSON error.")
    rec.first_byte()
    code = parsed["error"].get("code")
    rec.error_code = code if isinstance(code, str) else f"upstream_{resp.status}"
    headers = passthrough_headers(resp.headers)
    headers.pop("Content-Type", None)
    return web.Response(status=resp.status, body=redact(body, api_key), content_type="application/json", headers=headers)


async def read_json(resp: aiohttp.ClientResponse, rec: RequestRecord) -> tuple[bytes, Relayed]:
    """A 200 JSON answer, read whole (the client needs all of it anyway) and checked."""
    started = time.perf_counter()
    try:
        body = await resp.read()
    except asyncio.TimeoutError:
        raise UpstreamTimeout("The upstream did not finish its answer in time.") from None
    except aiohttp.ClientError:
        raise UpstreamUnavailable("The upstream connection broke before its answer was complete.") from None
    finally:
        rec.upstream_s += time.perf_counter() - started
        resp.release()
    try:
        parsed = await parse_json(body)
    except orjson.JSONDecodeError:
        raise UpstreamBadResponse("The upstream answered with a body that is not JSON.") from None
    if not isinstance(parsed, dict) or not isinstance(parsed.get("choices"), list):
        raise UpstreamBadResponse("The upstream answered JSON without choices.")
    out = Relayed(usage=parsed.get("usage") if isinstance(parsed.get("usage"), dict) else None, parsed=parsed)
    for choice in parsed["choices"]:
        if isinstance(choice, dict):
            out.finish_reason = choice.get("finish_reason") or out.finish_reason
            images = (choice.get("message") or {}).get("images")
            out.images_out += len(images) if isinstance(images, list) else 0
    out.complete = True
    return body, out


async def first_chunk(resp: aiohttp.ClientResponse, rec: RequestRecord) -> bytes:
    """Wait for the stream's first bytes before answering the client, so a stream that dies
    before its first byte is still an ordinary (retryable, well-formed) error."""
    started = time.perf_counter()
    try:
        chunk = await resp.content.readany()
    except asyncio.TimeoutError:
        resp.release()
        raise UpstreamTimeout("The upstream did not start its stream in time.") from None
    except aiohttp.ClientError:
        resp.release()
        raise UpstreamUnavailable("The upstream closed the stream before sending anything.") from None
    finally:
        rec.upstream_s += time.perf_counter() - started
    if not chunk:
        resp.release()
        raise UpstreamBadResponse("The upstream sent an empty stream.")
    return chunk


async def relay_sse(
    request: web.Request,
    response: web.StreamResponse,
    resp: aiohttp.ClientResponse,
    chunk: bytes,
    rec: RequestRecord,
    scanner: EventScanner,
) -> Relayed:
    """Write the stream to the client as it comes; return what the scanner saw.

    Only the upstream's failures are handled here (as a final error event); the client going
    away surfaces as ``ConnectionResetError`` from the write, for the caller."""
    await response.prepare(request)
    failure: tuple[str, GatewayError] | None = None
    try:
        while chunk:
            await write_counted(response, chunk, rec)
            for event in scanner.feed(chunk):
                payload = event_data(event)
                if payload is not None and len(payload) > OFFLOAD_PARSE_BYTES:
                    # Parsing a big event (and a cache collector decoding its image) is CPU
                    # work that would stall every other stream: do it off the event loop.
                    await asyncio.to_thread(scanner.handle, payload)
                else:
                    scanner.handle(payload)
            started = time.perf_counter()
            try:
                chunk = await resp.content.readany()
            except asyncio.TimeoutError:
                failure = ("timeout", UpstreamTimeout("The upstream stream stalled past the timeout."))
                break
            except aiohttp.ClientError:
                failure = ("disconnect", UpstreamUnavailable("The upstream connection broke mid-stream."))
                break
            finally:
                rec.upstream_s += time.perf_counter() - started
        if failure is None and not scanner.done:
            failure = ("bad_response", UpstreamBadResponse("The upstream stream ended before [DONE]."))
        if failure is not None:
            await _fail(response, scanner, failure[1], rec)
    finally:
        resp.release()
    return Relayed(
        usage=scanner.usage,
        images_out=scanner.images_out,
        finish_reason=scanner.finish_reason,
        complete=scanner.done and scanner.error is None,
        failure=failure[0] if failure else None,
    )


async def write_counted(response: web.StreamResponse, data: bytes, rec: RequestRecord) -> None:
    rec.first_byte()
    started = time.perf_counter()
    await response.write(data)
    rec.client_wait_s += time.perf_counter() - started
    rec.bytes_out += len(data)


async def _fail(response: web.StreamResponse, scanner: EventScanner, err: GatewayError, rec: RequestRecord) -> None:
    rec.error_code = err.code
    log.warning("stream failed after its first byte: %s", err.message)
    lead = b"\n\n" if scanner.mid_event else b""
    await write_counted(response, lead + err.sse_event(), rec)
