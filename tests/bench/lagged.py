"""``python -m tests.bench.lagged LOGFILE serve --config ...``: the gateway, with a watch on its
event loop's lag (bench only: the gateway itself is unchanged).

A thread asks the loop to run a callback (``call_soon_threadsafe``) every ``PERIOD_S`` and
times how long the loop takes to get to it: a loop held by CPU work (a parse, a hash, a GIL
held by a C call in another thread) answers late. Each lag over ``REPORT_MS`` is appended to
LOGFILE as ``<unix time> <ms> <cpu ms>``, the last being the CPU time the process used meanwhile
(all threads): a lag with as much CPU is the gateway's own work; one without is the scheduler
giving the core to another process (2 cores, shared). The bench takes the worst inside its
measurement window.
"""
from __future__ import annotations

import asyncio
import sys
import threading
import time

PERIOD_S = 0.002
REPORT_MS = 2.0


def watch(loop: asyncio.AbstractEventLoop, path: str) -> None:
    answered = threading.Event()
    with open(path, "a", buffering=1) as out:
        while not loop.is_closed():
            answered.clear()
            asked, cpu = time.perf_counter(), time.process_time()
            try:
                loop.call_soon_threadsafe(answered.set)
            except RuntimeError:  # the loop closed meanwhile
                return
            answered.wait()
            lag_ms = (time.perf_counter() - asked) * 1000
            if lag_ms > REPORT_MS:
                out.write(f"{time.time():.4f} {lag_ms:.2f} {(time.process_time() - cpu) * 1000:.2f}\n")
            time.sleep(PERIOD_S)


def main() -> int:
    path, argv = sys.argv[1], sys.argv[2:]
    import uvloop

    from gateway import cli, server

    class Watched(uvloop.EventLoopPolicy):
        def new_event_loop(self):
            loop = super().new_event_loop()
            threading.Thread(target=watch, args=(loop, path), daemon=True).start()
            return loop

    server.use_uvloop = lambda: asyncio.set_event_loop_policy(Watched())
    return cli.main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
