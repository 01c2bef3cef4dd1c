"""Run the simulator as a process: ``serve()`` and the ``python -m gateway.simulator`` CLI.

``serve`` prints one line, ``simulator listening on http://HOST:PORT``, once the socket is
bound (with the real port when asked for port 0), so a parent process can start it on a free
port and read where it went. SIGTERM and SIGINT stop it cleanly: the listener closes and
requests still in flight are cancelled (they count as ``cancelled`` in the stats).

The runner uses ``handler_cancellation=True`` so a client that goes away cancels its request,
as on a real upstream; the stats' ``cancelled`` count relies on it.
"""
from __future__ import annotations

import argparse
import asyncio
from typing import Sequence

from aiohttp import web

from ..server import stop_on_signals
from .app import create_app
from .faults import FaultSpecError


def serve(
    host: str = "127.0.0.1",
    port: int = 8081,
    latency_ms: int = 0,
    api_key: str = "sim-key",
    fault: str = "",
) -> None:
    """Run the simulated provider until SIGTERM/SIGINT. Blocking."""
    app = create_app(api_key=api_key, latency_ms=latency_ms, fault=fault)
    asyncio.run(_run(app, host, port))


async def _run(app: web.Application, host: str, port: int) -> None:
    runner = web.AppRunner(app, handler_cancellation=True)
    stop = stop_on_signals()
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        bound_port = runner.addresses[0][1]
        shown_host = f"[{host}]" if ":" in host else host
        print(f"simulator listening on http://{shown_host}:{bound_port}", flush=True)
        await stop.wait()
    finally:
        await runner.cleanup()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The simulator's flags (shared by ``python -m gateway.simulator`` and ``gateway simulate``)."""
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8081, help="port to bind; 0 picks a free one (default 8081)")
    parser.add_argument("--latency-ms", type=int, default=0, help="delay before every chat answer (default 0)")
    parser.add_argument("--api-key", default="sim-key", help="the key clients must send (default sim-key)")
    parser.add_argument(
        "--fault",
        default="",
        help="default fault spec for every chat request, e.g. 'status=503' (see gateway.simulator)",
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gateway.simulator",
        description="Simulated upstream image provider, for demos, tests and benchmarks.",
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        serve(args.host, args.port, args.latency_ms, args.api_key, args.fault)
    except FaultSpecError as exc:
        parser.error(f"--fault: {exc}")
    return 0
