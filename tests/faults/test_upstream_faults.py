"""A provider that misbehaves, seen from a client of the gateway.

Every answer ends cleanly (a 502 in the provider's JSON shape, or a final error event and the
end of the body: never a 500, never a hang); a request the provider may have received is sent
once; what reached the provider is charged at least its estimate; every upstream failure is
counted. Where the simulator cannot misbehave that way, ``raw_upstream`` is a provider made of
raw bytes on a socket.
"""
from __future__ import annotations

import asyncio
import logging
import re
from contextlib import asynccontextmanager
from typing import AsyncIterator, Awaitable, Callable

import aiohttp
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.observability.accesslog import ACCESS_LOGGER
from gateway.server import free_port
from tests.fixtures.gateway import wait_for
from tests.fixtures.simulator import sse_events

MODEL = "google/gemini-3-pro-image-preview"
SAFETY_TIMEOUT_S = 30  # a net against a hang; no test comes near it


def body(prompt: str = "a lighthouse", **extra) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": prompt}], **extra}


def http_reply(status: int, payload: bytes, content_type: str = "application/json") -> bytes:
    return (f"HTTP/1.1 {status} X\r\nContent-Type: {content_type}\r\nContent-Length: {len(payload)}\r\n"
            f"Connection: close\r\n\r\n").encode() + payload


def answer(message: object = None, finish: str = "stop", native: str = "STOP") -> bytes:
    """A non-streaming body in the provider's shape, with ``message`` as given."""
    if message is None:
        message = {"role": "assistant", "content": "done", "images": []}
    return orjson.dumps({"id": "c1", "object": "chat.completion", "created": 1, "model": MODEL,
                         "choices": [{"index": 0, "message": message, "finish_reason": finish,
                                      "native_finish_reason": native}],
                         "usage": {"prompt_tokens": 5, "completion_tokens": 7}})


class RawUpstream:
    """A provider that reads each request whole, records it, and answers with ``reply``."""

    def __init__(self, reply: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]) -> None:
        self.reply, self.received = reply, []
        self.url = ""

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(re.search(rb"(?i)content-length:\s*(\d+)", head).group(1))
            self.received.append(orjson.loads(await reader.readexactly(length)))
            await self.reply(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@asynccontextmanager
async def raw_upstream(reply) -> AsyncIterator[RawUpstream]:
    upstream = RawUpstream(reply)
    server = await asyncio.start_server(upstream.handle, "127.0.0.1", 0)
    upstream.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        yield upstream
    finally:
        server.close()


def sends(*pieces: bytes, pause_s: float = 0.0, then_wait: bool = False):
    """A reply of raw ``pieces``, a pause between them (a provider slow mid-body), then either
    the end of the connection or, with ``then_wait``, silence until the gateway hangs up."""
    async def reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for i, piece in enumerate(pieces):
            if i and pause_s:
                await asyncio.sleep(pause_s)
            writer.write(piece)
            await writer.drain()
        if then_wait:
            await reader.read()
    return reply


@pytest.fixture
async def http():
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=SAFETY_TIMEOUT_S)) as session:
        yield session


async def post(http, gw, payload: dict, **headers) -> tuple[int, bytes, dict]:
    """One request, returned once the gateway is done with it (settled, cached, counted: all after the answer)."""
    async with http.post(gw.url + "/v1/chat/completions", json=payload, headers=gw.headers(**headers)) as resp:
        answer = resp.status, await resp.read(), dict(resp.headers)
    await gw.idle()
    return answer


async def usage_today(http, gw) -> dict:
    async with http.get(gw.url + "/v1/usage", headers=gw.headers()) as resp:
        return (await resp.json())["day"]


async def upstream_errors(http, gw) -> dict[str, float]:
    async with http.get(gw.url + "/metrics") as resp:
        text = await resp.text()
    return {s.labels["kind"]: s.value for f in text_string_to_metric_families(text) for s in f.samples
            if s.name == "gateway_upstream_errors_total" and s.value}


def error_code(raw: bytes) -> str:
    return orjson.loads(raw)["error"]["code"]


# ---- answers that end cleanly --------------------------------------------------------------


