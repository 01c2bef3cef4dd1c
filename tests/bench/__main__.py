"""``python -m tests.bench``: the gateway against the upstream itself and a minimal proxy.

    python -m tests.bench [--quick] [--rounds N] [--only small,cache,...] [--keep]

Starts a canned-bytes upstream, a redis-server, the minimal proxy and gateway processes;
drives them with wrk and a Python client; prints ONE table on stdout (progress goes to
stderr). Every process it starts is stopped on the way out, Ctrl-C included.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from .contestants import Bench, Settings
from .procs import Procs, raise_nofile
from .report import table
from .scenarios import SCENARIOS


def settings_from(args: argparse.Namespace) -> Settings:
    if args.quick:
        s = Settings(rounds=1, duration_s=2, latency_s=1, warmup_s=1, big_requests=2)
    else:
        s = Settings()
    if args.rounds is not None:
        s.rounds = args.rounds
    if args.duration is not None:
        s.duration_s = args.duration
    return s


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.bench", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="1 round, short runs (about 1.5 minutes)")
    p.add_argument("--rounds", type=int, help="rounds of alternating contestants (default 3; --quick: 1)")
    p.add_argument("--duration", type=int, help="whole seconds per throughput run (default 4; --quick: 2)")
    p.add_argument("--only", help=f"comma-separated scenarios: {','.join(SCENARIOS)}")
    p.add_argument("--keep", action="store_true", help="keep the work directory (configs, logs, bodies)")
    args = p.parse_args(argv)
    names = list(SCENARIOS) if not args.only else [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        p.error(f"unknown scenario(s) {unknown}; choose from {list(SCENARIOS)}")
    settings = settings_from(args)
    if settings.rounds < 1:
        p.error("--rounds must be at least 1")

    raise_nofile()
    workdir = Path(tempfile.mkdtemp(prefix="gateway-bench-"))
    started = time.monotonic()
    load_before = os.getloadavg()[0]  # other work on the machine makes every number noisier
    rows, failed = [], False
    try:
        with Procs(workdir) as procs:
            bench = Bench(procs, workdir, settings)
            bench.log(f"bench: {', '.join(names)}; {settings.rounds} round(s); work dir {workdir}")
            for name in names:
                bench.log(f"scenario {name} ...")
                rows += SCENARIOS[name](bench)
    except KeyboardInterrupt:
        print("\ninterrupted; every process the bench started has been stopped", file=sys.stderr)
        failed = True
        return 130
    except Exception:
        failed = True
        print(f"bench failed; logs are in {workdir}", file=sys.stderr)
        raise
    finally:
        if rows:
            (workdir / "results.json").write_text(json.dumps([asdict(r) for r in rows], indent=1))
            elapsed = time.monotonic() - started
            print(f"\nimage gateway bench: medians of {settings.rounds} round(s); {os.cpu_count()} CPUs, "
                  f"Python {platform.python_version()}, load average {load_before:.2f} before / "
                  f"{os.getloadavg()[0]:.2f} after (the bench's own processes included); {elapsed:.0f} s\n")
            print(table(rows), flush=True)
        if args.keep or failed:
            print(f"work directory kept: {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
