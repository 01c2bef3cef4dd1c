"""``POST /v1/chat/completions``: the one path a request takes.

    auth -> validate -> admit -> cache / single-flight -> upstream -> relay -> account

Each step raises a ``GatewayError`` to refuse; the middleware renders it. The request's phase
(``record.Phase``) decides the rest, on every exit: once the answer has started (its status line
went out) a failure can only end the body (a final error event, or a cut JSON body), never
write a new status line; and what is charged follows from how far it got (nothing before the
request may have reached the provider; from then on at least the estimate when the real usage
is unknown). Accounting runs exactly once whatever happens after admission, cancellation
included. One deadline per request (``upstream.timeout_s`` from admission) bounds the admission,
the upstream attempts, their waits, the reading of the answer and the single-flight wait.
"""
from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import AsyncIterator

from aiohttp import web

from gateway import answer as answer_mod
from gateway import cache as cache_mod
from gateway import offload
from gateway.answer import Answer
from gateway.config import CacheConfig, Team
from gateway.errors import GatewayError, RequestTooLarge, UnsupportedMediaType, UpstreamBadResponse, UpstreamTimeout, UpstreamUnavailable
from gateway.upstream.client import UpstreamResponse
from gateway.upstream.body import sliced
from gateway.upstream.relay import (error_passthrough, first_chunk, provider_code, read_json,
                                    relay_sse, write_counted)
from gateway.upstream.secrets import allowed_headers
from gateway.upstream.sse import EventScanner
from gateway.http.files import image_links
from gateway.http.record import Phase, RequestRecord
from gateway.images.deliver import Links, rewrite_body
from gateway.http.state import CACHE, LIMITER, METRICS, RECORD, RUNTIME, SNAPSHOT, UPSTREAM
from gateway.limits.limiter import Admission
from gateway.usage import Usage, estimate
from gateway.validate import ChatRequest, validate_async

log = logging.getLogger(__name__)

SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
JSON_TYPES = ("application/json", "text/json")
UPSTREAM_FAILURES = (UpstreamBadResponse, UpstreamTimeout, UpstreamUnavailable)
SETTLE_FIRST_S = 1.0  # how long an answer's last bytes wait for its settle before they go out anyway


def max_event_bytes(max_entry_bytes: int) -> int:
    """The largest stream event kept whole (for the cache, or to rewrite its images as links): a
    cache entry's image as base64, plus 1 MiB for the rest of the event."""
    return max_entry_bytes * 4 // 3 + (1 << 20)


@dataclass(slots=True)
class Served:
    """What the request cost, filled in as it goes, so accounting works even on cancellation."""

    deadline: float  # loop time: the upstream attempts, their waits and single-flight end by then
    usage: Usage | None = None
    cached: bool = False
    scanner: EventScanner | None = None
    response: web.StreamResponse | None = None  # set once its status line went out
    links: Links | None = None  # the answer's images go out as links (images.delivery: url)
    collect: bool = False  # keep the provider's answer in ``answer`` instead of sending it (Images API)
    answer: Answer | None = None  # collect: the 200 answer, the provider's or a cache hit's
    sent: bool = False  # this call may have reached the provider (an Images request's record is n calls')
    upstream_s: float = 0.0  # this call's wait on the provider (an Images request's calls overlap)
    max_event: int = max_event_bytes(CacheConfig().max_entry_bytes)  # the team's: see max_event_bytes
    admission: Admission | None = None  # to settle before the answer's last bytes (see _settle_first)
    settling: asyncio.Future | None = None  # that settle, awaited before the request ends

    def mark_sent(self, rec: RequestRecord) -> None:
        """The upstream's on_sent: this call may now be billed, and so may the request."""
        self.sent = True
        rec.reach(Phase.SENT_UPSTREAM)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    app, rec = request.app, request[RECORD]
    config = request[SNAPSHOT].config  # the config this request runs under to its end, whatever a reload does
    team = identify(request)
    links = image_links(request, team.images)  # a bad X-Image-Delivery is refused before anything else
    raw = await read_body(request, config.server.max_body_bytes)
    rec.bytes_in = len(raw)
    chat = await validate_async(raw, config, team.limits)
    rec.stream = chat.stream
    async with admitting(request, team, chat) as (decision, deadline):
        admission = await app[LIMITER].admit(team, chat, deadline=deadline)
    served = Served(deadline=deadline, links=links, max_event=max_event_bytes(team.cache.max_entry_bytes),
                    admission=admission)
    with app[METRICS].inflight(rec.team):
        return await run(request, chat, decision, admission, served)