@pytest.mark.parametrize("bad_event", [b'data: {"choices":1}', b'data: {"choices":[{"delta":"x"}]}', b"data: <html>"])
async def test_a_malformed_stream_event_ends_the_stream_with_an_error_event(start_gateway, http, bad_event):
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n"
    good = b'data: {"choices":[{"delta":{"content":"Here"}}]}\n\n'
    async with raw_upstream(sends(head + good, bad_event + b"\n\n", then_wait=True)) as up:
        gw = await start_gateway(upstream_url=up.url)
        status, raw, _ = await post(http, gw, body(stream=True))
    assert status == 200 and b"HTTP/1.1" not in raw
    events = sse_events(raw)
    assert events[:2] == [good.strip(), bad_event]  # relayed as they came
    assert orjson.loads(events[-1][len(b"data: "):])["error"]["code"] == "upstream_bad_response"  # last; the body ended


async def test_a_provider_error_event_is_the_final_event_and_nothing_follows_it(start_gateway, http, simulator):
    gw = await start_gateway()
    status, raw, headers = await post(http, gw, body(stream=True, seed=2, sim_fault="echo_key_stream_error"))
    assert status == 200 and headers["x-cache"] == "MISS"
    last = sse_events(raw)[-1]
    assert raw.endswith(last + b"\n\n")  # the body ends with the provider's event: no blank lines after it
    errors = [e for e in sse_events(raw) if b'"error"' in e]
    assert errors == [last]  # exactly one error event: the provider's, key redacted, not one of ours
    assert orjson.loads(last[len(b"data: "):])["error"] == {
        "message": "Upstream model error (key [redacted]).", "type": "api_error", "code": "server_error"}
    _, _, again = await post(http, gw, body(stream=True, seed=2))
    assert again["x-cache"] == "MISS"  # a failed answer is never cached


@pytest.mark.parametrize("message, cached", [("not an object", False), ({"content": "", "images": 5}, False),
                                             ({"content": "", "images": 5}, True)])
async def test_a_malformed_json_answer_is_a_502_bad_response(start_gateway, http, message, cached):
    async with raw_upstream(sends(http_reply(200, answer(message)))) as up:
        gw = await start_gateway(upstream_url=up.url)
        status, raw, _ = await post(http, gw, body(seed=1) if cached else body())
    assert (status, error_code(raw)) == (502, "upstream_bad_response")


async def test_an_error_body_in_two_pieces_reaches_the_client_whole(start_gateway, http):
    error = orjson.dumps({"error": {"message": "Invalid image format.", "type": "invalid_request_error",
                                    "code": "invalid_image"}})
    reply = http_reply(400, error)
    async with raw_upstream(sends(reply[:-10], reply[-10:], pause_s=0.05)) as up:
        gw = await start_gateway(upstream_url=up.url)
        status, raw, _ = await post(http, gw, body())
    assert (status, orjson.loads(raw)) == (400, orjson.loads(error))


# ---- nothing sent twice, every failure counted, what reached the provider charged -------------


