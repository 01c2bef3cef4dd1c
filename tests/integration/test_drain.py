"""SIGTERM drains a real ``gateway serve`` process (and a supervisor of 2 workers) with requests
in flight on a real simulator, whose ``hold_ms`` / ``latency_ms`` faults keep them there:
``/readyz`` 503 draining and ``gateway_draining`` 1 at once, connections still served during
``drain_delay_s``, the listener closed after it (a kept-alive connection gets 503
shutting_down), in-flight JSON and SSE finishing normally, what outlives ``shutdown_timeout_s``
(or a second signal) ended with shutting_down; every admitted request settled in the usage
ledger and logged; exit 0."""
from __future__ import annotations

import asyncio
import signal
from datetime import UTC, datetime

import aiohttp
import orjson
import pytest

from tests.fixtures.gateway import RunningGateway, gateway_config, team_key, wait_for
from tests.fixtures.processes import MODEL, ledger_day
from tests.fixtures.simulator import sse_data

TEAM = "alpha"


def config(sim, redis, **server) -> dict:
    return gateway_config(sim.url, sim.api_key, {TEAM: {}}, store={"url": redis.url},
                          server={"host": "127.0.0.1", "port": 0, **server})


def body(prompt: str, **extra) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": prompt}], **extra}


HEADERS = {"Authorization": f"Bearer {team_key(TEAM)}"}


async def open_stream(http: aiohttp.ClientSession, gw: RunningGateway, prompt: str):
    """A streaming request whose answer has started: (response, its first event)."""
    resp = await http.post(gw.url + "/v1/chat/completions", json=body(prompt, stream=True), headers=HEADERS)
    assert resp.status == 200
    return resp, await resp.content.readuntil(b"\n\n")


async def finish_stream(resp: aiohttp.ClientResponse, first: bytes) -> list:
    try:
        return sse_data(first + await resp.read())
    finally:
        resp.release()


async def post_json(http: aiohttp.ClientSession, gw: RunningGateway, prompt: str) -> tuple[int, dict]:
    async with http.post(gw.url + "/v1/chat/completions", json=body(prompt), headers=HEADERS) as resp:
        return resp.status, orjson.loads(await resp.read())


async def get(http: aiohttp.ClientSession, url: str) -> tuple[int, bytes]:
    async with http.get(url, headers={"Connection": "close"}) as resp:
        return resp.status, await resp.read()


async def readyz_unless_ok(http: aiohttp.ClientSession, gw: RunningGateway) -> tuple[int, bytes] | None:
    status, raw = await get(http, gw.url + "/readyz")
    return None if status == 200 else (status, raw)


async def exited(gw: RunningGateway, timeout_s: float = 30) -> int:
    return await asyncio.to_thread(gw.process.wait, timeout_s)


async def refused(url: str) -> bool:
    """True once a new connection to the gateway is refused (its listener closed)."""
    host, port = url.split("//", 1)[1].rsplit(":", 1)
    try:
        _, writer = await asyncio.open_connection(host, int(port))
    except OSError:
        return True
    writer.close()
    return False


def access_lines(tmp_path, name: str) -> list[dict]:
    lines = []
    for raw in (tmp_path / f"{name}.log").read_text().splitlines():
        try:
            line = orjson.loads(raw)
        except orjson.JSONDecodeError:
            continue
        if line.get("path") == "/v1/chat/completions":
            lines.append(line)
    return lines


def today() -> str:
    return datetime.now(UTC).date().isoformat()


@pytest.fixture
async def http():
    async with aiohttp.ClientSession() as session:
        yield session


async def test_in_flight_json_and_sse_finish_and_a_kept_alive_connection_gets_shutting_down(
        simulator, shared_redis, gateway_processes, tmp_path, http):
    gw = gateway_processes(config(simulator, shared_redis, drain_delay_s=0, shutdown_timeout_s=60))
    kept = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1))  # one connection, kept alive
    try:
        async with kept.get(gw.url + "/healthz") as resp:
            assert resp.status == 200
        await simulator.script(["hold_ms=1500", "latency_ms=1500"])
        stream = await open_stream(http, gw, "a stream in flight")
        json_call = asyncio.create_task(post_json(http, gw, "a JSON request in flight"))
        await simulator.wait_for_stats(lambda s: sum(s["inflight"].values()) == 2)

        gw.process.send_signal(signal.SIGTERM)
        await wait_for(lambda: refused(gw.url))
        async with kept.get(gw.url + "/v1/models", headers=HEADERS) as resp:  # on the kept-alive connection
            assert resp.status == 503
            assert (await resp.json())["error"]["code"] == "shutting_down"

        events = await finish_stream(*stream)
        assert events[-1] == "[DONE]" and not any("error" in e for e in events[:-1])
        status, answer = await json_call
        assert status == 200 and answer["choices"][0]["message"]["images"]
        assert await exited(gw) == 0
    finally:
        await kept.close()
    assert (await ledger_day(shared_redis.url, TEAM, today()))["requests"] == 2
    assert sorted(line["status"] for line in access_lines(tmp_path, "gw0")) == [200, 200]


