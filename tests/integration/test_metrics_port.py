"""``server.metrics_port``: the metrics on their own port (so a Kubernetes NetworkPolicy, which
filters by port, can keep them from the API's clients), as real ``gateway serve`` processes.

With it set the API port answers 404 for the metrics path; the metrics port answers nothing else;
with ``--workers 2`` both workers bind it and a scrape sums them, whichever one answers.
"""
from __future__ import annotations

import signal

import aiohttp
import orjson
import pytest
import yaml

from gateway.config import ConfigError
from gateway.config.loader import parse as parse_config
from gateway.server import free_port
from tests.e2e.test_metrics import parse, samples
from tests.fixtures.gateway import gateway_config, team_key, wait_for
from tests.integration.test_reload import log_messages
from tests.integration.test_workers import served_by, two_workers

MODEL = "google/gemini-3-pro-image-preview"


async def chat(http: aiohttp.ClientSession, url: str) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "a lighthouse at dusk"}]}
    headers = {"Authorization": f"Bearer {team_key('alpha')}", "Connection": "close"}  # a new worker each time
    async with http.post(url + "/v1/chat/completions", json=body, headers=headers) as resp:
        assert resp.status == 200, await resp.text()


async def scrape(http: aiohttp.ClientSession, metrics_url: str) -> list:
    async with http.get(metrics_url, headers={"Connection": "close"}) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        return parse(await resp.text())


async def requests_total(http: aiohttp.ClientSession, metrics_url: str) -> float:
    families = await scrape(http, metrics_url)
    return sum(samples(families, "gateway_requests_total", "team", "model", "status", "cache", "stream").values())


async def test_metrics_are_served_only_on_the_metrics_port(simulator, gateway_processes):
    port = free_port("127.0.0.1")
    gw = gateway_processes(gateway_config(simulator.url, simulator.api_key, server={"metrics_port": port}))
    metrics_url = f"http://127.0.0.1:{port}/metrics"
    async with aiohttp.ClientSession() as http:
        await chat(http, gw.url)
        async with http.get(gw.url + "/metrics") as resp:  # the API port: as any unknown path
            assert resp.status == 404
            assert orjson.loads(await resp.read())["error"]["type"]
        await gw.idle()  # the chat is counted after its answer
        assert await requests_total(http, metrics_url) == 1  # the chat; scrapes are not counted
        assert await requests_total(http, metrics_url) == 1
        for path in ("/v1/models", "/healthz"):  # the metrics port serves the metrics alone
            async with http.get(f"http://127.0.0.1:{port}{path}",
                                headers={"Authorization": f"Bearer {team_key('alpha')}"}) as resp:
                assert resp.status == 404
        async with http.get(gw.url + "/healthz") as resp:
            assert resp.status == 200


async def test_two_workers_both_serve_the_metrics_port_and_it_sums_them(
        simulator, redis_server, gateway_processes, tmp_path):
    redis_server.start()  # a test may have stopped the shared server
    redis_server.flush()
    metrics_dir = tmp_path / "multiproc"
    metrics_dir.mkdir()
    port = free_port("127.0.0.1")
    config = gateway_config(simulator.url, simulator.api_key, store={"url": redis_server.url},
                            server={"metrics_port": port})
    gw = gateway_processes(config, workers=2, env={"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)})
    workers = await wait_for(lambda: two_workers(gw.process.pid), timeout_s=30)
    metrics_url = f"http://127.0.0.1:{port}/metrics"
    sent = 0
    async with aiohttp.ClientSession() as http:
        async def both_served() -> bool:  # requests until each worker has counted some
            nonlocal sent
            if all(served_by(metrics_dir, pid) for pid in workers):
                return True
            await chat(http, gw.url)
            sent += 1
            return False

        await wait_for(both_served, timeout_s=60)
        await gw.idle()  # the last chat is counted after its answer
        for _ in range(6):  # fresh connections: the kernel hands them to either worker
            assert await requests_total(http, metrics_url) == sent
        async with http.get(gw.url + "/metrics", headers={"Connection": "close"}) as resp:
            assert resp.status == 404


async def test_a_changed_metrics_port_needs_a_restart(simulator, gateway_processes, tmp_path):
    before, after = free_port("127.0.0.1"), free_port("127.0.0.1")
    gw = gateway_processes(gateway_config(simulator.url, simulator.api_key, server={"metrics_port": before}))
    moved = gateway_config(simulator.url, simulator.api_key, server={"metrics_port": after})
    (tmp_path / "gw0.yaml").write_text(yaml.safe_dump(moved))
    gw.process.send_signal(signal.SIGHUP)
    await wait_for(lambda: any("server.metrics_port changed; it needs a restart" in m
                               for m in log_messages(tmp_path)))
    async with aiohttp.ClientSession() as http:
        families = await scrape(http, f"http://127.0.0.1:{before}/metrics")  # still where it was
        assert samples(families, "gateway_config_reloads_total", "result")[("success",)] == 1
        with pytest.raises(aiohttp.ClientConnectionError):
            await scrape(http, f"http://127.0.0.1:{after}/metrics")


@pytest.mark.parametrize(("server", "problem"), [
    ({"metrics_port": 8080}, "server.metrics_port: must differ from server.port"),
    ({"port": 9000, "metrics_port": 9000}, "server.metrics_port: must differ from server.port"),
    ({"metrics_port": 0}, "server.metrics_port: must be an integer from 1 to 65535, or null (metrics on server.port)"),
])
def test_a_metrics_port_must_be_a_port_of_its_own(server, problem):
    """0 (any free port) would give every worker another one: Prometheus could not find them."""
    with pytest.raises(ConfigError) as refused:
        parse_config({"server": server})
    assert refused.value.problems == [problem]
