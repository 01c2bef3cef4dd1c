"""Fault injection, the scripted queue and the stats, through real HTTP.

No assertion here measures time: slow faults are checked by what the simulator's stats say
while the client is waiting (order of events), and long holds are ended by the client leaving.
"""
from __future__ import annotations

import asyncio
import signal
from typing import Any

import aiohttp
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


@pytest.mark.parametrize("spec", ["status=200", "lag_ms=5", "latency_ms=-1", "cut_after", "reset=1", "image_mb=x"])
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


async def test_the_stats_record_every_request_including_failed_ones(simulator):
    async with post(simulator, body(user="u1", stream=True)) as response:
        await response.read()
    async with post(simulator, {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image", "image": "nope"}]}]}) as response:
        assert response.status == 400
    stats = await simulator.stats()
    assert stats["calls"] == 2 and stats["completed"] == 1
    assert stats["requests"] == [
        {"model": MODEL, "stream": True, "user": "u1", "n_images": 0, "fault": "", "status": 200, "outcome": "completed"},
        {"model": MODEL, "stream": False, "user": "-", "n_images": 1, "fault": "", "status": 400, "outcome": "error"},
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
