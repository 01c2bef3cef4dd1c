"""The upstream seam against the simulator: which answers are retried, and how long it waits."""
from __future__ import annotations

import orjson
import pytest

from gateway.config import UpstreamConfig
from gateway.errors import UpstreamUnavailable
from gateway.upstream.client import Upstream

BODY = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "x"}]})


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


async def test_retry_after_is_honoured_and_backoff_is_jittered_and_growing(upstream, simulator):
    await simulator.script(["status=429;retry_after=1.5", "status=502", "status=503", ""])
    attempted = await upstream.open(BODY, request_id="r1", model="m")
    assert attempted.response.status == 200
    attempted.response.release()
    assert upstream.waits[0] == 1.5  # the upstream said when
    assert 0 <= upstream.waits[1] <= 0.5 and 0 <= upstream.waits[2] <= 1.0  # full jitter, doubling cap
    assert (await simulator.stats())["calls"] == 4


@pytest.mark.parametrize("status", [400, 401, 404, 500])
async def test_other_statuses_are_final(upstream, simulator, status):
    await simulator.script([f"status={status}"])
    attempted = await upstream.open(BODY, request_id="r2", model="m")
    assert attempted.response.status == status
    attempted.response.release()
    assert (await simulator.stats())["calls"] == 1 and upstream.waits == []


async def test_the_last_retryable_answer_is_returned_when_retries_run_out(upstream, simulator):
    await simulator.script(["status=503"] * 4)
    attempted = await upstream.open(BODY, request_id="r3", model="m")
    assert attempted.response.status == 503
    attempted.response.release()
    assert (await simulator.stats())["calls"] == 4


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