def identify(request: web.Request) -> Team:
    """The caller's team, named on the record; a bad key is refused before the body is read."""
    rec = request[RECORD]
    team, rec.key_fingerprint = request[SNAPSHOT].auth.identify(request)
    rec.team = team.name
    return team


@asynccontextmanager
async def admitting(request: web.Request, team: Team,
                    chat: ChatRequest) -> AsyncIterator[tuple[cache_mod.CacheDecision, float]]:
    """A validated request up to its admission, the same for every route: yields its cache
    decision (from its ``Cache-Control`` headers) and its one deadline; the caller admits it in
    the block (the ``admission`` span), which leaves the request ADMITTED when it ends cleanly."""
    rec = request[RECORD]
    rec.model = chat.model.id
    decision = await cache_mod.decide_async(team, chat, ", ".join(request.headers.getall("Cache-Control", [])) or None)
    rec.cache = decision.label
    deadline = asyncio.get_running_loop().time() + request[SNAPSHOT].config.upstream.timeout_s
    with rec.span("admission"):
        yield decision, deadline
    rec.reach(Phase.ADMITTED)


async def run(request: web.Request, chat: ChatRequest, decision, admission, served: Served) -> web.StreamResponse | None:
    """One admitted chat call, from the cache or the provider, settled exactly once whatever happens.
    With ``served.collect`` (the Images API) a 200 answer is left in ``served.answer`` and None is
    returned; the provider's error answer is returned as the client would get it."""
    app, rec = request.app, request[RECORD]
    try:
        return await _serve(request, chat, decision, admission.headers, served)
    except ConnectionResetError:  # the client is gone: nothing more can be written
        raise
    except asyncio.CancelledError:  # the client went away, or the shutdown timeout ended the request
        err = app[RUNTIME].cut_off()
        if err is None:
            raise
        if served.response is None:
            raise err from None
        return await _end_broken(served.response, err, rec)
    except Exception as err:
        if served.response is None:  # nothing written yet: the middleware renders the error
            if isinstance(err, GatewayError):
                err.headers = {**admission.headers, **err.headers}  # a team sees its limits on errors too
            raise
        return await _end_broken(served.response, err, rec)
    finally:
        usage = served.usage = _final_usage(chat, served)
        rec.usage = charged(served)
        if served.settling is not None:  # settled before its answer went out: let it end
            await asyncio.shield(served.settling)
        else:
            await admission.settle(usage, cached=served.cached)  # shielded inside: runs to its end


def charged(served: Served) -> Usage:
    """A settled call's usage as charged: a cache hit's tokens were paid for before, only its images count."""
    usage = served.usage or Usage()
    return Usage(images_in=usage.images_in, images_out=usage.images_out) if served.cached else usage


async def _serve(request, chat: ChatRequest, decision, headers: dict, served: Served) -> web.StreamResponse:
    cache = request.app[CACHE]
    if not decision.lookup:
        response, entry = await _forward(request, chat, decision, headers, served)
        if decision.store and entry is not None:
            await cache.put(decision, entry)
        return response
    with request[RECORD].span("cache"):
        hit = await cache.get(decision)
    if hit is not None:
        return await _serve_hit(request, chat, hit[0], hit[1], headers, served)
    seconds_left = served.deadline - asyncio.get_running_loop().time()
    async with cache.single_flight(decision, seconds_left) as flight:
        if flight.entry is not None:
            return await _serve_hit(request, chat, flight.entry, flight.age_s, headers, served)
        response, entry = await _forward(request, chat, decision, headers, served)
        await flight.publish(entry if decision.store else None)
        return response


async def _forward(request, chat: ChatRequest, decision, headers: dict, served: Served):
    """Call the upstream and relay its answer; return (response, cache entry or None)."""
    app, rec = request.app, request[RECORD]
    headers = {**headers, "x-cache": decision.label.upper()}
    resp = await app[UPSTREAM].open(sliced(chat.raw), request_id=rec.request_id, model=chat.model.id,
                                    deadline=served.deadline, on_sent=lambda: served.mark_sent(rec),
                                    trace=rec.trace)
    rec.response_model = chat.model.upstream_id  # unless the answer names another (JSON: read below)
    try:
        with rec.span("relay"):
            return await _relay(request, chat, decision, headers, served, resp)
    except UPSTREAM_FAILURES as err:  # the seam counted the attempts; what failed after, here
        if not resp.counted:  # a 5xx with a body that is no JSON error is one failure, not two
            app[METRICS].upstream_error(err.kind)
        raise
    finally:
        resp.release()
        served.upstream_s += resp.waited_s
        rec.upstream_s = max(rec.upstream_s, served.upstream_s)  # concurrent calls: the longest wait


