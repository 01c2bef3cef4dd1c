"""The fleet: 3 `gateway serve` replicas on one redis-server behind a real nginx, restarted one
by one under a steady mix of JSON and SSE requests, as a Kubernetes rollout does it.

Each step: start a new replica; add it to nginx (reload); SIGTERM the old one; as soon as the
old one's /readyz says 503 `draining` (what a load balancer's health check acts on), take it out
of nginx (reload); wait for it to exit 0. The old replica must keep serving new connections
(server.drain_delay_s) until nginx has moved, and finish what it holds. Then: no request failed,
nginx never found a closed replica, and the usage ledger counts every request with its tokens.
"""
from __future__ import annotations

import asyncio
import itertools
import signal
import subprocess
import sys

import aiohttp
import orjson
import yaml

from tests.fixtures.gateway import RunningGateway, team_key, wait_for
from tests.fixtures.processes import HANG_GUARD_S, MODEL, REPO_ROOT, config_for
from tests.fixtures.simulator import running_simulator, sse_data

TEAM = "alpha"
CONCURRENCY = 6
MAX_REQUESTS = 2000  # the load stops after the restarts; this bounds it whatever happens
DRAIN_DELAY_S = 2  # > the time nginx takes to reload (tens of ms), with margin on a busy machine
HELD_MS = DRAIN_DELAY_S * 1000 + 1000  # requests in flight at SIGTERM outlive the listener


async def ask(session: aiohttp.ClientSession, url: str, i: int, *, stream: bool, fault: str = "",
              user: str | None = None) -> dict:
    """One chat request, checked as a user would; returns its usage."""
    payload = {"model": MODEL, "messages": [{"role": "user", "content": f"a tin robot {i}"}], "stream": stream}
    if stream:  # a stream that lasts: some are mid-way when their replica is told to stop
        payload |= {"stream_options": {"include_usage": True}, "sim_fault": fault or "drip_ms=60"}
    elif fault:
        payload["sim_fault"] = fault
    if user:
        payload["user"] = user
    headers = {"Authorization": f"Bearer {team_key(TEAM)}", "X-Request-ID": f"fleet-{i}"}
    async with session.post(url + "/v1/chat/completions", json=payload, headers=headers) as resp:
        body = await resp.read()
    assert resp.status == 200, f"HTTP {resp.status}: {body[:300]!r}"
    if not stream:
        answer = orjson.loads(body)
        assert answer["choices"][0]["message"]["images"], "no image in the answer"
        return answer["usage"]
    events = sse_data(body)
    assert events and events[-1] == "[DONE]", f"stream did not end with [DONE]: {body[-300:]!r}"
    assert not any(isinstance(e, dict) and "error" in e for e in events), f"error event: {body[-300:]!r}"
    return next(e["usage"] for e in reversed(events[:-1]) if isinstance(e, dict) and e.get("usage"))


class Mix:
    """CONCURRENCY clients through the load balancer, alternating JSON and SSE, each request on a
    fresh connection (a kept-alive one to nginx could be closed under it by nginx's own reload,
    a race of the client's, not the gateway's). Every answer is checked as a user would."""

    def __init__(self, url: str):
        self.url = url
        self.ids = itertools.count()
        self.ok: list[dict] = []  # usage of every complete answer
        self.failures: list[str] = []
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task] = []

    async def _client(self, session: aiohttp.ClientSession) -> None:
        while not self._stop.is_set():
            i = next(self.ids)
            if i >= MAX_REQUESTS:
                return
            try:
                usage = await asyncio.wait_for(ask(session, self.url, i, stream=i % 2 == 1), HANG_GUARD_S)
                self.ok.append(usage)
            except Exception as e:  # noqa: BLE001 - every failure is the finding
                self.failures.append(f"request fleet-{i}: {type(e).__name__}: {e}")

    async def run(self) -> None:
        connector = aiohttp.TCPConnector(limit=0, force_close=True)
        async with aiohttp.ClientSession(connector=connector) as session:
            await asyncio.gather(*(self._client(session) for _ in range(CONCURRENCY)))

    def start(self) -> None:
        self._tasks.append(asyncio.create_task(self.run()))

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    async def more(self, n: int) -> None:
        """Wait until n more requests have completed (so each phase really carries traffic)."""
        target = len(self.ok) + len(self.failures) + n
        await wait_for(lambda: len(self.ok) + len(self.failures) >= target or self._tasks[0].done(), timeout_s=60)


