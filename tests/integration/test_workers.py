"""``gateway serve --workers 2`` as real processes on a Redis store: one scrape, whichever worker
answers it, shows the sum over both workers, and killing a worker (the supervisor restarts it)
never makes a counter go backwards. A stop that comes while the supervisor waits to restart a
dead worker ends it all, with no replacement left behind. And ``--workers 2`` on ``memory://``
is refused.

Which worker served what is read from the workers' own multiprocess files (one
``counter_<pid>.db`` per process, in a directory the test hands the supervisor), so the test
knows both workers took traffic instead of hoping the kernel spread it.
"""
from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import aiohttp
import orjson
import pytest
import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector

from tests.e2e.test_metrics import parse, samples, tokens
from tests.fixtures.gateway import RunningGateway, gateway_config, team_key, wait_for
from tests.fixtures.prometheus import require_binary

MODEL = "google/gemini-3-pro-image-preview"
TEAMS = ("design", "research")


def children(pid: int) -> set[int]:
    """Live child processes of ``pid``, from /proc (no pgrep or psutil needed)."""
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)": state, ppid, ...
        except (OSError, IndexError):
            continue  # gone meanwhile
        if int(fields[1]) == pid and fields[0] != "Z":
            found.add(int(stat.parent.name))
    return found


def two_workers(supervisor: int) -> set[int] | None:
    found = children(supervisor)
    return found if len(found) == 2 else None


def served_by(metrics_dir: Path, pid: int) -> float:
    """Requests one worker process counted, from its own file alone."""
    src = metrics_dir / f"counter_{pid}.db"
    if not src.exists():
        return 0.0
    with tempfile.TemporaryDirectory() as d:
        shutil.copy(src, d)
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=d)
        return sum(s.value for m in registry.collect() for s in m.samples if s.name == "gateway_requests_total")


class Client:
    """Requests and scrapes on a fresh connection each, so the kernel picks a worker each time."""

    def __init__(self, gw: RunningGateway, http: aiohttp.ClientSession):
        self.gw, self.url, self.http = gw, gw.url, http
        self.sent = 0
        self.tokens: Counter = Counter()  # (team, type) -> tokens the responses reported

    async def chat(self, team: str) -> None:
        body = {"model": MODEL, "messages": [{"role": "user", "content": f"poster number {self.sent} for {team}"}]}
        headers = {"Authorization": f"Bearer {team_key(team)}", "Connection": "close"}
        async with self.http.post(self.url + "/v1/chat/completions", json=body, headers=headers) as resp:
            raw = await resp.read()
            assert resp.status == 200, raw[:300]
        await self.gw.idle()  # counted after the answer: a scrape from here on sees it
        self.sent += 1
        for kind, n in tokens(orjson.loads(raw)["usage"]).items():
            self.tokens[(team, kind)] += n

    async def chat_until(self, done) -> bool:
        """One more request (teams in turn) unless ``done()`` already holds."""
        if done():
            return True
        await self.chat(TEAMS[self.sent % len(TEAMS)])
        return False

    async def text(self) -> str:
        async with self.http.get(self.url + "/metrics", headers={"Connection": "close"}) as resp:
            assert resp.status == 200
            return await resp.text()

    async def scrape(self) -> tuple[float, Counter]:
        """(requests_total summed, tokens by (team, type))."""
        families = parse(await self.text())
        requests = sum(samples(families, "gateway_requests_total", "team", "model", "status", "cache",
                               "stream").values())
        by_type: Counter = Counter()
        for (team, _model, kind), n in samples(families, "gateway_tokens_total", "team", "model", "type").items():
            by_type[(team, kind)] += n
        return requests, +by_type

    async def scrapes_agree(self, times: int = 6) -> None:
        for _ in range(times):
            assert await self.scrape() == (self.sent, +self.tokens)


@pytest.fixture
def metrics_dir(tmp_path) -> Path:
    path = tmp_path / "multiproc"
    path.mkdir()
    return path