async def _relay(request, chat: ChatRequest, decision, headers: dict, served: Served, resp: UpstreamResponse):
    app, rec = request.app, request[RECORD]
    guard = app[UPSTREAM].guard
    if resp.status != 200:
        served.usage = Usage(images_in=len(chat.images))  # a refused request costs nothing
        response = await error_passthrough(resp, guard, rec)
        response.headers.update(headers)
        return response, None
    upstream_headers = allowed_headers(resp.headers, guard.key)
    if resp.content_type == "text/event-stream" and not served.collect:
        collector = cache_mod.SSECollector(chat.body["model"]) if decision.store else None
        scanner = served.scanner = EventScanner(collector.feed if collector else None, whole_max=served.max_event,
                                                whole=served.links is not None)  # links rewrite events whole
        chunk = await first_chunk(resp)
        response = web.StreamResponse(headers={**upstream_headers, **SSE_HEADERS, **headers})
        await _start(request, response, served)
        await relay_sse(response, resp, chunk, rec, scanner, guard.stream(), links=served.links,
                        before_done=lambda: _settle_first(served, _usage(chat, scanner.usage, scanner.images_out)))
        await _finish(response, rec)
        if served.usage is None:  # no [DONE]: the provider's error event ended it
            served.usage = _usage(chat, scanner.usage, scanner.images_out)
        _note_finish(rec, scanner.native_finish_reason, scanner.finish_reason)
        if scanner.error is not None:  # the provider's final error event: a failed answer, never cached
            rec.error_code = provider_code(scanner.error.get("code"), guard, "upstream_error")
            return response, None
        if scanner.on_event is None:  # no collector, or it was dropped (an event over max_event)
            return response, None
        collector.done()
        return response, collector.finish()
    body, answer = await read_json(resp, guard, image_data=decision.store or served.collect or served.links is not None)
    rec.response_model = answer.model or rec.response_model
    served.usage = _usage(chat, answer.usage, answer.images_out)
    _note_finish(rec, answer.native_finish_reason, answer.finish_reason)
    response, size = None, len(body)  # the provider's answer, before any rewrite: what the entry decodes
    if served.collect:
        served.answer = answer
    else:
        if served.links is not None:
            body = await rewrite_body(body, answer, served.links)
        await _settle_first(served, served.usage)
        rec.first_byte()
        # Written here, whole, before the cache entry and the cache put: a slow store delays the
        # answer by SETTLE_FIRST_S at most, never by the entry's decoding and write.
        response = web.Response(body=sliced(body), content_type="application/json",
                                headers={**upstream_headers, **headers})
        await _start(request, response, served)
        await _finish(response, rec)
    entry = None
    if decision.store:  # decoding the images is CPU work: off the loop when it is big
        entry = await offload.run(cache_mod.entry_from_answer, answer, size=size)
    return response, entry


async def _settle_first(served: Served, usage: Usage) -> None:
    """Settle before the answer's last bytes go out (a JSON body, a stream's ``[DONE]``), so that
    the client's next request, on any connection or replica, finds its slot free (max_concurrent)
    and its tokens counted. A store slower than SETTLE_FIRST_S delays the answer no longer: the
    settle goes on (the request ends after it; a failed one is retried)."""
    served.usage = usage
    if served.admission is not None and served.settling is None:
        served.settling = asyncio.ensure_future(served.admission.settle(usage, cached=served.cached))
        await asyncio.wait([served.settling], timeout=SETTLE_FIRST_S)


def _note_finish(rec: RequestRecord, native: str | None, finish: str | None) -> None:
    """For the access log: the provider's own reason (``IMAGE_SAFETY`` says more than ``content_filter``)."""
    rec.finish_reason = native or finish


