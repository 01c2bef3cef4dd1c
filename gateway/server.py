"""Running the gateway: one worker on an event loop, or a supervisor of N workers on one port.

Workers share the port (and ``server.metrics_port``, when set) with SO_REUSEPORT and the
metrics through prometheus_client's multiprocess directory, which the supervisor prepares before
any worker starts and keeps across worker restarts (so counters never go backwards).

Each connection is served by ``GatewayProtocol``, aiohttp's own with the gateway's rules at
the edge, where no handler runs: malformed HTTP gets the provider's JSON error shape and one
log line without its bytes, and a client that stalls mid-request is cut off.
"""
from __future__ import annotations

import asyncio
import gc
import logging
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial

from aiohttp import http_exceptions, web
from aiohttp.web_protocol import RequestHandler

from gateway.config import Config
from gateway.errors import GatewayError, InvalidRequest, RequestTimeout, error_response
from gateway.http.record import RequestRecord, new_request_id

log = logging.getLogger(__name__)

RESTART_DELAY_S = 1.0


def use_uvloop() -> None:
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def run_worker(config: Config, host: str, port: int, *, reuse_port: bool = False,
               config_path: str | None = None) -> int:
    """Serve until drained (see ``gateway.lifecycle``); ``config_path`` is what a reload reads."""
    if not reuse_port:
        # A lone process keeps its metrics in memory: a multiprocess directory left in the
        # environment would carry another run's totals into this one. (Before prometheus_client
        # is imported: it reads the variable then.)
        os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
    from gateway.http.app import create_app
    from gateway.observability.accesslog import configure_logging

    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # until the loop's handler reloads: never a kill
    configure_logging(config.logging)
    use_uvloop()
    return asyncio.run(_serve_forever(create_app(config, config_path=config_path), host, port, reuse_port))


async def _serve_forever(app: web.Application, host: str, port: int, reuse_port: bool) -> int:
    from gateway.lifecycle import FINAL_S, Lifecycle

    # handler_cancellation: a client that goes away before its answer ends cancels its handler, and
    # so its upstream call.
    # By the time aiohttp's own shutdown runs, the drain has ended every request.
    runner = GatewayRunner(app, shutdown_timeout=FINAL_S)
    await runner.setup()
    lifecycle = Lifecycle(app)
    site = web.TCPSite(runner, host, port, reuse_port=reuse_port or None, backlog=4096)
    await site.start()
    metrics = await _start_metrics_site(app, host, reuse_port)
    bound = runner.addresses[0][1] if runner.addresses else port
    # What start-up made (modules, config, the app) lives as long as the process: out of the
    # collector's generations, so its full collections stop walking it again under load.
    gc.freeze()
    print(f"gateway listening on http://{host}:{bound}", flush=True)
    await lifecycle.run(runner)
    if metrics is not None:  # scraped until the very end: the drain shows in gateway_draining
        await metrics.cleanup()
    return 0