async def test_two_workers_sum_their_counters_and_a_restart_never_goes_backwards(
        simulator, redis_server, gateway_processes, metrics_dir):
    redis_server.start()  # a test may have stopped the shared server
    redis_server.flush()
    config = gateway_config(simulator.url, simulator.api_key, {t: {} for t in TEAMS},
                            store={"url": redis_server.url})
    gw = gateway_processes(config, workers=2, env={"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)})
    supervisor = gw.process.pid
    workers = await wait_for(lambda: two_workers(supervisor), timeout_s=30)

    async with aiohttp.ClientSession() as http:
        client = Client(gw, http)
        # Both workers take traffic: keep going until each has counted some.
        await wait_for(lambda: client.chat_until(lambda: all(served_by(metrics_dir, pid) for pid in workers)), 60)
        assert sum(served_by(metrics_dir, pid) for pid in workers) == client.sent
        await client.scrapes_agree()

        # Kill one worker; the supervisor starts another. Scrape all along: never less.
        victim = min(workers)
        os.kill(victim, signal.SIGKILL)
        last = await client.scrape()

        async def restarted() -> set[int] | None:
            nonlocal last
            now = await client.scrape()
            assert now[0] >= last[0] and all(now[1][k] >= v for k, v in last[1].items()), (last, now)
            assert now == (client.sent, +client.tokens)  # nothing was lost with the dead worker
            last = now
            current = two_workers(supervisor)
            return current if current and victim not in current else None

        await wait_for(restarted, timeout_s=60)
        (newcomer,) = children(supervisor) - workers

        # The new worker adds to the dead one's counts instead of starting over.
        await wait_for(lambda: client.chat_until(lambda: served_by(metrics_dir, newcomer)), 60)
        assert served_by(metrics_dir, victim) > 0  # the dead worker's share is still counted
        await client.scrapes_agree()
        requests, by_type = await client.scrape()
        assert requests == client.sent and by_type[(TEAMS[0], "image")] > 0 and by_type[(TEAMS[1], "image")] > 0
        exposition = await client.text()
    # the summed (multiprocess) exposition is as clean as a single process' one
    out = subprocess.run([require_binary("promtool"), "check", "metrics"], input=exposition, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and not (out.stdout + out.stderr).strip(), out.stdout + out.stderr


def running_with(config_path: Path) -> set[int]:
    """Live processes whose command line names ``config_path``: the supervisor and its workers."""
    found = set()
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if str(config_path).encode() in cmdline.read_bytes():
                found.add(int(cmdline.parent.name))
        except OSError:
            continue  # gone meanwhile
    return found - {os.getpid()}


async def test_a_stop_during_a_restart_delay_exits_promptly_with_no_replacement(
        simulator, redis_server, gateway_processes, tmp_path):
    redis_server.start()
    redis_server.flush()
    config = gateway_config(simulator.url, simulator.api_key, {t: {} for t in TEAMS},
                            store={"url": redis_server.url})
    gw = gateway_processes(config, workers=2)
    supervisor = gw.process.pid
    workers = await wait_for(lambda: two_workers(supervisor), timeout_s=30)
    log = tmp_path / "gw0.log"
    os.kill(min(workers), signal.SIGKILL)
    await wait_for(lambda: "restarting it" in log.read_text(), timeout_s=30)  # its restart delay began
    gw.process.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(gw.process.wait, 20) == 0  # raises TimeoutExpired if it hangs
    assert running_with(tmp_path / "gw0.yaml") == set()  # no worker left, no replacement orphaned


def test_two_workers_on_the_memory_store_are_refused(tmp_path):
    config = gateway_config("http://127.0.0.1:9", "unused", store={"url": "memory://"})
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    out = subprocess.run([sys.executable, "-m", "gateway", "serve", "--config", str(path), "--port", "0",
                          "--workers", "2"], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert "listening" not in out.stdout
    message = out.stderr.strip()
    assert "--workers" in message and "memory://" in message and "redis://" in message, message
