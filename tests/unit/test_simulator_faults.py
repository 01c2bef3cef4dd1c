"""Fault injection, the scripted queue and the stats, through real HTTP.

No assertion here measures time: slow faults are checked by what the simulator's stats say
while the client is waiting (order of events), and long holds are ended by the client leaving.
"""
from __future__ import annotations

import asyncio
import signal
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from gateway.simulator import FaultSpecError, create_app, faults
from tests.fixtures.simulator import (
    API_KEY,
    RunningSimulator,
    open_data_url,
    running_simulator,
    simulator_subprocess,
    sse_data,
)

MODEL = "gemini-3-pro-image-preview"


def body(prompt: str = "a kite", **fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": prompt}], **fields}


def post(sim, payload: dict[str, Any], fault: str | None = None):
    headers = dict(sim.headers)
    if fault is not None:
        headers["X-Sim-Fault"] = fault
    return sim.session.post(f"{sim.url}/v1/chat/completions", json=payload, headers=headers)


async def call(sim, payload: dict[str, Any], fault: str | None = None) -> bytes:
    async with post(sim, payload, fault) as response:
        return await response.read()


async def test_429_with_retry_after(simulator):
    async with post(simulator, body(), "status=429;retry_after=2") as response:
        assert response.status == 429
        assert response.headers["Retry-After"] == "2"
        assert await response.json() == {
            "error": {"message": "Rate limit exceeded.", "type": "rate_limit_error", "code": "rate_limit_exceeded"}
        }


@pytest.mark.parametrize("status,code", [(500, "internal_error"), (503, "service_unavailable"), (502, "bad_gateway"), (599, "server_error")])
async def test_5xx_with_a_provider_shaped_body(simulator, status, code):
    async with post(simulator, body(stream=True), f"status={status}") as response:
        assert response.status == status
        assert "Retry-After" not in response.headers
        error = (await response.json())["error"]
        assert (error["type"], error["code"]) == ("api_error", code)


async def test_reset_drops_the_connection_without_a_response(simulator):
    with pytest.raises(aiohttp.ClientConnectionError):
        async with post(simulator, body(), "reset") as response:
            await response.read()
    [record] = (await simulator.stats())["requests"]
    assert (record["fault"], record["status"], record["outcome"]) == ("reset", None, "reset")


async def test_garbage_is_a_200_that_is_not_json(simulator):
    async with post(simulator, body(), "garbage") as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == "application/json"
        with pytest.raises(ValueError):
            await response.json()


@pytest.mark.parametrize("cut_after", [0, 2, 5])
async def test_cut_after_ends_the_stream_after_n_events_without_done(simulator, cut_after):
    received = b""
    with pytest.raises(aiohttp.ClientPayloadError):
        async with post(simulator, body(stream=True), f"cut_after={cut_after}") as response:
            assert response.status == 200
            async for chunk in response.content.iter_any():
                received += chunk
    data = sse_data(received)
    assert len(data) == cut_after and "[DONE]" not in data
    assert (await simulator.stats())["requests"][-1]["outcome"] == "cut"


async def test_hold_ms_sends_the_first_event_while_holding_the_rest(simulator):
    """The first data event arrives while the simulator still holds the request; the client
    then gives up, which the simulator counts as a cancelled request."""
    async with post(simulator, body(stream=True, user="holder"), "hold_ms=600000") as response:
        first_data = b""
        while not first_data.startswith(b"data: "):
            first_data = (await response.content.readuntil(b"\n\n")).strip()
        assert sse_data(first_data)[0]["choices"][0]["delta"]["content"]
        stats = await simulator.stats()
        assert stats["inflight"] == {"holder": 1} and stats["completed"] == 0
        response.close()
    stats = await simulator.wait_for_stats(lambda s: s["cancelled"] == 1)
    assert stats["inflight"] == {} and stats["requests"][-1]["outcome"] == "cancelled"


async def test_drip_ms_still_delivers_the_whole_stream(simulator):
    async with post(simulator, body(stream=True), "drip_ms=5") as response:
        data = sse_data(await response.read())
    assert data[-1] == "[DONE]" and data[-2]["choices"][0]["finish_reason"] == "stop"


async def test_image_mb_pads_the_jpeg_and_keeps_it_valid(simulator):
    async with post(simulator, body(image_config={"aspect_ratio": "3:2"}), "image_mb=30") as response:
        answer = await response.json()
    picture, raw = open_data_url(answer["choices"][0]["message"]["images"][0]["image_url"]["url"])
    assert len(raw) >= 30 * 1024 * 1024
    assert (picture.format, picture.size) == ("JPEG", (1264, 848))
    picture.load()


async def test_no_usage_leaves_usage_out_of_json_and_stream(simulator):
    async with post(simulator, body(), "no_usage") as response:
        assert "usage" not in await response.json()
    for options in ({}, {"stream_options": {"include_usage": True}}):
        async with post(simulator, body(stream=True, **options), "no_usage") as response:
            data = sse_data(await response.read())
        assert data[-1] == "[DONE]" and not any("usage" in chunk for chunk in data[:-1])


async def test_latency_then_a_client_that_leaves_counts_as_cancelled(simulator):
    request = asyncio.create_task(call(simulator, body(user="slow"), "latency_ms=600000"))
    await simulator.wait_for_stats(lambda s: s["inflight"].get("slow") == 1)
    request.cancel()
    stats = await simulator.wait_for_stats(lambda s: s["cancelled"] == 1)
    assert stats["calls"] == 1 and stats["completed"] == 0 and stats["inflight"] == {}


async def test_peak_inflight_is_counted_per_user(simulator):
    tasks = [
        asyncio.create_task(call(simulator, body(user=user), "latency_ms=600000"))
        for user in ("team-a", "team-a", "team-a", "team-b")
    ]
    await simulator.wait_for_stats(lambda s: s["inflight"] == {"team-a": 3, "team-b": 1})
    for task in tasks:
        task.cancel()
    stats = await simulator.wait_for_stats(lambda s: s["cancelled"] == 4)
    assert stats["peak_inflight"] == {"team-a": 3, "team-b": 1}
    assert stats["inflight"] == {}


async def test_the_script_feeds_one_fault_per_request_then_none(simulator):
    await simulator.script(["status=503", "status=503;retry_after=0.5", ""])
    assert (await simulator.stats())["script_pending"] == 3
    statuses = []
    for _ in range(4):
        async with post(simulator, body()) as response:
            statuses.append(response.status)
            retry_after = response.headers.get("Retry-After")
    assert statuses == [503, 503, 200, 200] and retry_after is None
    stats = await simulator.stats()
    assert stats["script_pending"] == 0
    assert [r["fault"] for r in stats["requests"]] == ["status=503", "status=503;retry_after=0.5", "", ""]
    assert (stats["calls"], stats["completed"], stats["outcomes"]["error"]) == (4, 2, 2)


async def test_a_request_refused_for_its_key_does_not_consume_the_script(simulator):
    await simulator.script(["status=503"])
    async with simulator.session.post(f"{simulator.url}/v1/chat/completions", json=body()) as response:
        assert response.status == 401
    async with post(simulator, body()) as response:
        assert response.status == 503
    assert (await simulator.stats())["calls"] == 2


async def test_reset_route_clears_stats_and_script(simulator):
    await simulator.script(["status=500"])
    async with post(simulator, body()) as response:
        assert response.status == 500
    await simulator.script(["status=500"])
    await simulator.reset()
    stats = await simulator.stats()
    assert (stats["calls"], stats["requests"], stats["script_pending"], stats["peak_inflight"]) == (0, [], 0, {})
    async with post(simulator, body()) as response:
        assert response.status == 200


async def test_sources_combine_default_script_header_body_in_that_order():
    async with running_simulator(fault="status=500;retry_after=9") as sim:
        async with post(sim, body()) as response:
            assert (response.status, response.headers["Retry-After"]) == (500, "9")
        await sim.script(["status=502"])
        async with post(sim, body(), "status=503") as response:
            assert (response.status, response.headers["Retry-After"]) == (503, "9")
        async with post(sim, body(sim_fault="status=429"), "status=503") as response:
            assert response.status == 429
        requests = (await sim.stats())["requests"]
        assert [r["fault"] for r in requests] == ["status=500;retry_after=9", "status=503;retry_after=9", "status=429;retry_after=9"]


async def test_a_server_wide_latency_is_overridable_per_request():
    async with running_simulator(latency_ms=600000) as sim:
        async with post(sim, body(), "latency_ms=0") as response:
            assert response.status == 200


@pytest.mark.parametrize(
    "spec", ["status=200", "lag_ms=5", "latency_ms=-1", "cut_after", "reset=1", "image_mb=x", "malformed=usage", "blocked=STOP"]
)
async def test_a_malformed_fault_is_a_400_naming_the_item(simulator, spec):
    async with post(simulator, body(), spec) as response:
        assert response.status == 400
        error = (await response.json())["error"]
        assert error["code"] == "invalid_fault" and spec.split("=")[0] in error["message"]
    async with simulator.session.post(f"{simulator.url}/_sim/script", json={"faults": [spec]}) as response:
        assert response.status == 400
    with pytest.raises(FaultSpecError):
        create_app(fault=spec)


def test_fault_specs_round_trip_and_merge():
    fault = faults.parse(" latency_ms=2000 ; status=429;retry_after=1.5;no_usage; ")
    assert fault.spec() == "latency_ms=2000;status=429;retry_after=1.5;no_usage"
    assert faults.parse(fault.spec()) == fault
    merged = fault.merged(faults.parse("status=503;cut_after=0;latency_ms=0"))
    assert merged.spec() == "latency_ms=0;status=503;retry_after=1.5;cut_after=0;no_usage"
    assert faults.parse("") == faults.NO_FAULT and faults.NO_FAULT.spec() == ""
    named = faults.parse("blocked=IMAGE_SAFETY;malformed=images;not_http;split_error_ms=5")
    assert faults.parse(named.spec()) == named and named.blocked == "IMAGE_SAFETY"


async def test_the_stats_record_every_request_including_failed_ones(simulator):
    async with post(simulator, body(user="u1", stream=True)) as response:
        await response.read()
    async with post(simulator, {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image", "image": "nope"}]}]}) as response:
        assert response.status == 400
    stats = await simulator.stats()
    assert stats["calls"] == 2 and stats["completed"] == 1
    assert stats["requests"] == [
        {"model": MODEL, "stream": True, "user": "u1", "n_images": 0, "fault": "", "traceparent": None, "status": 200, "outcome": "completed"},
        {"model": MODEL, "stream": False, "user": "-", "n_images": 1, "fault": "", "traceparent": None, "status": 400, "outcome": "error"},
    ]


async def test_the_simulator_runs_as_a_process_and_stops_on_sigterm(simulator_process):
    async with post(simulator_process, body(), "status=429;retry_after=1") as response:
        assert response.status == 429
    async with post(simulator_process, body()) as response:
        assert response.status == 200
    assert (await simulator_process.stats())["calls"] == 2


async def test_the_process_takes_its_flags_and_exits_cleanly_on_sigterm():
    async with simulator_subprocess("--fault", "status=503;retry_after=4", "--latency-ms", "1") as sim:
        assert sim.url.startswith("http://127.0.0.1:")
        async with post(sim, body()) as response:
            assert (response.status, response.headers["Retry-After"]) == (503, "4")
        assert (await sim.stats())["requests"][0]["fault"] == "latency_ms=1;status=503;retry_after=4"
        sim.process.send_signal(signal.SIGTERM)
        assert await sim.process.wait() == 0


async def test_a_client_leaving_mid_stream_counts_as_cancelled_even_without_handler_cancellation(caplog):
    """aiohttp runners default to handler_cancellation=False (the demo uses one): then the
    departure is found by the next write, and must still count, without an error logged."""
    runner = web.AppRunner(create_app(api_key=API_KEY))
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        async with aiohttp.ClientSession() as session:
            sim = RunningSimulator(f"http://127.0.0.1:{runner.addresses[0][1]}", API_KEY, session)
            async with post(sim, body(stream=True), "hold_ms=200") as response:
                await response.content.readuntil(b"\n\ndata: ")
                response.close()
            stats = await sim.wait_for_stats(lambda s: s["outcomes"] == {"cancelled": 1})
            assert stats["inflight"] == {}
        assert not [r for r in caplog.records if r.levelname == "ERROR"]
    finally:
        await runner.cleanup()


# The misbehaving provider: the key echoed, malformed 200s, non-HTTP replies, errors in pieces.


def key_spellings(escaped: bool) -> tuple[bytes, bytes]:
    """(what must appear on the wire, what must not): the escaped spelling hides the raw key."""
    raw = API_KEY.encode()
    return (b"\\u", raw) if escaped else (raw, b"\\u")


def json_string(text: str) -> str:
    """A header value that holds a JSON-escaped spelling, decoded as JSON would."""
    return orjson.loads(b'"' + text.encode() + b'"')


@pytest.mark.parametrize("escaped", [False, True], ids=["raw", "escaped"])
async def test_echo_key_quotes_the_key_in_the_error_body(simulator, escaped):
    present, absent = key_spellings(escaped)
    async with post(simulator, body(), "status=400;echo_key" + (";key_escaped" if escaped else "")) as response:
        raw = await response.read()
        assert response.status == 400
    assert present in raw and absent not in raw
    assert orjson.loads(raw)["error"]["message"] == "Incorrect API key provided: " + API_KEY


@pytest.mark.parametrize("escaped", [False, True], ids=["raw", "escaped"])
@pytest.mark.parametrize("stream,extra,status", [(False, "", 200), (True, "", 200), (False, ";status=503", 503)], ids=["json", "sse", "error"])
async def test_echo_key_header_puts_the_key_in_headers_of_every_answer(simulator, escaped, stream, extra, status):
    fault = "echo_key_header" + (";key_escaped" if escaped else "") + extra
    async with post(simulator, body(stream=stream), fault) as response:
        await response.read()
        headers = response.headers
    assert response.status == status
    assert json_string(headers["X-Debug-Authorization"]) == "Bearer " + API_KEY
    assert json_string(headers["OpenAI-Model"]).endswith("key=" + API_KEY)
    assert (API_KEY in headers["X-Debug-Authorization"]) is not escaped


@pytest.mark.parametrize("escaped", [False, True], ids=["raw", "escaped"])
async def test_echo_key_body_quotes_the_key_in_a_200_json_answer(simulator, escaped):
    present, absent = key_spellings(escaped)
    async with post(simulator, body(), "echo_key_body" + (";key_escaped" if escaped else "")) as response:
        raw = await response.read()
        assert response.status == 200
    assert present in raw and absent not in raw
    message = orjson.loads(raw)["choices"][0]["message"]
    assert message["content"] == f" (key {API_KEY})" and len(message["images"]) == 1


@pytest.mark.parametrize("escaped", [False, True], ids=["raw", "escaped"])
async def test_echo_key_stream_quotes_the_key_in_a_content_delta(simulator, escaped):
    present, absent = key_spellings(escaped)
    async with post(simulator, body(stream=True), "echo_key_stream" + (";key_escaped" if escaped else "")) as response:
        raw = await response.read()
    assert present in raw and absent not in raw
    data = sse_data(raw)
    text = "".join(chunk["choices"][0]["delta"].get("content", "") for chunk in data[:-1] if chunk["choices"])
    assert text == f"Generating your image... (key {API_KEY})" and data[-1] == "[DONE]"


@pytest.mark.parametrize("escaped", [False, True], ids=["raw", "escaped"])
async def test_echo_key_stream_error_ends_the_stream_with_an_error_event_quoting_the_key(simulator, escaped):
    present, absent = key_spellings(escaped)
    async with post(simulator, body(stream=True), "echo_key_stream_error" + (";key_escaped" if escaped else "")) as response:
        raw = await response.read()  # a clean end of the body, no [DONE]
        assert response.status == 200
    assert present in raw and absent not in raw
    *progress, last = sse_data(raw)
    assert len(progress) == 3 and "[DONE]" not in progress
    assert last["error"]["message"] == f"Upstream model error (key {API_KEY})."
    assert last["choices"][0]["finish_reason"] == "error"
    assert (await simulator.stats())["requests"][-1]["outcome"] == "stream_error"


@pytest.mark.parametrize(
    "kind,check",
    [
        ("choices", lambda answer: answer["choices"] == 1),
        ("message", lambda answer: answer["choices"][0]["message"] == "not an object"),
        ("images", lambda answer: answer["choices"][0]["message"]["images"] == 5),
    ],
)
async def test_malformed_json_answers_are_200s_of_the_wrong_shape(simulator, kind, check):
    async with post(simulator, body(), f"malformed={kind}") as response:
        assert response.status == 200
        assert check(await response.json())


@pytest.mark.parametrize(
    "kind,check",
    [
        ("choices", lambda event: event == {"choices": 1}),
        ("message", lambda event: event["choices"][0]["delta"] == "not an object"),
        ("images", lambda event: event["choices"][0]["delta"] == {"images": 5}),
    ],
)
async def test_a_malformed_stream_event_comes_after_the_progress_text_then_the_rest(simulator, kind, check):
    async with post(simulator, body(stream=True), f"malformed={kind}") as response:
        raw = await response.read()
    data = sse_data(raw)
    assert [c["choices"][0]["delta"]["content"] for c in data[:3]] == ["Generating ", "your image", "..."]
    assert check(data[3])
    [image] = data[4]["choices"][0]["delta"]["images"]  # then the answer goes on as usual
    assert image["image_url"]["url"].startswith("data:image/jpeg") and data[-1] == "[DONE]"


@pytest.mark.parametrize("stream", [False, True])
async def test_a_safety_blocked_answer_has_no_image_and_says_why(simulator, stream):
    async with post(simulator, body(stream=stream), "blocked=IMAGE_SAFETY") as response:
        assert response.status == 200
        if stream:
            data = sse_data(await response.read())
            assert data[-1] == "[DONE]" and not any(c["choices"][0]["delta"] for c in data[:-1])
            choice, usage = data[-2]["choices"][0], data[-2]["usage"]
        else:
            answer = await response.json()
            choice, usage = answer["choices"][0], answer["usage"]
            assert choice["message"]["images"] == [] and choice["message"]["content"] == ""
    assert (choice["finish_reason"], choice["native_finish_reason"]) == ("content_filter", "IMAGE_SAFETY")
    assert usage["prompt_tokens"] > 0 and usage["completion_tokens_details"]["image_tokens"] == 0


async def raw_exchange(sim: RunningSimulator, fault: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A chat request written by hand on a fresh socket, so the reply is seen as bytes."""
    payload = orjson.dumps(body())
    reader, writer = await asyncio.open_connection(*sim.url.removeprefix("http://").split(":"))
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: sim\r\nContent-Type: application/json\r\n"
        + f"Authorization: Bearer {API_KEY}\r\nX-Sim-Fault: {fault}\r\nContent-Length: {len(payload)}\r\n\r\n".encode()
        + payload
    )
    await writer.drain()
    return reader, writer


async def test_not_http_answers_bytes_that_are_no_http_then_closes(simulator):
    reader, writer = await raw_exchange(simulator, "not_http")
    reply = await reader.read()  # to EOF: the simulator closed the connection
    writer.close()
    assert reply and not reply.startswith(b"HTTP/")
    with pytest.raises(aiohttp.ClientResponseError):  # what an HTTP client makes of it
        async with post(simulator, body(), "not_http") as response:
            await response.read()
    stats = await simulator.stats()
    assert stats["calls"] == 2 and stats["outcomes"] == {"not_http": 2}  # received, then refused


async def test_reset_counts_the_request_it_received(simulator):
    with pytest.raises(aiohttp.ClientConnectionError):
        async with post(simulator, body(), "reset") as response:
            await response.read()
    stats = await simulator.stats()
    assert (stats["calls"], stats["outcomes"]) == (1, {"reset": 1})


async def test_split_error_ms_sends_the_error_body_in_two_pieces(simulator):
    async with post(simulator, body(), "status=502;split_error_ms=1000") as response:
        assert response.status == 502
        first = await response.content.readany()  # what arrived with the headers
        rest = await response.read()
    whole = first + rest
    assert 0 < len(first) <= len(whole) // 2 and len(whole) == response.content_length
    assert orjson.loads(whole)["error"]["code"] == "bad_gateway"
