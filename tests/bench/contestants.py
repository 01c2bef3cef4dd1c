"""Who is measured: the upstream itself ("direct"), the minimal proxy, and gateway variants.

Every contestant is a real process on a free port. ``Bench`` owns the shared pieces (the
upstream, a redis-server started on first use, the body files, the settings) and starts
contestants on demand; each scenario stops its own when it is done.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from tests.fixtures.gateway import gateway_config

from .bodies import write_bodies
from .loadgen import wrk_script
from .procs import Proc, Procs

UPSTREAM_KEY = "bench-upstream-key"
TEAM = "bench"  # its key is key-bench (tests.fixtures.gateway.team_key)
# so high nothing is refused, and no higher than the scripts take (1e12): above, every admission fails
UNLIMITED = {"requests_per_minute": 100_000_000, "tokens_per_minute": 10**12, "max_concurrent": 1_000_000}


@dataclass
class Settings:
    rounds: int = 3
    duration_s: int = 4  # each throughput run (wrk; whole seconds)
    latency_s: int = 2  # each one-connection latency run (wrk -c1)
    warmup_s: int = 1  # one unmeasured wrk run per contestant before its first round
    connections: int = 32  # wrk connections for small requests
    big_connections: int = 4  # wrk connections for 10 MB responses
    big_requests: int = 3  # 60 MB requests per contestant per round
    slow_concurrency: int = 2000


@dataclass
class Contestant:
    name: str
    proc: Proc
    owned: bool = True  # False: shared (the upstream), not stopped with the scenario

    @property
    def url(self) -> str:
        return self.proc.url


class Bench:
    def __init__(self, procs: Procs, workdir: Path, settings: Settings) -> None:
        self.procs, self.workdir, self.settings = procs, workdir, settings
        self.bodies = write_bodies(workdir)
        self.scripts = {name: wrk_script(workdir, path) for name, path in self.bodies.items()}
        self.upstream = procs.upstream()
        self._redis: Proc | None = None
        self._count = 0

    @property
    def redis_url(self) -> str:
        if self._redis is None:
            self._redis = self.procs.redis()
        return self._redis.url

    def log(self, message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    def direct(self) -> Contestant:
        return Contestant("direct", self.upstream, owned=False)

    def minimal(self) -> Contestant:
        return Contestant("minimal proxy", self.procs.minimal_proxy(self.upstream.url, name=self._name("minimal")))

    def gateway(self, name: str = "gateway", *, limits: dict | None = None, **sections) -> Contestant:
        """A ``gateway serve`` process: one team, memory store and warning logs unless overridden."""
        sections.setdefault("logging", {"level": "warning"})
        team = {"limits": limits} if limits else {}
        config = gateway_config(self.upstream.url, UPSTREAM_KEY, {TEAM: team}, **sections)
        tag = self._name("gw")
        path = self.workdir / f"{tag}.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return Contestant(name, self.procs.gateway(path, tag))

    def stop(self, *contestants: Contestant) -> None:
        for c in contestants:
            if c.owned:
                self.procs.stop(c.proc)

    def _name(self, prefix: str) -> str:
        self._count += 1
        return f"{prefix}{self._count}"
