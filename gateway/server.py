"""Running the gateway: one worker on an event loop, or a supervisor of N workers on one port.

Workers share the port with SO_REUSEPORT and the metrics through prometheus_client's
multiprocess directory, which the supervisor prepares before any worker starts and keeps
across worker restarts (so counters never go backwards).
"""
from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

from aiohttp import web

from gateway.config import Config

log = logging.getLogger(__name__)

SHUTDOWN_GRACE_S = 30.0
RESTART_DELAY_S = 1.0


def use_uvloop() -> None:
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def run_worker(config: Config, host: str, port: int, *, reuse_port: bool = False) -> int:
    if not reuse_port:
        # A lone process keeps its metrics in memory: a multiprocess directory left in the
        # environment would carry another run's totals into this one. (Before prometheus_client
        # is imported: it reads the variable then.)
        os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
    from gateway.observability.accesslog import configure_logging
    from gateway.http.app import create_app

    configure_logging(config.logging)
    use_uvloop()
    return asyncio.run(_serve_forever(create_app(config), host, port, reuse_port))


async def _serve_forever(app: web.Application, host: str, port: int, reuse_port: bool) -> int:
    # handler_cancellation: a client that goes away cancels its handler, and so its upstream call.
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=SHUTDOWN_GRACE_S)
    stop = stop_on_signals()
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_port=reuse_port or None, backlog=4096)
    await site.start()
    bound = runner.addresses[0][1] if runner.addresses else port
    print(f"gateway listening on http://{host}:{bound}", flush=True)
    await stop.wait()
    await runner.cleanup()
    return 0


def stop_on_signals() -> asyncio.Event:
    """An event set at SIGINT or SIGTERM: the graceful way out of every long-running command.
    Call it before announcing readiness, so a signal right after the announcement is caught."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def run_supervisor(config_path: str, host: str, port: int, workers: int) -> int:
    """Start ``workers`` processes on one port; restart any that dies; stop all on SIGTERM."""
    from gateway.observability.metrics import mark_worker_dead, prepare_multiprocess

    port = port or free_port(host)
    own_dir = not os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    metrics_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or tempfile.mkdtemp(prefix="gateway-metrics-")
    prepare_multiprocess(metrics_dir)
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": metrics_dir}
    cmd = [sys.executable, "-m", "gateway", "serve", "--config", config_path, "--host", host, "--port", str(port), "--reuse-port"]

    def spawn() -> subprocess.Popen:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL)

    procs = [spawn() for _ in range(workers)]
    stopping = False

    def stop(signum, frame) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    _wait_listening(host, port)
    print(f"gateway listening on http://{host}:{port} ({workers} workers)", flush=True)
    while not stopping:
        time.sleep(0.2)
        for i, proc in enumerate(procs):
            if proc.poll() is not None and not stopping:
                log.error("worker %d exited with %s; restarting it", proc.pid, proc.returncode)
                mark_worker_dead(proc.pid)
                time.sleep(RESTART_DELAY_S)
                procs[i] = spawn()
    for proc in procs:
        proc.terminate()
    deadline = time.monotonic() + SHUTDOWN_GRACE_S
    for proc in procs:
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
    if own_dir:
        shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0


def _wait_listening(host: str, port: int, timeout_s: float = 30.0) -> None:
    target = "127.0.0.1" if host in ("0.0.0.0", "") else ("::1" if host == "::" else host)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((target, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    sys.exit(f"gateway: workers did not start listening on {host}:{port}")
