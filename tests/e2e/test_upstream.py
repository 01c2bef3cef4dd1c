"""The upstream seam against the simulator: which answers are retried, how long it waits, and
that nothing but our own errors leaves it."""
from __future__ import annotations

import asyncio

import orjson
import pytest

from gateway.config import UpstreamConfig
from gateway.errors import UpstreamUnavailable
from gateway.upstream.client import Upstream

BODY = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "x"}]})
STREAM_BODY = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": True})


@pytest.fixture
async def upstream(simulator):
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    up = Upstream(UpstreamConfig(base_url=simulator.url, api_key=simulator.api_key, max_retries=3), sleep=sleep)
    await up.start()
    up.waits = waits
    yield up
    await up.close()


async def test_429_and_503_with_retry_after_are_retried_with_honoured_waits_and_growing_jitter(upstream, simulator):
    await simulator.script(["status=429;retry_after=1.5", "status=429", "status=503;retry_after=0", ""])
    response = await upstream.open(BODY, request_id="r1", model="m")
    assert response.status == 200
    response.release()
    assert upstream.waits[0] == 1.5  # the upstream said when
    assert 0 <= upstream.waits[1] <= 0.5 and upstream.waits[2] == 0  # full jitter, doubling cap
    assert (await simulator.stats())["calls"] == 4


@pytest.mark.parametrize("status", [400, 401, 404, 500, 502, 503, 504])
async def test_an_answer_the_provider_may_have_worked_on_is_final(upstream, simulator, status):
    """A 503 without Retry-After, a 502 or a 504 may come after the provider started (and
    billed) the work: sending it again could bill it twice."""
    await simulator.script([f"status={status}"])
    response = await upstream.open(BODY, request_id="r2", model="m")
    assert response.status == status
    response.release()
    assert (await simulator.stats())["calls"] == 1 and upstream.waits == []


async def test_the_last_retryable_answer_is_returned_when_retries_run_out(upstream, simulator):
    await simulator.script(["status=429"] * 4)
    response = await upstream.open(BODY, request_id="r3", model="m")
    assert response.status == 429
    response.release()
    assert (await simulator.stats())["calls"] == 4


async def test_a_wait_past_the_deadline_is_not_taken_the_answer_is_final(upstream, simulator):
    await simulator.script(["status=429;retry_after=20", ""])
    deadline = asyncio.get_running_loop().time() + 10
    response = await upstream.open(BODY, request_id="r5", model="m", deadline=deadline)
    assert response.status == 429 and response.headers["Retry-After"] == "20"
    response.release()
    assert (await simulator.stats())["calls"] == 1 and upstream.waits == []


async def test_a_reset_after_the_request_was_sent_is_not_sent_again(upstream, simulator):
    await simulator.script(["reset", ""])
    with pytest.raises(UpstreamUnavailable):
        await upstream.open(BODY, request_id="r6", model="m")
    assert (await simulator.stats())["calls"] == 1


async def test_the_body_is_read_through_the_seam_and_its_errors_are_ours(upstream, simulator):
    await simulator.script(["cut_after=1"])
    response = await upstream.open(STREAM_BODY, request_id="r7", model="m")
    with pytest.raises(UpstreamUnavailable):
        while await response.readany():
            pass
    response.release()


async def test_an_unreachable_upstream_is_upstream_unavailable_after_retries():
    waits = []

    async def sleep(s):
        waits.append(s)

    from gateway.server import free_port

    up = Upstream(UpstreamConfig(base_url=f"http://127.0.0.1:{free_port('127.0.0.1')}", max_retries=2), sleep=sleep)
    await up.start()
    try:
        with pytest.raises(UpstreamUnavailable):
            await up.open(BODY, request_id="r4", model="m")
    finally:
        await up.close()
    assert len(waits) == 2
