"""Reloading the config of a real ``gateway serve`` process: on SIGHUP, on a change of the file
with ``server.watch_config`` (written in place, and the symlink swap Kubernetes does for a
mounted ConfigMap), across 2 workers through the supervisor. New requests get the new config
(limits, keys) while one in flight finishes under the old; an invalid file keeps the old config
and logs every problem by key path; a restart-only key is logged and kept; the two reload
metrics count it all."""
from __future__ import annotations

import os
import signal
from pathlib import Path

import aiohttp
import orjson
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.fixtures.gateway import RunningGateway, gateway_config, team_key, wait_for
from tests.fixtures.processes import MODEL
from tests.fixtures.simulator import sse_data


def config(sim, *, rpm: int = 60, teams=("alpha", "beta"), **sections) -> dict:
    return gateway_config(sim.url, sim.api_key, {name: {"limits": {"requests_per_minute": rpm}} for name in teams},
                          **sections)


def rewrite(path: Path, cfg: dict) -> None:
    path.write_text(yaml.safe_dump(cfg))


async def chat(gw: RunningGateway, team: str, **extra) -> aiohttp.ClientResponse:
    """A request on a connection of its own (with several workers, any of them takes it)."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": "a paper boat"}], **extra}
    headers = {"Authorization": f"Bearer {team_key(team)}"}
    async with aiohttp.ClientSession() as http, http.post(gw.url + "/v1/chat/completions", json=body,
                                                          headers=headers) as resp:
        await resp.read()
        return resp


async def metric(gw: RunningGateway, name: str, **labels: str) -> float:
    async with aiohttp.ClientSession() as http, http.get(gw.url + "/metrics") as resp:
        text = await resp.text()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return s.value
    raise AssertionError(f"no {name}{labels} in the scrape")


async def reloads(gw: RunningGateway, result: str) -> float:
    return await metric(gw, "gateway_config_reloads_total", result=result)


async def reloaded_at(gw: RunningGateway) -> float:
    return await metric(gw, "gateway_config_last_reload_success_timestamp_seconds")


async def wait_reloads(gw: RunningGateway, result: str, n: int) -> None:
    async def done() -> bool:
        return await reloads(gw, result) == n
    await wait_for(done)


def log_messages(tmp_path: Path, name: str = "gw0") -> list[str]:
    out = []
    for raw in (tmp_path / f"{name}.log").read_text().splitlines():
        try:
            out.append(orjson.loads(raw).get("message", ""))
        except orjson.JSONDecodeError:
            out.append(raw)
    return out


async def test_sighup_applies_limits_and_revokes_a_key_while_a_request_in_flight_finishes(
        simulator, gateway_processes, tmp_path):
    gw = gateway_processes(config(simulator))
    started_at = await reloaded_at(gw)
    assert started_at > 0  # set at start-up
    assert (await chat(gw, "alpha")).headers["x-ratelimit-limit-requests"] == "60"
    await simulator.script(["hold_ms=1500"])
    async with aiohttp.ClientSession() as http:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "in flight"}], "stream": True}
        async with http.post(gw.url + "/v1/chat/completions", json=body,
                             headers={"Authorization": f"Bearer {team_key('beta')}"}) as in_flight:
            first = await in_flight.content.readuntil(b"\n\n")

            rewrite(tmp_path / "gw0.yaml", config(simulator, rpm=100, teams=("alpha",)))  # beta's key revoked
            gw.process.send_signal(signal.SIGHUP)
            await wait_reloads(gw, "success", 1)

            assert (await chat(gw, "alpha")).headers["x-ratelimit-limit-requests"] == "100"
            assert (await chat(gw, "beta")).status == 401
            events = sse_data(first + await in_flight.read())  # admitted under the old config: it finishes
    assert events[-1] == "[DONE]" and not any("error" in e for e in events[:-1])
    assert await reloads(gw, "failure") == 0
    assert await reloaded_at(gw) > started_at


async def test_an_invalid_file_keeps_the_config_and_a_restart_only_key_is_kept(simulator, gateway_processes, tmp_path):
    gw = gateway_processes(config(simulator))
    path = tmp_path / "gw0.yaml"
    bad = config(simulator, rpm=-1)
    bad["server"]["prot"] = 8080
    rewrite(path, bad)
    gw.process.send_signal(signal.SIGHUP)
    await wait_reloads(gw, "failure", 1)
    messages = log_messages(tmp_path)
    assert any("teams[0].limits.requests_per_minute: must be a positive integer" in m for m in messages)
    assert any("teams[1].limits.requests_per_minute: must be a positive integer" in m for m in messages)
    assert any("server.prot: unknown key" in m for m in messages)
    assert (await chat(gw, "alpha")).headers["x-ratelimit-limit-requests"] == "60"  # the old config stays
    loaded_at = await reloaded_at(gw)

    moved = config(simulator, rpm=75)
    moved["server"]["port"] = 1
    moved["store"]["url"] = "redis://127.0.0.1:1/0"
    rewrite(path, moved)
    gw.process.send_signal(signal.SIGHUP)
    await wait_reloads(gw, "success", 1)
    messages = log_messages(tmp_path)
    assert any("server.port changed; it needs a restart" in m for m in messages)
    assert any("store.url changed; it needs a restart" in m for m in messages)
    resp = await chat(gw, "alpha")  # same port, same embedded store: the rest applied
    assert resp.status == 200 and resp.headers["x-ratelimit-limit-requests"] == "75"
    assert await reloaded_at(gw) > loaded_at


async def test_watch_config_follows_a_rewrite_and_a_configmap_symlink_swap(simulator, gateway_processes, tmp_path):
    gw = gateway_processes(config(simulator, server={"host": "127.0.0.1", "port": 0, "watch_config": True}))
    path = tmp_path / "gw0.yaml"

    def with_rpm(rpm: int) -> dict:
        return config(simulator, rpm=rpm, server={"host": "127.0.0.1", "port": 0, "watch_config": True})

    async def limit() -> str:
        return (await chat(gw, "alpha")).headers["x-ratelimit-limit-requests"]

    rewrite(path, with_rpm(70))  # edited in place
    await wait_reloads(gw, "success", 1)
    assert await limit() == "70"

    # What kubelet does: gw0.yaml -> ..data/gw0.yaml, ..data -> a timestamped directory, and an
    # update points ..data at a new directory in one rename.
    for version, rpm in (("..v1", 80), ("..v2", 90)):
        (tmp_path / version).mkdir()
        rewrite(tmp_path / version / "gw0.yaml", with_rpm(rpm))
        os.symlink(version, tmp_path / "..data_tmp")
        os.replace(tmp_path / "..data_tmp", tmp_path / "..data")
        if version == "..v1":
            os.symlink("..data/gw0.yaml", tmp_path / "link_tmp")
            os.replace(tmp_path / "link_tmp", path)
        await wait_reloads(gw, "success", 2 if version == "..v1" else 3)
        assert await limit() == str(rpm)


async def test_every_worker_reloads_a_revoked_key(simulator, shared_redis, gateway_processes, tmp_path):
    cfg = config(simulator, store={"url": shared_redis.url})
    gw = gateway_processes(cfg, workers=2)
    assert (await chat(gw, "beta")).status == 200
    rewrite(tmp_path / "gw0.yaml", config(simulator, teams=("alpha",), store={"url": shared_redis.url}))
    gw.process.send_signal(signal.SIGHUP)  # to the supervisor, which passes it to each worker
    await wait_reloads(gw, "success", 2)  # summed over the two workers
    for _ in range(6):  # a connection each: both workers answer some
        assert (await chat(gw, "beta")).status == 401
    assert (await chat(gw, "alpha")).status == 200
