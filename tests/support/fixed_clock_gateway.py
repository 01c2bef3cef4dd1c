"""A real gateway process whose limiter reads a frozen clock instead of Redis ``TIME``.

    python -m tests.support.fixed_clock_gateway --config X [--host H] --port 0 --clock 1767225600

Production scripts read Redis' own clock; tests may inject the time. Several of these processes
given the same ``--clock`` share one frozen instant, so a token bucket never refills during a
test and counts under contention are exact (``requests_per_minute: 100`` admits exactly 100).
It serves the app exactly as ``gateway serve`` does (gateway.server's loop) and prints the same
``gateway listening on http://HOST:PORT`` line once it is listening.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fixed_clock_gateway")
    p.add_argument("--config", required=True)
    p.add_argument("--host")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--clock", type=float, required=True, help="the frozen UNIX time, in seconds")
    args = p.parse_args(argv)
    # One process with its metrics in memory, as gateway.server.run_worker arranges (before
    # prometheus_client is imported).
    os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)

    from gateway import config as config_mod
    from gateway.observability.accesslog import configure_logging
    from gateway.http.app import create_app
    from gateway.server import _serve_forever, use_uvloop

    try:
        config = config_mod.load(args.config)
    except config_mod.ConfigError as err:
        print("invalid config:\n  " + "\n  ".join(err.problems), file=sys.stderr)
        return 1
    frozen = args.clock
    configure_logging(config.logging)
    use_uvloop()
    app = create_app(config, clock=lambda: frozen)
    return asyncio.run(_serve_forever(app, args.host or config.server.host, args.port, False))


if __name__ == "__main__":
    sys.exit(main())
