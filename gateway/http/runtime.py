"""The config requests run under, swapped whole by a reload; and the replica's drain state.

The aiohttp app is frozen once it starts, so what follows from the config (the ``Config``, the
``Authenticator`` of its keys) lives in one immutable ``Snapshot`` behind the app's one
``Runtime``. A request takes the snapshot once, when it arrives (``request[SNAPSHOT]``), and
uses it to its end: a reload changes new requests only, in-flight ones finish under the old
config. The limiter's per-team plans follow the ``Team`` objects of the snapshot a request
carries; the limiter and the metrics are told of each new config.

Draining (``server.drain``) moves the runtime forward, never back: ``draining`` (``/readyz``
says 503), ``closed`` (the listener is closed: a request on a kept-alive connection is
refused), ``stopping`` (the shutdown timeout ran out: what still runs is ended).
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from gateway.config import Config, ConfigError
from gateway.config import reload as reload_mod
from gateway.errors import ShuttingDown
from gateway.http.auth import Authenticator
from gateway.http.record import Phase, RequestRecord
from gateway.limits.limiter import Limiter
from gateway.observability.metrics import Metrics

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything a request needs of the config, consistent for its whole life."""

    config: Config
    auth: Authenticator

    @classmethod
    def of(cls, config: Config) -> Snapshot:
        return cls(config, Authenticator(config))


class Runtime:
    """The app's one mutable cell: the current snapshot, the drain state and the requests running."""

    def __init__(self, config: Config, metrics: Metrics, *, path: str | None = None) -> None:
        self.snapshot = Snapshot.of(config)
        self.path = path  # the file reloads read; None: nothing to reload (an app built in a test)
        self.metrics = metrics
        self.limiter: Limiter | None = None  # set once the app's resources are open
        self.draining = self.closed = self.stopping = False
        self._running: dict[asyncio.Task, RequestRecord] = {}
        self._idle = asyncio.Event()
        self._idle.set()
        self._reloading = asyncio.Lock()
        metrics.config_loaded(time.time())

    # ---- reload ---------------------------------------------------------------------------------

    async def reload(self) -> bool:
        """Read the config file again; apply it to new requests. An invalid file keeps the running
        config (every problem logged by key path); restart-only keys keep their running values."""
        if self.path is None:
            log.warning("config reload asked for, but this gateway was started without a config file")
            return False
        async with self._reloading:  # a signal and the file watcher at once: one after the other
            old = self.snapshot.config
            try:
                config, needs_restart = await asyncio.to_thread(reload_mod.read_again, self.path, old)
            except ConfigError as err:
                log.error("config reload from %s failed; the running config stays (%d problem(s))",
                          self.path, len(err.problems))
                for problem in err.problems:
                    log.error("config reload: %s", problem)
                self.metrics.config_reloaded(False, time.time())
                return False
            for key in needs_restart:
                log.warning("config reload: %s changed; it needs a restart, the running value stays", key)
            self.snapshot = Snapshot.of(config)
            if self.limiter is not None:
                self.limiter.reconfigure(config)
            self.metrics.configure([m.id for m in config.models], [t.name for t in config.teams],
                                   account=config.account is not None)
            if config.logging != old.logging:
                from gateway.observability.accesslog import configure_logging

                configure_logging(config.logging)
            self.metrics.config_reloaded(True, time.time())
            log.info("config reloaded from %s", self.path)
            return True

    # ---- draining -------------------------------------------------------------------------------

    def drain(self) -> None:
        self.draining = True
        self.metrics.draining()

    @contextmanager
    def running(self, task: asyncio.Task | None, rec: RequestRecord) -> Iterator[None]:
        """Around one request: a drain waits for it; the shutdown timeout cancels it."""
        if task is None:
            yield
            return
        self._running[task] = rec
        self._idle.clear()
        try:
            yield
        finally:
            del self._running[task]
            if not self._running:
                self._idle.set()

    async def idle(self) -> None:
        """Return once no request is running."""
        await self._idle.wait()

    def stop(self) -> int:
        """The shutdown timeout ran out (or a second signal came): cancel every running request,
        which ``cut_off`` turns into its end with ``shutting_down``. Returns how many. One whose
        client has every byte is only settling and logging: it is left to finish."""
        self.stopping = True
        cut = [task for task, rec in self._running.items() if rec.phase < Phase.ANSWER_FINISHED]
        for task in cut:
            task.cancel()
        return len(cut)

    def cut_off(self) -> ShuttingDown | None:
        """In a request that got a CancelledError: the error to end it with when ``stop`` cancelled
        it (the cancellation is taken back, so it can still answer and settle); None when its
        client went away."""
        task = asyncio.current_task()
        if not self.stopping or task is None or task not in self._running or not task.cancelling():
            return None
        task.uncancel()
        return ShuttingDown("This gateway replica is shutting down and could not finish the request in time; retry it.")
