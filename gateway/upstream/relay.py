"""Upstream response -> client response, JSON or SSE, reading the answer on the way.

JSON bodies reach the client as the upstream's own bytes (parsed once, through
``gateway.answer``, never re-encoded). SSE chunks are written to the client as they arrive; the
``EventScanner`` watches them go by. Every byte from the provider passes the ``KeyGuard`` on its
way out: headers through the allow-list, error bodies redacted after JSON decoding, 200 bodies
checked at wire speed. Upstream errors pass through in the provider's shape; anything else the
upstream does wrong raises one of our errors (reads through the seam raise nothing else), and
the handler decides from the request's phase how the client sees it.
"""
from __future__ import annotations

import logging
import re
import time
from collections.abc import Awaitable, Callable

import orjson
from aiohttp import web

from gateway import answer, offload
from gateway.errors import UpstreamBadResponse
from gateway.http.record import RequestRecord
from gateway.images import deliver
from gateway.images.deliver import Links
from gateway.upstream.client import UpstreamResponse
from gateway.upstream.secrets import KeyGuard, StreamGuard, allowed_headers
from gateway.upstream.sse import EventScanner, event_data

log = logging.getLogger(__name__)

MAX_ERROR_BODY = 1 << 20  # an error body is read whole up to this; a larger one is not an error body
ERROR_CODE_RE = re.compile(r"[A-Za-z0-9_.:-]{1,64}")  # a provider's error code we log and label with


def provider_code(code: object, guard: KeyGuard, fallback: str) -> str:
    """The provider's ``error.code`` for the access log, metrics and spans when it is a short plain
    token that holds no key; else ``fallback``: what the provider sends is not ours to trust."""
    if isinstance(code, str) and ERROR_CODE_RE.fullmatch(code) and not guard.found_in(code):
        return code
    return fallback


async def error_passthrough(resp: UpstreamResponse, guard: KeyGuard, rec: RequestRecord) -> web.Response:
    """A non-200 upstream answer: the provider's JSON error as it was sent, key redacted."""
    if resp.status in (401, 403):
        # The provider refused *our* key: not the client's fault, and not theirs to see.
        log.error("upstream refused the gateway's API key (HTTP %s)", resp.status)
        raise UpstreamBadResponse("The upstream refused the gateway's credentials; contact the gateway operator.")
    body = await resp.read_bounded(MAX_ERROR_BODY)  # whole, however many pieces it came in
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        parsed = None
    if not isinstance(parsed, dict) or not isinstance(parsed.get("error"), dict):
        raise UpstreamBadResponse(f"The upstream answered HTTP {resp.status} without a JSON error.")
    rec.first_byte()
    rec.error_code = provider_code(parsed["error"].get("code"), guard, f"upstream_{resp.status}")
    return web.Response(status=resp.status, body=guard.redact_json(body), content_type="application/json",
                        headers=allowed_headers(resp.headers, guard.key))


async def read_json(resp: UpstreamResponse, guard: KeyGuard, *, image_data: bool = True) -> tuple[bytes, answer.Answer]:
    """A 200 JSON answer, read whole (the client needs all of it anyway), checked, key-free: the
    Answer (what the cache and the Images API keep) is parsed from the cleaned bytes, never the raw.
    ``image_data``: see ``answer.loads`` (False when only the bytes are relayed).

    Both run on the loop, not through ``offload``: the scan and the parse of a big answer are C
    calls that hold the GIL (memchr scans, 1 MB base64 slices), so a thread would stall the loop
    as long, plus the wait for the GIL to come back."""
    body = guard.clean_whole(await resp.read())
    return body, answer.loads(body, image_data=image_data)


async def first_chunk(resp: UpstreamResponse) -> bytes:
    """Wait for the stream's first bytes before answering the client, so a stream that dies
    before its first byte is still an ordinary error response."""
    chunk = await resp.readany()
    if not chunk:
        raise UpstreamBadResponse("The upstream sent an empty stream.")
    return chunk


async def relay_sse(response: web.StreamResponse, resp: UpstreamResponse, chunk: bytes, rec: RequestRecord,
                    scanner: EventScanner, checker: StreamGuard, *, links: Links | None = None,
                    before_done: Callable[[], Awaitable[None]] | None = None) -> None:
    """Write the stream to the client as it comes, the scanner reading every event on the way.

    With ``links`` (the scanner must keep events whole) events are written one by one as they
    complete, each one carrying images with its data URLs replaced by links (a 4K image's event
    becomes a few hundred bytes), every other event as it came, followed by a blank line.

    Returns when the upstream ended the stream after ``[DONE]``, or right after the chunk that
    carried the provider's own error event (``scanner.error``): that event, relayed key-free,
    is the stream's final one, so nothing of ours follows it. Raises a ``GatewayError`` for
    anything else (a malformed event, a stall, a broken connection, an end before [DONE])."""
    while chunk:
        await _pass(response, checker.clean(chunk), rec, scanner, links, before_done)
        if scanner.error is not None:
            break
        chunk = await resp.readany()
    await _pass(response, checker.flush(), rec, scanner, links, before_done)
    if not scanner.done and scanner.error is None:
        raise UpstreamBadResponse("The upstream stream ended before [DONE].")


async def _pass(response: web.StreamResponse, data: bytes, rec: RequestRecord, scanner: EventScanner,
                links: Links | None, before_done: Callable[[], Awaitable[None]] | None) -> None:
    """Key-free bytes of the stream through the scanner, then to the client: what the cache keeps
    (the scanner's collector) is what the client was sent. The bytes that end the stream
    (``[DONE]``) wait for ``before_done``."""
    rewritten: list[bytes] = []  # links: the events as they go out

    async def write() -> None:
        for piece in rewritten if links is not None else (data,):
            await write_counted(response, piece, rec)

    try:
        for event in scanner.feed(data):
            payload = event_data(event)
            # Parsing a big event (and a cache collector decoding its image) is CPU work that
            # would stall every other stream.
            await offload.run(scanner.handle, payload, size=len(payload) if payload is not None else 0)
            if links is not None:
                rewritten.append(await deliver.rewrite_event(event, links) + b"\n\n")
        if scanner.done and before_done is not None:
            await before_done()
    except Exception:  # a malformed event: relayed as it came all the same, then the stream ends
        await write()
        raise
    await write()


async def write_counted(response: web.StreamResponse, data: bytes, rec: RequestRecord) -> None:
    if not data:
        return
    rec.first_byte()
    started = time.perf_counter()
    await response.write(data)
    rec.client_wait_s += time.perf_counter() - started
    rec.bytes_out += len(data)
