"""Issue 9's small-request targets: every feature on (Redis limits, metrics, access log, uvloop)
against the minimal proxy, JSON and SSE; and ``--workers 2`` against one worker, CPU per request.

A supervisor's CPU per request is its whole process tree's (supervisor and workers): what
``--workers 2`` costs on top of one worker is the multiprocess metrics and the supervisor.
"""
from __future__ import annotations

import os
import sys

import yaml

from tests.fixtures.gateway import gateway_config

from .contestants import TEAM, UNLIMITED, UPSTREAM_KEY, Bench, Contestant
from .loadgen import wrk
from .procs import Proc, free_port
from .report import Row


def _full_config(b: Bench) -> dict:
    """Every feature on but tracing: Redis limits (never refusing), metrics, access log at info."""
    return gateway_config(b.upstream.url, UPSTREAM_KEY, {TEAM: {"limits": UNLIMITED}},
                          store={"url": b.redis_url}, server={"metrics": True},
                          logging={"level": "info", "access_log": True})


def _start(b: Bench, name: str, workers: int = 1, *, floor: bool = False) -> Contestant:
    """The gateway with every feature on; ``floor``: the floor proxy (floor_proxy.py) on the same
    config, the gateway's per-request work without its request path."""
    tag = b._name("floor" if floor else "full")
    path = b.workdir / f"{tag}.yaml"
    path.write_text(yaml.safe_dump(_full_config(b), sort_keys=False))
    if floor:
        cmd = [sys.executable, "-m", "tests.bench.floor_proxy", "--config", str(path)]
    else:
        cmd = [sys.executable, "-m", "gateway", "serve", "--config", str(path)]
        cmd += ["--port", str(free_port()), "--workers", str(workers)] if workers > 1 else ["--port", "0"]
    return Contestant(name, b.procs.start(tag, cmd))


class TreeCPU:
    """A process and its descendants (a supervisor's workers): CPU seconds summed over them."""

    def __init__(self, proc: Proc) -> None:
        self.proc = proc

    def cpu_s(self) -> float:
        total, todo = 0.0, [self.proc.pid]
        while todo:
            pid = todo.pop()
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
                for tid in os.listdir(f"/proc/{pid}/task"):
                    with open(f"/proc/{pid}/task/{tid}/children") as f:
                        todo += [int(c) for c in f.read().split()]
            except FileNotFoundError:
                continue
        return total


def _throughput(b: Bench, sc: str, cs: list[Contestant], body: str, refs: dict, targets: dict,
                refs_of: dict | None = None) -> list[Row]:
    """req/s and CPU per request of each of ``cs`` (alternated); every one but the first is
    compared with ``refs`` (column -> contestant name), or with ``refs_of[its name]``."""
    from .scenarios import alternate, expect_ok, warm, wrk_notes  # scenarios.py imports this module

    s = b.settings
    for c in cs:
        expect_ok(c, b.bodies[body].read_bytes())
    warm(b, cs, body, s.connections)

    def measure(c: Contestant):
        return wrk(b.procs, c.url, b.scripts[body], connections=s.connections, duration_s=s.duration_s,
                   server=TreeCPU(c.proc))

    res = alternate(b, sc, cs, measure, lambda w: f"{w.rps:,.0f} req/s, {w.cpu_us:,.0f} us/req")
    n, rows = s.connections, []
    for c in cs:
        runs, own = res[c.name], (refs_of or {}).get(c.name, refs) if c is not cs[0] else {}
        rps_t, cpu_t = targets.get(c.name, (None, None))
        rows += [
            Row(sc, c.name, f"req/s @c{n}", [w.rps for w in runs], own, target=rps_t, notes=wrk_notes(runs)),
            Row(sc, c.name, f"CPU us/req @c{n}", [w.cpu_us for w in runs], own, target=cpu_t),
        ]
    return rows


def full_features(b: Bench) -> list[Row]:
    """Small JSON and small SSE through the gateway with every feature on (Redis) vs the minimal
    proxy. Targets: >= 0.8x its req/s, <= 1.25x its CPU per request. For JSON the floor proxy
    runs too (the same features' work, no request path): ``vs paired`` of the gateway is its
    cost over the floor, the floor's ``vs minimal`` the least any gateway on this stack pays."""
    minimal, floor, gateway = b.minimal(), _start(b, "floor proxy", floor=True), _start(b, "gateway (all on, Redis)")
    refs = {"vs minimal": "minimal proxy"}
    targets = {gateway.name: (("vs minimal", ">=", 0.8), ("vs minimal", "<=", 1.25))}
    against_floor = {gateway.name: {**refs, "vs paired": floor.name}}
    try:
        return (_throughput(b, "small JSON, every feature on", [minimal, floor, gateway], "small", refs, targets,
                            against_floor)
                + _throughput(b, "small SSE, every feature on", [minimal, gateway], "small_sse", refs, targets))
    finally:
        b.stop(minimal, floor, gateway)


def workers(b: Bench) -> list[Row]:
    """``--workers 2`` vs one worker (every feature on, Redis), CPU per request of the whole
    process tree. Target: <= 1.1x (on 2 cores shared with wrk, throughput cannot show it)."""
    cs = [_start(b, "1 worker"), _start(b, "2 workers", workers=2)]
    targets = {"2 workers": (None, ("vs paired", "<=", 1.1))}
    try:
        return _throughput(b, "--workers 2 vs 1, small JSON", cs, "small", {"vs paired": "1 worker"}, targets)
    finally:
        b.stop(*cs)