async def _start_metrics_site(app: web.Application, host: str, reuse_port: bool) -> web.AppRunner | None:
    """With ``server.metrics_port``, the metrics alone on that port, so a NetworkPolicy (which
    filters by port, not path) can keep them from the API's clients. No auth, no access log, not
    counted. Every worker binds it (SO_REUSEPORT) and any answers for all: the multiprocess
    registry sums them."""
    from gateway.http.health import metrics_exposition
    from gateway.http.state import METRICS, RUNTIME

    server = app[RUNTIME].snapshot.config.server  # restart-only
    if server.metrics_port is None:
        return None
    metrics_app = web.Application()
    metrics_app[METRICS] = app[METRICS]
    metrics_app.router.add_get(server.metrics_path, metrics_exposition)
    runner = web.AppRunner(metrics_app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    await web.TCPSite(runner, host, server.metrics_port, reuse_port=reuse_port or None).start()
    return runner


class GatewayRunner(web.AppRunner):
    """``web.AppRunner`` serving each connection with ``GatewayProtocol``; a client that goes away
    before the last byte of its answer cancels its handler (and so its upstream call); aiohttp's
    access log is off (the gateway writes its own, for the requests the protocol refuses too)."""

    def __init__(self, app: web.Application, **kwargs) -> None:
        # not at import: run_worker sets up metrics first
        from gateway.http.middleware import answered, observe
        from gateway.http.state import RUNTIME

        kwargs = {"handler_cancellation": True, "access_log": None, **kwargs}
        read_timeout_s = app[RUNTIME].snapshot.config.server.read_timeout_s  # restart-only
        super().__init__(app, read_timeout_s=read_timeout_s, observe=partial(observe, app), answered=answered,
                         **kwargs)

    async def _make_server(self) -> web.Server:
        # aiohttp has no public way to choose the protocol class: the runner's server factory
        # (after the app's startup) is the one place, and web.Server keeps the protocol's kwargs.
        plain = await super()._make_server()
        return _GatewayServer(plain.request_handler, request_factory=plain.request_factory,
                              handler_cancellation=plain.handler_cancellation, **plain._kwargs)


class _GatewayServer(web.Server):
    def __call__(self) -> RequestHandler:
        return GatewayProtocol(self, loop=self._loop, **self._kwargs)


# What a client did wrong, by aiohttp's parser error (first match); never the bytes themselves.
_MALFORMED = (
    (http_exceptions.LineTooLong, "The request line or a header is too long."),
    (http_exceptions.BadStatusLine, "The request line is not valid HTTP."),
    (http_exceptions.InvalidURLError, "The request's URL is not valid."),
    (http_exceptions.PayloadEncodingError, "The request body's framing (Content-Length or chunked encoding) is not valid."),
    (http_exceptions.HttpProcessingError, "The request is not valid HTTP: a header or the body's framing holds "
                                          "a byte it may not."),
)


class GatewayProtocol(RequestHandler):
    """One client connection. Two rules where aiohttp has no hook but this class:

    - Malformed HTTP (aiohttp's parser refused it before any handler ran) is answered in the
      provider's JSON error shape. aiohttp would answer text/plain quoting the bytes and log a
      traceback quoting them too (an ``Authorization`` header included): here the log gets one
      line naming the kind of error, never a byte of the request; and the access log and the
      metrics get the refusal as they get the app's requests (no team, model "other").
    - Reads time out: a client that sends part of its headers, or part of a body the handler is
      reading, and then nothing for ``read_timeout_s`` is cut off; the handler gets a 408 to
      answer (``Connection: close``). The idle time between requests stays aiohttp's keep-alive.

    Both read the base class's state (``_waiter``, ``_current_request``, ...) of aiohttp 3.14;
    tests/faults/test_malformed_http.py and tests/e2e/test_http.py hold the behaviour.
    """

    __slots__ = ("_read_timeout_s", "_read_by", "_read_timer", "_partial_head", "_observe", "_answered")

    def __init__(self, manager: web.Server, *, read_timeout_s: float, observe: Callable[[RequestRecord], None],
                 answered: Callable[[web.BaseRequest], bool], **kwargs) -> None:
        super().__init__(manager, **kwargs)
        self._read_timeout_s = read_timeout_s
        self._observe = observe  # the app's metrics and access log, for what no handler saw
        self._answered = answered  # whether a request's client has its whole answer
        self._read_by = 0.0  # loop time the next byte is due by, when one is awaited
        self._read_timer: asyncio.TimerHandle | None = None
        self._partial_head = False  # bytes of a request's head came, the head is not complete

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        waiter = self._waiter  # pending: no request yet, so these bytes began an unfinished head
        self._partial_head = bool(data) and waiter is not None and not waiter.done()
        self._read_by = self._loop.time() + self._read_timeout_s
        if self._read_timer is None:  # one timer per connection, moved on lazily (as keep-alive's)
            self._read_timer = self._loop.call_at(self._read_by, self._check_read)

    def _check_read(self) -> None:
        self._read_timer = None
        if self.transport is None or self._force_close or self._close:
            return
        now = self._loop.time()
        if self._reading_paused or self._buffer_paused:  # the gateway is not reading: not the client's stall
            self._read_by = now + self._read_timeout_s
        if now < self._read_by:
            self._read_timer = self._loop.call_at(self._read_by, self._check_read)
            return
        waiter, request = self._waiter, self._current_request
        if self._partial_head and waiter is not None and not waiter.done():
            log.info("closed a connection whose request head stalled for %ss", self._read_timeout_s)
            self.force_close()
        elif request is not None and not request.content.is_eof():
            log.info("a request body stalled for %ss; answering 408 and closing", self._read_timeout_s)
            if request.writer.output_size:  # the answer has begun: nothing else can be said
                self.force_close()
                return
            self._lingering_time = 0.0  # no more reading once the 408 is out: close
            self.close()
            timeout = RequestTimeout(f"No byte of the request body came for {self._read_timeout_s:g} s.",
                                     headers={"Connection": "close"})
            request.content.set_exception(timeout)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None
        if self._current_request is not None and self._answered(self._current_request):
            # Its client has every byte (curl and one-shot clients close at once): the handler's
            # bookkeeping (the settle, the cache write, the metrics and the access line) is not
            # the client's to cancel. Only a handler still answering is cancelled.
            self._task_handler = None
        super().connection_lost(exc)

    def handle_error(self, request, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if request.writer.output_size > 0:  # as aiohttp: the answer has begun, the connection is broken
            raise ConnectionError("Response is sent already, cannot send another response with the error message")
        request_id, kind = new_request_id(), type(exc).__name__ if exc else "-"
        if status < 500:
            log.info("refused a malformed HTTP request with %s (%s), request %s", status, kind, request_id)
            err: GatewayError = InvalidRequest(
                next((text for cls, text in _MALFORMED if isinstance(exc, cls)), "The request is not valid HTTP."))
            err.status = status
        else:
            log.error("a request failed outside the gateway's handler (%s), request %s", kind, request_id)
            err = GatewayError("The gateway failed to handle this request.")
        response = error_response(err, {"x-request-id": request_id})
        response.force_close()
        if status < 500:  # a 5xx here escaped a handler, whose middleware has observed it
            self._observe(RequestRecord(request_id=request_id, method="-", path="-", status=status,
                                        error_code=err.code, bytes_out=response.content_length or 0))
        return response

    def log_exception(self, message: str, *args, exc_info: BaseException | None = None, **kwargs) -> None:
        """aiohttp's error lines, without the traceback: an exception's text may quote the request."""
        if isinstance(exc_info, web.RequestPayloadError):  # met again while draining the body: the client's doing
            log.info("stopped reading a request body that could not be decoded")
            return
        log.error("%s (%s)", message % args if args else message, type(exc_info).__name__ if exc_info else "-")


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
    """Start ``workers`` processes on one port; restart any that dies. Every signal goes on to every
    worker: SIGHUP reloads them; SIGTERM drains them (a second one stops them at once), and the
    supervisor exits once they all have."""
    from gateway.observability.metrics import mark_worker_dead, prepare_multiprocess

    port = port or free_port(host)
    own_dir = not os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    metrics_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or tempfile.mkdtemp(prefix="gateway-metrics-")
    prepare_multiprocess(metrics_dir)
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": metrics_dir}
    cmd = [sys.executable, "-m", "gateway", "serve", "--config", config_path, "--host", host, "--port", str(port), "--reuse-port"]

    procs: list[subprocess.Popen] = []
    stopping = False
    stop_signal = signal.SIGTERM  # the last SIGTERM or SIGINT, for a worker started after it came
    reached: set[int] = set()  # the workers a stop signal was forwarded to

    def forward(signum, frame) -> None:
        nonlocal stopping, stop_signal
        if signum != signal.SIGHUP:
            stopping, stop_signal = True, signum
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signum)
                if stopping:
                    reached.add(proc.pid)

    def spawn() -> subprocess.Popen:
        # Ignored SIGHUP is inherited through exec: a reload signal before a worker is ready never
        # kills it. Their own process group: a terminal's Ctrl-C reaches them once, forwarded,
        # not twice (a second signal would stop them at once).
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        try:
            return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True, process_group=0)
        finally:
            signal.signal(signal.SIGHUP, forward)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    procs.extend(spawn() for _ in range(workers))
    ready = [_ready(proc) for proc in procs]  # each one's line read, its pipe closed
    if not all(ready):
        for proc in procs:
            proc.kill()
        sys.exit(f"gateway: workers did not start listening on {host}:{port}")
    print(f"gateway listening on http://{host}:{port} ({workers} workers)", flush=True)
    while not stopping:
        time.sleep(0.2)
        for i, proc in enumerate(procs):
            if proc.poll() is not None and not stopping:
                log.error("worker %d exited with %s; restarting it", proc.pid, proc.returncode)
                mark_worker_dead(proc.pid)
                time.sleep(RESTART_DELAY_S)
                if stopping:  # the signal came during the delay: no replacement
                    break
                procs[i] = spawn()
                if stopping and procs[i].pid not in reached:  # it came while the worker was being started
                    procs[i].send_signal(stop_signal)
                _ready(procs[i])
    for proc in procs:  # each drains within its own shutdown_timeout_s (a second signal: at once)
        proc.wait()
    if own_dir:
        shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0


def _ready(proc: subprocess.Popen, timeout_s: float = 30.0) -> bool:
    """Wait for a worker's "listening" line: it prints it once it serves, its signal handlers in place."""
    try:
        readable, _, _ = select.select([proc.stdout], [], [], timeout_s)
        return bool(readable) and "listening on" in proc.stdout.readline()
    finally:
        proc.stdout.close()