async def _serve_hit(request, chat: ChatRequest, entry, age_s: float, headers: dict, served: Served):
    rec = request[RECORD]
    rec.cache, rec.response_model = "hit", entry.model
    saved = Usage.from_provider(entry.usage, prices=chat.model.prices, images_in=len(chat.images), images_out=len(entry.images))
    served.usage, served.cached = saved, True
    request.app[METRICS].cache_saved(rec.team, saved.total)
    headers = {**headers, "x-cache": "HIT", "age": str(int(age_s))}
    if served.collect:
        _, pieces = cache_mod.hit_body(entry, stream=False, request_id=rec.request_id)
        served.answer = answer_mod.loads(b"".join([piece async for piece in pieces]))
        return None
    urls = ()
    if served.links is not None:  # the same stored image (its life lengthened), a fresh link
        entry, urls = await cache_mod.hit_links(entry, served.links)
    # Written in pieces: the base64 never exists whole, and a big entry is read from the store
    # range by range as it goes out, so neither does the entry. A HitReadError from the pieces
    # (the entry could not be read to its end) ends the answer as any failure after its start.
    length, pieces = cache_mod.hit_body(
        entry, stream=chat.stream, request_id=rec.request_id,
        include_usage=chat.stream and bool((chat.body.get("stream_options") or {}).get("include_usage")), urls=urls)
    if chat.stream:
        response = web.StreamResponse(headers={**SSE_HEADERS, **headers})
    else:
        response = web.StreamResponse(headers={**headers, "Content-Type": "application/json"})
        response.content_length = length
    await _settle_first(served, saved)  # before its pieces: their last one may follow at once
    with rec.span("relay"):
        try:
            await _start(request, response, served)
            async for piece in pieces:
                await write_counted(response, piece, rec)
        finally:
            await pieces.aclose()  # a client that left: the read in flight is cancelled
        await _finish(response, rec)
    return response


async def _start(request: web.Request, response: web.StreamResponse, served: Served) -> None:
    """Send the status line: from here only body bytes (or a final error event) may follow."""
    rec = request[RECORD]
    await response.prepare(request)
    served.response = response
    rec.status = response.status
    rec.reach(Phase.ANSWER_STARTED)


async def _finish(response: web.StreamResponse, rec: RequestRecord) -> None:
    await response.write_eof()
    rec.reach(Phase.ANSWER_FINISHED)


async def _end_broken(response: web.StreamResponse, err: Exception, rec: RequestRecord) -> web.StreamResponse:
    """End an answer that failed after its start so that the client sees it failed: a stream
    gets a final error event (after a blank line: it may have been cut mid-event); a JSON body
    under Content-Length can only be cut off, with the connection closed after it."""
    if rec.phase >= Phase.ANSWER_FINISHED:  # every byte is out: only the log can say it
        log.error("failure after the answer was complete (request %s)", rec.request_id, exc_info=err)
        return response
    if isinstance(err, GatewayError):
        log.warning("answer cut short after it started: %s", err)
    else:
        log.error("unhandled error after the answer started (request %s)", rec.request_id, exc_info=err)
        err = GatewayError("The gateway failed to finish this answer.")
    rec.error_code = err.code
    if rec.trace is not None:
        rec.trace.event("stream_cut", {"error.type": err.code})
    if response.content_type == "text/event-stream":
        await write_counted(response, b"\n\n" + err.sse_event(), rec)
    else:
        response.force_close()
    await response.write_eof()
    return response


def _usage(chat: ChatRequest, provider_usage: dict | None, images_out: int) -> Usage:
    if provider_usage is None:
        log.warning("upstream reported no usage; charging the estimate")
    return Usage.from_provider(  # the estimate only when it stands in for the provider's
        provider_usage, prices=chat.model.prices, images_in=len(chat.images), images_out=images_out,
        estimate=None if isinstance(provider_usage, dict) else estimate(chat))


def _final_usage(chat: ChatRequest, served: Served) -> Usage:
    """The usage to account: the real one, or for a call cut short, what how far it got implies."""
    if served.usage is not None:
        return served.usage
    if not served.sent:  # the provider never saw it
        return Usage(images_in=len(chat.images))
    scanner = served.scanner  # the provider may bill it: what the stream said, else the estimate
    return _usage(chat, scanner.usage if scanner else None, scanner.images_out if scanner else 0)


async def read_body(request: web.Request, limit: int) -> bytes:
    """The whole body, refused with 413 as soon as it is known to be over ``limit``."""
    ctype = request.headers.get("Content-Type")
    if ctype is not None:
        mime = ctype.split(";", 1)[0].strip().lower()
        if mime not in JSON_TYPES and not mime.endswith("+json"):
            raise UnsupportedMediaType(f"The body must be JSON (Content-Type: application/json), not {mime or 'empty'}.")
    length = request.content_length
    if length is not None and length > limit:
        raise RequestTooLarge.over(limit)
    content = request.content
    first = await content.readany()
    if len(first) > limit:
        raise RequestTooLarge.over(limit)
    if content.at_eof():  # the whole body came in one piece (a small one does): no copy
        return first
    pieces, size = [first], len(first)
    while chunk := await content.readany():
        pieces.append(chunk)
        size += len(chunk)
        if size > limit:
            raise RequestTooLarge.over(limit)
    return await offload.join(pieces, size)  # one copy, off the loop when big
