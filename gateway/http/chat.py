"""``POST /v1/chat/completions``: the one path a request takes.

    auth -> validate -> admit -> cache / single-flight -> upstream -> relay -> account

Each step raises a ``GatewayError`` to refuse; the middleware renders it. Accounting runs
whatever happens after admission (success, upstream failure, the client leaving), exactly once.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from aiohttp import web

from gateway import cache as cache_mod
from gateway.errors import GatewayError, RequestTooLarge, UnsupportedMediaType, UpstreamBadResponse, UpstreamTimeout, UpstreamUnavailable
from gateway.upstream.relay import OFFLOAD_PARSE_BYTES, error_passthrough, first_chunk, passthrough_headers, read_json, relay_sse, write_counted
from gateway.upstream.sse import EventScanner
from gateway.http.state import AUTH, CACHE, CONFIG, LIMITER, METRICS, RECORD, UPSTREAM
from gateway.usage import Usage, estimate
from gateway.validate import ChatRequest, validate_async

log = logging.getLogger(__name__)

SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
JSON_TYPES = ("application/json", "text/json")
# Failures once the upstream has answered (connect errors are counted where they happen).
FAILURE_KINDS = {UpstreamBadResponse: "bad_response", UpstreamTimeout: "timeout", UpstreamUnavailable: "disconnect"}


@dataclass(slots=True)
class Served:
    """What the request cost, filled in as it goes, so accounting works even on cancellation."""

    usage: Usage | None = None
    cached: bool = False
    scanner: EventScanner | None = None
    started_upstream: bool = False


async def chat_completions(request: web.Request) -> web.StreamResponse:
    app, rec = request.app, request[RECORD]
    config = app[CONFIG]
    team = app[AUTH].team(request)
    rec.team = team.name
    raw = await read_body(request, config.server.max_body_bytes)
    rec.bytes_in = len(raw)
    chat = await validate_async(raw, config, team.limits)
    rec.model, rec.stream = chat.model.id, chat.stream
    decision = cache_mod.decide(team, chat, ", ".join(request.headers.getall("Cache-Control", [])) or None)
    rec.cache = decision.label
    admission = await app[LIMITER].admit(team, chat)
    served = Served()
    try:
        with app[METRICS].inflight(team.name):
            return await _serve(request, chat, decision, admission.headers, served)
    except GatewayError as err:
        err.headers = {**admission.headers, **err.headers}  # a team sees its limits on errors too
        raise
    finally:
        usage = _final_usage(chat, served)
        rec.usage = Usage(images_in=usage.images_in, images_out=usage.images_out) if served.cached else usage
        await asyncio.shield(admission.settle(usage, cached=served.cached))


async def _serve(request, chat: ChatRequest, decision, headers: dict, served: Served) -> web.StreamResponse:
    cache = request.app[CACHE]
    if not decision.lookup:
        response, entry = await _forward(request, chat, decision, headers, served)
        if decision.store and entry is not None:
            await cache.put(decision, entry)
        return response
    hit = await cache.get(decision)
    if hit is not None:
        return await _serve_hit(request, chat, hit[0], hit[1], headers, served)
    timeout = request.app[CONFIG].upstream.timeout_s
    async with cache.single_flight(decision, timeout) as flight:
        if flight.entry is not None:
            return await _serve_hit(request, chat, flight.entry, flight.age_s, headers, served)
        response, entry = await _forward(request, chat, decision, headers, served)
        await flight.publish(entry if decision.store else None)
        return response


async def _forward(request, chat: ChatRequest, decision, headers: dict, served: Served):
    """Call the upstream and relay its answer; return (response, cache entry or None)."""
    app, rec = request.app, request[RECORD]
    headers = {**headers, "x-cache": decision.label.upper()}
    # From here the provider may be generating: a client that leaves is charged the estimate.
    served.started_upstream = True
    try:
        attempted = await app[UPSTREAM].open(chat.raw, request_id=rec.request_id, model=chat.model.id)
    except GatewayError:
        served.started_upstream = False  # it never reached the provider, or the provider failed it
        raise
    rec.upstream_s += attempted.waited_s
    try:
        return await _relay(request, chat, decision, headers, served, attempted.response)
    except (UpstreamBadResponse, UpstreamTimeout, UpstreamUnavailable) as err:
        app[METRICS].upstream_error(FAILURE_KINDS[type(err)])
        raise


async def _relay(request, chat: ChatRequest, decision, headers: dict, served: Served, resp):
    app, rec = request.app, request[RECORD]
    if resp.status != 200:
        served.usage = Usage(images_in=len(chat.images))  # a refused request costs nothing
        response = await error_passthrough(resp, app[CONFIG].upstream.api_key, rec)
        response.headers.update(headers)
        return response, None
    upstream_headers = passthrough_headers(resp.headers)
    if resp.content_type == "text/event-stream":
        collector = cache_mod.SSECollector(chat.body["model"]) if decision.store else None
        served.scanner = EventScanner(collector.feed if collector else None)
        chunk = await first_chunk(resp, rec)
        upstream_headers.pop("Content-Type", None)
        response = web.StreamResponse(headers={**upstream_headers, **SSE_HEADERS, **headers})
        relayed = await relay_sse(request, response, resp, chunk, rec, served.scanner)
        if relayed.failure:
            app[METRICS].upstream_error(relayed.failure)
        await response.write_eof()
        served.usage = _usage(chat, relayed.usage, relayed.images_out)
        entry = None
        if collector is not None and relayed.complete:
            collector.done()
            entry = collector.finish()
        return response, entry
    body, relayed = await read_json(resp, rec)
    served.usage = _usage(chat, relayed.usage, relayed.images_out)
    upstream_headers.pop("Content-Type", None)
    rec.first_byte()
    rec.bytes_out += len(body)
    response = web.Response(body=body, content_type="application/json", headers={**upstream_headers, **headers})
    entry = None
    if decision.store:  # decoding the images is CPU work: off the loop when it is big
        build = cache_mod.entry_from_json
        big = len(body) > OFFLOAD_PARSE_BYTES
        entry = await asyncio.to_thread(build, relayed.parsed) if big else build(relayed.parsed)
    return response, entry


async def _serve_hit(request, chat: ChatRequest, entry, age_s: float, headers: dict, served: Served):
    rec = request[RECORD]
    rec.cache = "hit"
    saved = Usage.from_provider(entry.usage, prices=chat.model.prices, images_in=len(chat.images), images_out=len(entry.images))
    served.usage, served.cached = saved, True
    request.app[METRICS].cache_saved(rec.team, saved.total)
    headers = {**headers, "x-cache": "HIT", "age": str(int(age_s))}
    # Written in pieces: the base64 never exists whole, and a big entry is read from the store
    # range by range as it goes out, so neither does the entry.
    length, pieces = cache_mod.hit_body(
        entry, stream=chat.stream, request_id=rec.request_id,
        include_usage=chat.stream and bool((chat.body.get("stream_options") or {}).get("include_usage")))
    if chat.stream:
        response = web.StreamResponse(headers={**SSE_HEADERS, **headers})
    else:
        response = web.StreamResponse(headers={**headers, "Content-Type": "application/json"})
        response.content_length = length
    try:
        await response.prepare(request)
        async for piece in pieces:
            await write_counted(response, piece, rec)
    except cache_mod.HitReadError as err:
        # The answer has begun: end it so that the client sees it failed. A stream gets an
        # error event (mid-event: a blank line first, as a failed relay does); a JSON body
        # under Content-Length can only be cut off, with the connection closed after it.
        rec.error_code = err.code
        log.warning("cache hit cut short, the entry could not be read to its end: %s", err)
        if chat.stream:
            await write_counted(response, b"\n\n" + err.sse_event(), rec)
        else:
            response.force_close()
    finally:
        await pieces.aclose()  # a client that left: the read in flight is cancelled
    await response.write_eof()
    return response


def _usage(chat: ChatRequest, provider_usage: dict | None, images_out: int) -> Usage:
    if provider_usage is None:
        log.warning("upstream reported no usage; charging the estimate")
    return Usage.from_provider(
        provider_usage, prices=chat.model.prices, images_in=len(chat.images), images_out=images_out, estimate=estimate(chat)
    )


def _final_usage(chat: ChatRequest, served: Served) -> Usage:
    """The usage to account: the real one, or for a request cut short, what is known of it."""
    if served.usage is not None:
        return served.usage
    if not served.started_upstream:
        return Usage(images_in=len(chat.images))
    scanner = served.scanner
    if scanner is not None:
        return _usage(chat, scanner.usage, scanner.images_out)
    return _usage(chat, None, 0)


async def read_body(request: web.Request, limit: int) -> bytearray:
    """The whole body, refused with 413 as soon as it is known to be over ``limit``."""
    ctype = request.headers.get("Content-Type")
    if ctype is not None:
        mime = ctype.split(";", 1)[0].strip().lower()
        if mime not in JSON_TYPES and not mime.endswith("+json"):
            raise UnsupportedMediaType(f"The body must be JSON (Content-Type: application/json), not {mime or 'empty'}.")
    too_large = RequestTooLarge(
        f"The request body is over the gateway's limit of {limit // (1024 * 1024)} MB.",
        headers={"Connection": "close"},
    )
    length = request.content_length
    if length is not None and length > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.content.iter_any():
        body += chunk
        if len(body) > limit:
            raise too_large
    return body