async def test_readyz_says_draining_at_once_connections_are_served_and_a_second_signal_stops(
        simulator, shared_redis, gateway_processes, tmp_path, http):
    gw = gateway_processes(config(simulator, shared_redis, drain_delay_s=60, shutdown_timeout_s=120))
    assert (await get(http, gw.url + "/readyz"))[0] == 200
    await simulator.script(["hold_ms=60000"])
    stream = await open_stream(http, gw, "a long stream")

    gw.process.send_signal(signal.SIGTERM)
    status, raw = await wait_for(lambda: readyz_unless_ok(http, gw))
    assert status == 503 and orjson.loads(raw) == {"status": "draining"}
    metrics = (await get(http, gw.url + "/metrics"))[1].decode()
    assert "gateway_draining 1.0" in metrics
    async with http.post(gw.url + "/v1/chat/completions", json=body("still served during drain_delay_s"),
                         headers=HEADERS) as resp:  # and told to go elsewhere next time
        assert (resp.status, resp.headers["Connection"]) == (200, "close")
        await resp.read()

    gw.process.send_signal(signal.SIGTERM)  # the second: at once, not after 60 s
    events = await finish_stream(*stream)
    assert events[-1]["error"]["code"] == "shutting_down"
    assert await exited(gw) == 0
    assert (await ledger_day(shared_redis.url, TEAM, today()))["requests"] == 2
    codes = sorted((line["status"], line["error_code"] or "-") for line in access_lines(tmp_path, "gw0"))
    assert codes == [(200, "-"), (200, "shutting_down")]


async def test_what_outlives_shutdown_timeout_ends_with_shutting_down(
        simulator, shared_redis, gateway_processes, tmp_path, http):
    gw = gateway_processes(config(simulator, shared_redis, drain_delay_s=0, shutdown_timeout_s=1))
    await simulator.script(["hold_ms=60000", "latency_ms=60000"])
    stream = await open_stream(http, gw, "a stream past the timeout")
    json_call = asyncio.create_task(post_json(http, gw, "a JSON request past the timeout"))
    await simulator.wait_for_stats(lambda s: sum(s["inflight"].values()) == 2)

    gw.process.send_signal(signal.SIGTERM)
    events = await finish_stream(*stream)
    assert events[-1]["error"]["code"] == "shutting_down"
    status, answer = await json_call
    assert status == 503 and answer["error"]["code"] == "shutting_down"
    assert await exited(gw) == 0
    day = await ledger_day(shared_redis.url, TEAM, today())
    assert day["requests"] == 2  # both admitted, both settled
    codes = sorted((line["status"], line["error_code"]) for line in access_lines(tmp_path, "gw0"))
    assert codes == [(200, "shutting_down"), (503, "shutting_down")]


async def test_probes_answer_on_kept_alive_connections_after_the_listener_closed(
        simulator, shared_redis, gateway_processes, http):
    gw = gateway_processes(config(simulator, shared_redis, drain_delay_s=0, shutdown_timeout_s=60))
    ready, health = (aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) for _ in range(2))
    try:
        for session in (ready, health):  # each keeps one connection open, opened before the drain
            async with session.get(gw.url + "/healthz") as resp:
                assert resp.status == 200 and "Connection" not in resp.headers
        await simulator.script(["hold_ms=60000"])
        stream = await open_stream(http, gw, "keeps the replica draining")

        gw.process.send_signal(signal.SIGTERM)
        await wait_for(lambda: refused(gw.url))
        async with ready.get(gw.url + "/readyz") as resp:
            assert (resp.status, await resp.json(), resp.headers["Connection"]) == (503, {"status": "draining"}, "close")
        async with health.get(gw.url + "/healthz") as resp:
            assert (resp.status, await resp.json()) == (200, {"status": "ok"})

        gw.process.send_signal(signal.SIGTERM)  # the second: stop now
        events = await finish_stream(*stream)
        assert events[-1]["error"]["code"] == "shutting_down"
        assert await exited(gw) == 0
    finally:
        await ready.close()
        await health.close()


async def test_a_json_answer_is_the_clients_before_a_stalled_settle_and_the_shutdown_timeout_spares_it(
        simulator, fresh_redis_server, gateway_processes, http):
    """The answer goes out before the settle: a hung store delays no answer, and the shutdown
    timeout never turns an answer the provider was paid for into a 503 (the client would retry)."""
    gw = gateway_processes(config(simulator, fresh_redis_server, drain_delay_s=0, shutdown_timeout_s=1))
    await simulator.script(["latency_ms=1500"])
    json_call = asyncio.create_task(post_json(http, gw, "answered, then settled"))
    await simulator.wait_for_stats(lambda s: sum(s["inflight"].values()) == 1)
    fresh_redis_server.pause()  # the settle that follows the answer hangs
    try:
        await simulator.wait_for_stats(lambda s: sum(s["inflight"].values()) == 0)
        gw.process.send_signal(signal.SIGTERM)
        status, answer = await json_call
        assert status == 200 and answer["choices"][0]["message"]["images"]
    finally:
        fresh_redis_server.resume()
    assert await exited(gw) == 0
    assert (await ledger_day(fresh_redis_server.url, TEAM, today()))["requests"] == 1


async def test_the_supervisor_drains_every_worker(simulator, shared_redis, gateway_processes, tmp_path):
    gw = gateway_processes(config(simulator, shared_redis, drain_delay_s=0, shutdown_timeout_s=60), workers=2)
    n = 6
    await simulator.script(["hold_ms=1500"] * n)
    sessions = [aiohttp.ClientSession() for _ in range(n)]  # a connection each: both workers take some
    try:
        streams = [await open_stream(s, gw, f"stream {i}") for i, s in enumerate(sessions)]
        gw.process.send_signal(signal.SIGTERM)
        for stream in streams:
            events = await finish_stream(*stream)
            assert events[-1] == "[DONE]"
        assert await exited(gw) == 0
    finally:
        for s in sessions:
            await s.close()
    assert (await ledger_day(shared_redis.url, TEAM, today()))["requests"] == n
