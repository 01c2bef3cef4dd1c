"""The simulator's aiohttp app: its routes, and the one handler that answers a chat request.

The chat handler reads as the order of events on a real upstream, with the faults slotted in:
count the call -> auth -> JSON -> pick the fault -> latency -> reset / not_http / status /
garbage -> validate and decode the inputs -> answer as JSON or as SSE. CPU work (base64, Pillow,
JPEG) runs in worker threads, so a slow 4K answer never stalls the other requests' events.
"""
from __future__ import annotations

import asyncio
import secrets
import socket
import struct
from collections import deque
from functools import partial
from typing import Any, Callable

import orjson
from aiohttp import web

from gateway import offload

from . import completions, errors, faults, images, inputs, misbehave, parse
from .completions import Reply
from .faults import Fault, FaultSpecError
from .sse import EventStream, StreamCut
from .stats import CallRecord, Stats

FAULT_HEADER = "X-Sim-Fault"
FAULT_FIELD = "sim_fault"
MAX_BODY_BYTES = 256 * 1024 * 1024  # above the provider's 100 MB inline limit: the gateway caps first
_GARBAGE = b"<html><body><h1>Service temporarily overloaded</h1></body></html>\n"


class Simulator:
    """One simulated upstream's state: its key, its default fault, the script, the stats."""

    def __init__(self, api_key: str, default_fault: Fault) -> None:
        self.api_key = api_key
        self.default_fault = default_fault
        self.script: deque[Fault] = deque()
        self.stats = Stats()
        self.renderer = images.Renderer()

    def authorized(self, request: web.Request) -> bool:
        scheme, _, key = request.headers.get("Authorization", "").partition(" ")
        return scheme.lower() == "bearer" and secrets.compare_digest(key.strip().encode(), self.api_key.encode())

    def fault_for(self, request: web.Request, body: Any) -> Fault:
        """Server default, then the next scripted fault, then the header, then the body field."""
        field = body.get(FAULT_FIELD, "") if isinstance(body, dict) else ""
        if not isinstance(field, str):
            raise errors.invalid_request(f"{FAULT_FIELD} must be a string.", "invalid_fault")
        try:
            header_fault = faults.parse(request.headers.get(FAULT_HEADER, ""))
            body_fault = faults.parse(field)
        except FaultSpecError as exc:
            raise errors.invalid_request(str(exc), "invalid_fault") from None
        fault = self.default_fault
        if self.script:
            fault = fault.merged(self.script.popleft())
        return fault.merged(header_fault).merged(body_fault)


SIMULATOR = web.AppKey("simulator", Simulator)
ECHO_HEADERS = web.RequestKey("echo_headers", dict)  # the echo_key_header fault's headers


def create_app(*, api_key: str = "sim-key", latency_ms: int = 0, fault: str = "") -> web.Application:
    """The simulated provider. ``fault`` is a default spec for every chat request (it overrides
    ``latency_ms`` if it sets its own); raises ``FaultSpecError`` (a ValueError) if malformed."""
    default_fault = faults.parse(f"latency_ms={latency_ms}" if latency_ms else "").merged(faults.parse(fault))
    app = web.Application(client_max_size=MAX_BODY_BYTES)
    app[SIMULATOR] = Simulator(api_key, default_fault)
    app.on_response_prepare.append(_add_echo_headers)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/_sim/stats", get_stats)
    app.router.add_post("/_sim/script", post_script)
    app.router.add_post("/_sim/reset", post_reset)
    return app


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(data), content_type="application/json")


