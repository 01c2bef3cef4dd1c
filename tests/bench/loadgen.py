"""Load: wrk for throughput and latency (its output parsed), the Python client for the rest.

wrk runs with one thread (on 2 cores a second thread only competes with the servers) and a
Lua script that sets the POST body from a file and the team key. Its percentiles come from
``--latency``.
"""
from __future__ import annotations

import json
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from .procs import Proc, Procs

KEY = "key-bench"
PATH = "/v1/chat/completions"
_UNITS_TIME = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}
_UNITS_BYTES = {"B": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3, "TB": 1024**4}


@dataclass
class WrkResult:
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    bytes_per_s: float
    requests: int
    errors: int  # non-2xx answers + socket errors (connect, read, write, timeout)
    raw: str
    cpu_us: float | None = None  # CPU the measured server process used per request (when given)


def wrk_script(workdir: Path, body_path: Path) -> Path:
    """A Lua script that POSTs ``body_path``'s bytes with the team key."""
    script = workdir / f"{body_path.stem}.lua"
    script.write_text(
        'wrk.method = "POST"\n'
        'wrk.headers["Content-Type"] = "application/json"\n'
        f'wrk.headers["Authorization"] = "Bearer {KEY}"\n'
        f"local f = assert(io.open({json.dumps(str(body_path))}, \"rb\"))\n"
        'wrk.body = f:read("*a")\n'
        "f:close()\n"
    )
    return script


def wrk(procs: Procs, base_url: str, script: Path, *, connections: int, duration_s: float,
        timeout_s: float = 30.0, server: Proc | None = None) -> WrkResult:
    """One wrk run; with ``server``, also that process's CPU time per request."""
    binary = shutil.which("wrk")
    if binary is None:
        raise RuntimeError("wrk not found on PATH (apt-get install wrk)")
    seconds = max(1, round(duration_s))  # wrk takes whole seconds
    cmd = [binary, "-t1", f"-c{connections}", f"-d{seconds}s", f"--timeout={round(timeout_s)}s", "--latency",
           "-s", str(script), base_url.rstrip("/") + PATH]
    cpu_before = server.cpu_s() if server is not None else 0.0
    result = parse_wrk(procs.run("wrk", cmd, timeout_s=seconds + timeout_s + 30))
    if server is not None and result.requests:
        result.cpu_us = (server.cpu_s() - cpu_before) * 1e6 / result.requests
    return result


def _time_ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text)
    if not m:
        raise ValueError(f"unparsable wrk time {text!r}")
    return float(m.group(1)) * _UNITS_TIME[m.group(2)]


def parse_wrk(out: str) -> WrkResult:
    def find(pattern: str, default: str | None = None) -> str:
        m = re.search(pattern, out, re.M)
        if m:
            return m.group(1)
        if default is None:
            raise ValueError(f"wrk output without {pattern!r}:\n{out}")
        return default

    pct = {p: _time_ms(find(rf"^\s+{p}%\s+(\S+)$")) for p in ("50", "90", "99")}
    transfer = re.search(r"Transfer/sec:\s+([\d.]+)([KMGT]?B)", out)
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    errors = int(find(r"Non-2xx or 3xx responses: (\d+)", "0"))
    errors += sum(map(int, socket_errors.groups())) if socket_errors else 0
    return WrkResult(
        rps=float(find(r"Requests/sec:\s+([\d.]+)")),
        p50_ms=pct["50"], p90_ms=pct["90"], p99_ms=pct["99"],
        bytes_per_s=float(transfer.group(1)) * _UNITS_BYTES[transfer.group(2)] if transfer else 0.0,
        requests=int(find(r"(\d+) requests in")),
        errors=errors,
        raw=out,
    )


def client(procs: Procs, mode: str, base_url: str, body_path: Path, *, timeout_s: float, **opts: int) -> dict:
    """Run the Python load client (``sequential`` with count=, or ``burst`` with concurrency=)."""
    cmd = [sys.executable, "-m", "tests.bench.client", mode, "--url", base_url.rstrip("/") + PATH,
           "--body", str(body_path), "--key", KEY]
    for name, value in opts.items():
        cmd += [f"--{name}", str(value)]
    return json.loads(procs.run(f"client-{mode}", cmd, timeout_s=timeout_s).strip().splitlines()[-1])


def probe(base_url: str, body: bytes, timeout_s: float = 60.0) -> tuple[int, dict[str, str], bytes]:
    """One request from the bench itself (to check a contestant before measuring it)."""
    import http.client
    from urllib.parse import urlsplit

    u = urlsplit(base_url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout_s)
    try:
        conn.request("POST", PATH, body=body, headers={"Content-Type": "application/json",
                                                       "Authorization": f"Bearer {KEY}"})
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data
    finally:
        conn.close()
