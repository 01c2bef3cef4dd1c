"""The ``gateway`` command: serve, simulate, demo, keys, check-config, usage."""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys

from gateway import config as config_mod

DEFAULT_CONFIG = "config/gateway.yaml"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return args.func(args) or 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gateway", description="API gateway for the image-generation provider.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the gateway")
    s.add_argument("--config", help="config file (default: $GATEWAY_CONFIG, else config/gateway.yaml)")
    s.add_argument("--host", help="listen address (overrides server.host)")
    s.add_argument("--port", type=int, help="listen port (overrides server.port; 0 picks a free one)")
    s.add_argument("--workers", type=int, default=1, help="worker processes sharing the port (needs a Redis store)")
    s.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)  # set for workers
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("simulate", help="run the simulated upstream provider")
    from gateway.simulator.server import add_arguments

    add_arguments(s)
    s.set_defaults(func=cmd_simulate)

    s = sub.add_parser("demo", help="simulator + gateway on the embedded store, with a demo team")
    s.add_argument("--port", type=int, default=8080)
    s.set_defaults(func=cmd_demo)

    s = sub.add_parser("keys", help="team keys")
    ks = s.add_subparsers(dest="keys_command", required=True)
    k = ks.add_parser("new", help="print a fresh team key and its sha256 line for the config")
    k.add_argument("--team", required=True)
    k.set_defaults(func=cmd_keys_new)

    s = sub.add_parser("check-config", help="validate a config file")
    s.add_argument("--config")
    s.set_defaults(func=cmd_check_config)

    s = sub.add_parser("usage", help="print usage from the store")
    s.add_argument("--config")
    s.add_argument("--team")
    period = s.add_mutually_exclusive_group()
    period.add_argument("--month", help="YYYY-MM (default: this month)")
    period.add_argument("--day", help="YYYY-MM-DD")
    s.add_argument("--json", action="store_true", help="print JSON instead of a table")
    s.set_defaults(func=cmd_usage)
    return p


def config_path(arg: str | None) -> str:
    return arg or os.environ.get("GATEWAY_CONFIG") or DEFAULT_CONFIG


def _load_or_exit(path: str) -> config_mod.Config:
    try:
        return config_mod.load(path)
    except FileNotFoundError:
        sys.exit(f"gateway: config file not found: {path}")
    except config_mod.ConfigError as err:
        sys.exit("gateway: invalid config " + path + ":\n  " + "\n  ".join(err.problems))


def cmd_serve(args) -> int:
    from gateway.server import run_supervisor, run_worker

    path = config_path(args.config)
    config = _load_or_exit(path)
    if not args.reuse_port:  # the supervisor's workers (--reuse-port) leave it to the supervisor
        _warn_literal_secrets(path, config)
    host = args.host or config.server.host
    port = config.server.port if args.port is None else args.port
    if args.workers < 1:
        sys.exit("gateway: --workers must be at least 1")
    if args.workers > 1:
        if config.store.url.startswith("memory://"):
            sys.exit(
                "gateway: --workers > 1 needs a shared store: with store.url memory:// every worker would "
                "count limits on its own. Set store.url to redis://... or run one worker."
            )
        return run_supervisor(path, host, port, args.workers)
    return run_worker(config, host, port, reuse_port=args.reuse_port, config_path=path)


def _warn_literal_secrets(path: str, config: config_mod.Config) -> None:
    """Log the check-config warnings once, in the configured log format."""
    from gateway.config.loader import literal_secrets
    from gateway.observability.accesslog import configure_logging

    configure_logging(config.logging)
    for warning in literal_secrets(path):
        logging.getLogger("gateway.config").warning("%s: %s", path, warning)


def cmd_simulate(args) -> int:
    from gateway.simulator.server import main as simulate

    argv = ["--host", args.host, "--port", str(args.port), "--latency-ms", str(args.latency_ms)]
    return simulate(argv + ["--api-key", args.api_key, "--fault", args.fault])


def cmd_demo(args) -> int:
    from gateway.demo import run_demo

    return run_demo(args.port)


def cmd_keys_new(args) -> int:
    from gateway.keytool import new_team_key

    try:
        key, line = new_team_key(args.team)
    except ValueError as err:
        sys.exit(f"gateway: {err}")
    print(f"Team {args.team!r}: give this key to the team (it is shown once and stored nowhere):\n")
    print(f"  {key}\n")
    print("Paste this line into the team's `keys:` list in the config:\n")
    print(f'  keys: ["{line}"]')
    return 0


def cmd_check_config(args) -> int:
    from gateway.config.loader import check_config, literal_secrets

    path = config_path(args.config)
    problems = check_config(path)
    for warning in literal_secrets(path):
        print(f"{path}: warning: {warning}", file=sys.stderr)
    if problems:
        print(f"{path}: {len(problems)} problem(s)", file=sys.stderr)
        for problem in problems:
            print(f"  {problem}", file=sys.stderr)
        return 1
    print(f"{path}: ok")
    return 0


def cmd_usage(args) -> int:
    from gateway.limits.report import print_usage

    config = _load_or_exit(config_path(args.config))
    return asyncio.run(print_usage(config, team=args.team, month=args.month, day=args.day, as_json=args.json))
