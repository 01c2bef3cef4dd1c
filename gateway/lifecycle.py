"""A worker's signals: SIGTERM or SIGINT drains it (a second one stops it at once); SIGHUP, and
with ``server.watch_config`` a change of the file, reloads its config.

The drain, counted from the first SIGTERM, so that a load balancer loses nothing:

    0                   /readyz answers 503 draining, gateway_draining is 1; all else as usual
    drain_delay_s       the listener closes; a request on a kept-alive connection gets 503
                        shutting_down (the balancer has had the time to notice and stop)
    ...                 the requests in flight finish, streams included
    shutdown_timeout_s  what still runs is ended: an answer that started with a final error
                        event (code shutting_down), one that did not with 503 shutting_down

Every request settles and is logged on its way out; then the app's resources close (settles
still owed to the store are paid) and the worker exits 0.
"""
from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Coroutine

from aiohttp import web

from gateway.config.reload import FileWatcher
from gateway.http.state import RUNTIME

log = logging.getLogger(__name__)

FINAL_S = 10.0  # after the cut-off: for the requests ended to write their end and settle


class Lifecycle:
    """Create it before announcing readiness (a signal right after is caught); ``await run()``
    returns once the worker has drained."""

    def __init__(self, app: web.Application) -> None:
        self.runtime = app[RUNTIME]
        self._term, self._again = asyncio.Event(), asyncio.Event()
        self._tasks: set[asyncio.Task] = set()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._on_term)
        loop.add_signal_handler(signal.SIGHUP, lambda: self._spawn(self.runtime.reload()))
        if self.runtime.path is not None and self.runtime.snapshot.config.server.watch_config:
            self._spawn(FileWatcher(self.runtime.path).run(self.runtime.reload))

    def _on_term(self) -> None:
        if self._term.is_set():
            log.warning("a second stop signal: ending what still runs now")
            self._again.set()
        self._term.set()

    def _spawn(self, coro: Coroutine) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def run(self, runner: web.AppRunner) -> None:
        await self._term.wait()
        runtime, loop = self.runtime, asyncio.get_running_loop()
        server = runtime.snapshot.config.server
        cut_off_at = loop.time() + server.shutdown_timeout_s
        runtime.drain()
        log.info("draining: /readyz says 503; connections still taken for %gs, requests in flight get up "
                 "to %gs", server.drain_delay_s, server.shutdown_timeout_s)
        await self._until(loop.time() + server.drain_delay_s)
        for site in list(runner.sites):
            await site.stop()
        runtime.closed = True
        log.info("stopped listening; waiting for the requests in flight")
        await self._until(cut_off_at, runtime.idle())
        ended = runtime.stop()
        if ended:
            log.warning("ending %d request(s) still running with shutting_down", ended)
            try:
                async with asyncio.timeout(FINAL_S):
                    await runtime.idle()
            except TimeoutError:
                log.error("requests still running %gs after they were ended; closing anyway", FINAL_S)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await runner.cleanup()
        log.info("drained; exiting")

    async def _until(self, deadline: float, done: Coroutine | None = None) -> None:
        """Wait until ``deadline`` (loop time), ``done`` finishes, or a second signal comes."""
        waits = {asyncio.ensure_future(self._again.wait())}
        if done is not None:
            waits.add(asyncio.ensure_future(done))
        try:
            await asyncio.wait(waits, timeout=max(0.0, deadline - asyncio.get_running_loop().time()),
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