async def _hold(http: aiohttp.ClientSession, sim, gw: RunningGateway, k: int) -> list[asyncio.Task]:
    """A JSON request and a stream straight to ``gw`` that the provider holds past the drain
    delay, both in flight (seen by the provider) when this returns."""
    users = [f"held-json-{k}", f"held-sse-{k}"]
    tasks = [asyncio.create_task(ask(http, gw.url, 10_000 + 2 * k, stream=False, fault=f"latency_ms={HELD_MS}", user=users[0])),
             asyncio.create_task(ask(http, gw.url, 10_001 + 2 * k, stream=True, fault=f"hold_ms={HELD_MS}", user=users[1]))]
    await sim.wait_for_stats(lambda s: all(s["inflight"].get(u) == 1 for u in users))
    return tasks


async def _readyz(http: aiohttp.ClientSession, gw: RunningGateway) -> tuple[int, dict] | None:
    try:
        async with http.get(gw.url + "/readyz") as resp:
            return resp.status, orjson.loads(await resp.read())
    except aiohttp.ClientError:
        return None


async def _draining(http: aiohttp.ClientSession, gw: RunningGateway) -> bool:
    if gw.process.poll() is not None:
        raise AssertionError(f"the replica exited ({gw.process.returncode}) without answering /readyz 503 draining")
    return await _readyz(http, gw) == (503, {"status": "draining"})


async def test_rolling_restart_behind_nginx_loses_no_request(shared_redis, processes, nginx_lb, http, tmp_path):
    async with running_simulator(latency_ms=200) as sim:
        config = config_for(sim, shared_redis.url, {TEAM: {}}, cache={"mode": "off"},
                            server={"drain_delay_s": DRAIN_DELAY_S, "shutdown_timeout_s": 30})
        replicas = await processes(config, 3)
        every_replica = [gw.url for gw in replicas]
        await nginx_lb.start(every_replica)
        mix = Mix(nginx_lb.url)
        mix.start()
        await mix.more(CONCURRENCY)

        stopped: list[RunningGateway] = []
        held: list[asyncio.Task] = []  # requests each old replica holds at its SIGTERM
        for _ in range(3):  # as a Deployment with maxSurge 1: the next starts while the last drains
            old, rest = replicas[0], replicas[1:]
            [new] = await processes(config, 1)
            every_replica.append(new.url)
            await nginx_lb.route_to([gw.url for gw in replicas] + [new.url])
            held += await _hold(http, sim, old, len(stopped))
            stopped.append(old)
            old.process.send_signal(signal.SIGTERM)
            await wait_for(lambda gw=old: _draining(http, gw))
            replicas = [*rest, new]
            await nginx_lb.route_to([gw.url for gw in replicas])
            await mix.more(CONCURRENCY)
        assert [await asyncio.to_thread(gw.process.wait, 60) for gw in stopped] == [0, 0, 0]
        mix.ok += await asyncio.gather(*held)  # answered whole, past the listener's close
        await mix.stop()
        for gw in replicas:  # the last ones drain together, idle
            gw.process.send_signal(signal.SIGTERM)
        assert [await asyncio.to_thread(gw.process.wait, 60) for gw in replicas] == [0, 0, 0]

    assert mix.failures == [], f"{len(mix.failures)} of {len(mix.ok) + len(mix.failures)} failed:\n" + \
        "\n".join(mix.failures[:20])
    errors = [line for line in nginx_lb.error_log().splitlines() if "upstream" in line]
    assert errors == [], "nginx met a replica that no longer took connections:\n" + "\n".join(errors)
    proxied = [p for p in nginx_lb.access_log() if p.uri == "/v1/chat/completions"]
    assert {url.split("://")[1] for url in every_replica} <= {a for p in proxied for a in p.upstreams}

    # Every replica has exited 0, so every admitted request is settled: the ledger, read from
    # Redis by the operator's command, counts each answer and its tokens.
    path = tmp_path / "fleet.yaml"
    path.write_text(yaml.safe_dump(config))
    done = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "gateway", "usage", "--config", str(path), "--team", TEAM, "--json"],
        check=False, capture_output=True, text=True, cwd=REPO_ROOT, timeout=60)
    assert done.returncode == 0, done.stderr
    [usage] = orjson.loads(done.stdout)["data"]  # this month's
    assert usage["requests"] == len(mix.ok)
    assert usage["tokens"]["prompt"] == sum(u["prompt_tokens"] for u in mix.ok)
    assert usage["tokens"]["completion"] == sum(u["completion_tokens"] for u in mix.ok)