def _loads(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None


async def _add_echo_headers(request: web.Request, response: web.StreamResponse) -> None:
    """Whatever the answer (JSON, SSE, error), the ``echo_key_header`` fault's headers go on it."""
    response.headers.update(request.get(ECHO_HEADERS, {}))


async def list_models(request: web.Request) -> web.Response:
    if not request.app[SIMULATOR].authorized(request):
        return errors.invalid_api_key().response()
    return _json(completions.MODEL_LIST)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    sim = request.app[SIMULATOR]
    raw = await request.read()
    body = await offload.run(_loads, raw, size=len(raw))
    record = CallRecord(*parse.peek(body), traceparent=request.headers.get("traceparent"))
    with sim.stats.track(record):
        try:
            return await _answer(request, sim, body, record)
        except errors.SimError as error:
            record.finish(error.status, "error")
            return error.response()
        except ConnectionResetError:
            # The client left and a write found out (a runner without handler_cancellation).
            record.finish(None, "cancelled")
            return web.Response()  # nobody reads it; aiohttp drops it quietly


async def _answer(request: web.Request, sim: Simulator, body: Any, record: CallRecord) -> web.StreamResponse:
    if not sim.authorized(request):
        raise errors.invalid_api_key()
    if body is None:
        raise errors.invalid_request("Request body is not valid JSON.", "invalid_json")
    fault = sim.fault_for(request, body)
    record.fault = fault.spec()
    spelling = misbehave.key_spelling(sim.api_key, fault.key_escaped)
    if fault.echo_key_header:
        request[ECHO_HEADERS] = misbehave.echo_headers(spelling)
    if fault.latency_ms:
        await asyncio.sleep(fault.latency_ms / 1000)
    if fault.reset:
        _reset_connection(request)
        record.finish(None, "reset")
        return web.Response()
    if fault.not_http:
        misbehave.not_http(request)
        record.finish(None, "not_http")
        return web.Response()  # the connection is closed: aiohttp drops it
    if fault.status:
        return await _error(request, fault, record, spelling)
    if fault.garbage:
        record.finish(200, "garbage")
        return web.Response(body=_GARBAGE, content_type="application/json")

    call, pictures = await asyncio.to_thread(_parse_and_load, body)
    reply = Reply(call.model, fault.blocked)
    answer = inputs.describe(pictures) if call.vision and not fault.blocked else ""
    usage = None if fault.no_usage else completions.usage(call, answer, blocked=bool(fault.blocked))
    make_image = None
    if not (call.vision or fault.blocked):
        size = images.output_size(call.image_size, call.aspect_ratio, pictures)
        min_bytes = int((fault.image_mb or 0) * 1024 * 1024)
        make_image = partial(sim.renderer.data_url, call.digest, size, pictures, min_bytes)
    if call.stream:
        return await _stream(request, fault, record, reply, call, answer, usage, make_image, spelling)

    image_url = await asyncio.to_thread(make_image) if make_image else None
    completion = reply.completion(answer + (f" (key {misbehave.KEY_MARK})" if fault.echo_key_body else ""), image_url, usage)
    if fault.malformed:
        completion = misbehave.malform(completion, fault.malformed)
    data = await asyncio.to_thread(orjson.dumps, completion) if image_url else orjson.dumps(completion)
    record.finish(200, "completed")
    return web.Response(body=misbehave.spell(data, spelling), content_type="application/json")


async def _error(request: web.Request, fault: Fault, record: CallRecord, spelling: bytes) -> web.StreamResponse:
    """The ``status`` fault: the provider's error for it, maybe quoting the key, maybe in pieces."""
    error = errors.for_status(fault.status, fault.retry_after)
    if fault.echo_key:
        error.message = "Incorrect API key provided: " + misbehave.KEY_MARK
    response = error.response()
    response.body = misbehave.spell(response.body, spelling)
    record.finish(error.status, "error")
    if fault.split_error_ms is not None:
        return await misbehave.in_two_pieces(request, response, fault.split_error_ms / 1000)
    return response


def _parse_and_load(body: Any) -> tuple[parse.ChatCall, list[inputs.InputImage]]:
    call = parse.parse(body)
    return call, inputs.load_all(call.images)


async def _stream(
    request: web.Request,
    fault: Fault,
    record: CallRecord,
    reply: Reply,
    call: parse.ChatCall,
    answer: str,
    usage: dict[str, Any] | None,
    make_image: Callable[[], str] | None,
    spelling: bytes,
) -> web.StreamResponse:
    """Progress (or the vision answer) as text deltas, the image in one event, finish, usage.

    The stream faults that are about content go after the progress text: a malformed event,
    the key in a delta, or an error event that quotes the key and ends the stream."""
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    events = EventStream(request, response, fault)
    usage_apart = usage is not None and call.include_usage
    try:
        await events.comment("PROCESSING")
        pieces = completions.split_text(answer) if call.vision else completions.PROGRESS_TEXT
        for i, piece in enumerate(() if fault.blocked else pieces):
            await events.send(reply.chunk({"role": "assistant", "content": piece} if i == 0 else {"content": piece}))
        if fault.malformed:
            await events.send(misbehave.malformed_chunk(reply.chunk({}), fault.malformed))
        if fault.echo_key_stream:
            await events.send(reply.chunk({"content": f" (key {misbehave.KEY_MARK})"}), spelling)
        if fault.echo_key_stream_error:
            await events.send(misbehave.stream_error(), spelling)
            await events.end()
            record.finish(200, "stream_error")
            return response
        if make_image is not None:
            image_url = await asyncio.to_thread(make_image)
            await events.send(reply.chunk({"images": completions.image_parts(image_url)}))
        await events.send(reply.final_chunk(None if usage_apart else usage))
        if usage_apart:
            await events.send(reply.usage_chunk(usage))
        await events.done()
    except StreamCut:
        record.finish(200, "cut")
        return response
    record.finish(200, "completed")
    return response


def _reset_connection(request: web.Request) -> None:
    """Drop the connection with a TCP RST and no response at all."""
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


async def get_stats(request: web.Request) -> web.Response:
    sim = request.app[SIMULATOR]
    return _json(sim.stats.snapshot(script_pending=len(sim.script)))


async def post_script(request: web.Request) -> web.Response:
    """Queue fault specs; each later chat request (past auth and JSON) takes the next one."""
    sim = request.app[SIMULATOR]
    body = _loads(await request.read())
    specs = body.get("faults") if isinstance(body, dict) else None
    if not isinstance(specs, list) or not all(isinstance(spec, str) for spec in specs):
        return errors.invalid_request('Body must be {"faults": ["<spec>", ...]}.').response()
    try:
        parsed = [faults.parse(spec) for spec in specs]
    except FaultSpecError as exc:
        return errors.invalid_request(str(exc), "invalid_fault").response()
    sim.script.extend(parsed)
    return _json({"script_pending": len(sim.script)})


async def post_reset(request: web.Request) -> web.Response:
    sim = request.app[SIMULATOR]
    sim.stats.reset()
    sim.script.clear()
    return _json({"reset": True})
