"""Exact limits with every core busy: 500 concurrent requests over 3 gateway processes against
``requests_per_minute: 100`` admit exactly 100, on one Redis and on a 3-node Cluster.

On a loaded machine the store answers late; that must make requests wait, never count as an
outage (with ``on_error: open`` an outage admits unchecked: 148 of 100 were once admitted).
"""
from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from tests.fixtures.processes import FROZEN_DAY, chat, config_for, idle, ledger_day


@pytest.mark.parametrize("backend", ["redis_server", "redis_cluster"])
async def test_500_concurrent_over_3_processes_with_every_core_busy_admit_exactly_100(
        simulator_process, backend, request, processes, http):
    redis = request.getfixturevalue(backend)
    if backend == "redis_server":
        redis.start()  # another test may have stopped the session's server
    redis.flush()
    config = config_for(simulator_process, redis.url, {"burst": {"limits": {"requests_per_minute": 100}}},
                        store={"on_error": "open"})
    gateways = await processes(config, 3, fixed_clock=True)
    await simulator_process.reset()
    assert request.getfixturevalue("busy_cores") >= 1  # from here on, every core is busy

    answers = await asyncio.gather(*(chat(http, gateways[i % 3], "burst", f"poster {i}") for i in range(500)))

    assert Counter(a.status for a in answers) == {200: 100, 429: 400}
    assert {a.code for a in answers if a.status == 429} == {"rate_limit_exceeded"}
    assert (await simulator_process.stats())["calls"] == 100  # only the admitted reached upstream
    await idle(gateways)
    assert (await ledger_day(redis.url, "burst", FROZEN_DAY))["requests"] == 100