async def test_a_reply_that_is_not_http_is_a_bad_response_and_is_not_sent_again(start_gateway, http):
    async with raw_upstream(sends(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")) as up:
        gw = await start_gateway(upstream_url=up.url, upstream={"max_retries": 3})
        status, raw, _ = await post(http, gw, body(max_tokens=100))
        assert len(up.received) == 1
    assert (status, error_code(raw)) == (502, "upstream_bad_response")
    assert (await upstream_errors(http, gw)) == {"bad_response": 1}
    assert (await usage_today(http, gw))["tokens"]["completion"] == 100  # it may have been billed


async def test_a_reset_after_the_request_was_sent_is_not_sent_again_and_is_charged(start_gateway, http, simulator):
    gw = await start_gateway(upstream={"max_retries": 3})
    await simulator.script(["reset", ""])
    status, raw, _ = await post(http, gw, body(max_tokens=100))
    assert (status, error_code(raw)) == (502, "upstream_unavailable")
    assert (await simulator.stats())["calls"] == 1
    assert (await upstream_errors(http, gw)) == {"disconnect": 1}
    assert (await usage_today(http, gw))["tokens"]["completion"] == 100


async def test_an_upstream_500_passes_through_and_is_counted(start_gateway, http, simulator):
    gw = await start_gateway()
    await simulator.script(["status=500", ""])
    status, raw, _ = await post(http, gw, body())
    assert status == 500 and "error" in orjson.loads(raw)
    assert (await simulator.stats())["calls"] == 1
    assert (await upstream_errors(http, gw)) == {"status_5xx": 1}
    assert (await usage_today(http, gw))["tokens"]["completion"] == 0  # the provider refused it


async def test_a_5xx_without_a_json_error_is_a_bad_response_counted_once_as_status_5xx(start_gateway, http):
    async with raw_upstream(sends(http_reply(500, b"<html>Internal Server Error</html>", "text/html"))) as up:
        gw = await start_gateway(upstream_url=up.url)
        status, raw, _ = await post(http, gw, body())
        assert len(up.received) == 1
    assert (status, error_code(raw)) == (502, "upstream_bad_response")
    assert (await upstream_errors(http, gw)) == {"status_5xx": 1}  # one failure, one count: what the provider said


async def test_a_timeout_after_the_request_reached_the_provider_is_charged_the_estimate(start_gateway, http, simulator):
    gw = await start_gateway(upstream={"timeout_s": 0.5})
    status, raw, _ = await post(http, gw, body(max_tokens=100, sim_fault="latency_ms=5000"))
    assert (status, error_code(raw)) == (504, "upstream_timeout")
    assert (await usage_today(http, gw))["tokens"]["completion"] == 100


async def test_a_client_that_leaves_after_the_request_reached_the_provider_is_charged_the_estimate(
        start_gateway, http, simulator):
    gw = await start_gateway()
    request = asyncio.ensure_future(post(http, gw, body(max_tokens=100, sim_fault="latency_ms=20000")))
    await simulator.wait_for_stats(lambda s: sum(s["inflight"].values()) == 1)
    request.cancel()
    await simulator.wait_for_stats(lambda s: s["cancelled"] == 1)
    assert await wait_for(lambda: _completion_tokens(http, gw, 100))


async def _completion_tokens(http, gw, expected: int) -> bool:
    return (await usage_today(http, gw))["tokens"]["completion"] == expected


async def test_a_provider_never_reached_is_charged_nothing(start_gateway, http):
    gw = await start_gateway(upstream_url=f"http://127.0.0.1:{free_port('127.0.0.1')}",
                             upstream={"max_retries": 1})
    status, raw, _ = await post(http, gw, body(max_tokens=100))
    assert (status, error_code(raw)) == (502, "upstream_unavailable")
    assert (await upstream_errors(http, gw)) == {"connect": 2}  # a connection never made is retried
    day = await usage_today(http, gw)
    assert (day["requests"], day["tokens"]["completion"]) == (1, 0)


async def test_a_retry_after_past_the_deadline_is_not_waited_for(start_gateway, http, simulator):
    gw = await start_gateway(upstream={"timeout_s": 5})
    await simulator.script(["status=429;retry_after=20", ""])
    status, raw, headers = await post(http, gw, body())
    assert (status, error_code(raw), headers["Retry-After"]) == (429, "rate_limit_exceeded", "20")
    assert (await simulator.stats())["calls"] == 1


# ---- a safety block ------------------------------------------------------------------------


@pytest.mark.parametrize("finish", ["content_filter", "stop"])
async def test_a_safety_blocked_answer_is_relayed_as_sent_never_cached_and_logged(start_gateway, http, finish,
                                                                                  caplog, monkeypatch):
    monkeypatch.setattr(logging.getLogger(ACCESS_LOGGER), "propagate", True)
    caplog.set_level(logging.INFO)
    blocked = answer({"role": "assistant", "content": "I can't make that image.", "images": []},
                     finish=finish, native="IMAGE_SAFETY")
    async with raw_upstream(sends(http_reply(200, blocked))) as up:
        gw = await start_gateway(upstream_url=up.url)
        for _ in range(2):
            status, raw, headers = await post(http, gw, body(seed=3))
            assert (status, raw, headers["x-cache"]) == (200, blocked, "MISS")
        assert len(up.received) == 2

    def logged() -> list[str]:
        return [r.access["finish_reason"] for r in caplog.records if r.name == ACCESS_LOGGER]

    await wait_for(lambda: len(logged()) == 2)  # the access line follows the settle, which follows the answer
    assert logged() == ["IMAGE_SAFETY", "IMAGE_SAFETY"]
