"""Logging setup and the one access-log line per request.

The line is built only from a ``RequestRecord``'s fixed fields (ids, sizes, timings, counts):
no header, body, key, prompt or base64 ever reaches it, and there is no free-form field to put
one in. ``logging.format`` picks JSON (one object per line, for log pipelines) or ``key=value``
text (for people). The format lives in the handler, not in a module global, so
``configure_logging`` may be called again (tests, reloads) without duplicating handlers.

The access log is on every request's path, so it takes a short way when it can: when this
module's handler is the access logger's only one (the served gateway), no ``LogRecord`` is
made; the record's fields are copied (``_snapshot``) into a queue, and the queue is formatted
with orjson and written in one write at most ``FLUSH_INTERVAL_S`` later, or once
``FLUSH_LINES`` wait. Other log lines are written at once, after whatever is queued, so the
stream keeps the order of events; so are access lines logged where no event loop runs (the CLI,
tests). Every other line logged while a request is handled names it: ``current_request`` (a
contextvar the request-id middleware sets) gives the formatters its ``request_id`` and, when
tracing is on, its ``trace_id``; tasks and threads started for the request inherit it. ``logging.shutdown`` (run at exit) and reconfiguring write the queue: a clean exit loses
no line. Any other handler on the access logger (a test's capture, propagation to the root)
gets ordinary records, as before.
"""
from __future__ import annotations

import asyncio
import contextvars
import logging
import re
import sys
import threading
import time
from operator import attrgetter
from typing import IO, Any, Callable

import orjson

from gateway.config import LoggingConfig
from gateway.http.record import RequestRecord

ACCESS_LOGGER = "gateway.access"
_access = logging.getLogger(ACCESS_LOGGER)
_MAX_STR = 200  # request ids and paths come from clients: keep lines bounded
_MARK = "_gateway_handler"  # tags the handlers this module installed
FLUSH_INTERVAL_S = 0.1  # queued access lines wait at most this long
FLUSH_LINES = 256  # ... or until this many are queued

_fast: _AccessHandler | None = None  # the access handler configure_logging installed last
# The request being handled, for the ids on its log lines; set and reset per request.
current_request: contextvars.ContextVar[RequestRecord | None] = contextvars.ContextVar("gateway_request",
                                                                                       default=None)


def configure_logging(cfg: LoggingConfig, *, stream: IO[str] | None = None) -> None:
    """Root level from ``cfg.level``; JSON or text on stderr for every log, access lines included."""
    global _fast
    root = logging.getLogger()
    root.setLevel(getattr(logging, cfg.level.upper()))
    fmt_json = cfg.format == "json"
    for logger in (root, _access):
        for h in [h for h in logger.handlers if getattr(h, _MARK, False)]:
            logger.removeHandler(h)
            h.close()  # writes what it still holds
    sink = _Sink(stream if stream is not None else sys.stderr, _json_line if fmt_json else _text_line)
    root.addHandler(_mark(_SinkHandler(sink, JsonFormatter() if fmt_json else TextFormatter())))
    # Access lines are already structured: their own handler, so they are not wrapped twice.
    _fast = _AccessHandler(sink, AccessJsonFormatter() if fmt_json else AccessTextFormatter())
    _access.addHandler(_mark(_fast))
    _access.propagate = False
    _access.setLevel(logging.NOTSET)  # follow the root level


def write_access_log(rec: RequestRecord) -> None:
    """One line for a finished request; cheap when the level hides INFO."""
    if not _access.isEnabledFor(logging.INFO):
        return
    handlers = _access.handlers
    fast = _fast
    if (fast is not None and len(handlers) == 1 and handlers[0] is fast and not _access.propagate
            and not _access.filters and not fast.filters):
        fast.sink.add((time.time(), _snapshot(rec)))
    else:  # someone else listens too: they get a regular record
        _access.info("access", extra={"access": access_fields(rec)})


def access_fields(rec: RequestRecord) -> dict[str, Any]:
    """The access-log fields, in a fixed order: the only data a line can hold."""
    return _fields(_snapshot(rec))


# What a line is made of, taken when the request is done (the record is the request's to change).
_snapshot = attrgetter("request_id", "trace_id", "method", "path", "team", "key_fingerprint", "model", "status",
                       "error_code", "finish_reason", "stream", "cache", "duration_s", "upstream_s", "ttfb_s",
                       "bytes_in", "bytes_out", "usage")


def _fields(values: tuple) -> dict[str, Any]:
    (request_id, trace_id, method, path, team, key_fingerprint, model, status, error_code, finish_reason, stream, cache,
     duration_s, upstream_s, ttfb_s, bytes_in, bytes_out, u) = values
    return {
        "request_id": request_id[:_MAX_STR],
        "trace_id": trace_id,  # null unless tracing is on
        "method": method,
        "path": path[:_MAX_STR],
        "team": team,
        "key_fingerprint": key_fingerprint,  # which of the team's keys: 8 hex of its sha256, never the key
        "model": model,
        "status": status,
        "error_code": error_code,
        # the provider's (IMAGE_SAFETY: a 200 whose image was blocked); the provider's text: bounded
        "finish_reason": finish_reason and finish_reason[:_MAX_STR],
        "stream": stream,
        "cache": cache,
        "duration_ms": _ms(duration_s),
        "upstream_ms": _ms(upstream_s),
        "ttfb_ms": _ms(ttfb_s),
        "bytes_in": bytes_in,
        "bytes_out": bytes_out,
        "prompt_tokens": u.prompt if u else 0,
        "completion_tokens": u.completion if u else 0,
        "image_tokens": u.image if u else 0,
        "reasoning_tokens": u.reasoning if u else 0,
        "audio_tokens": u.audio if u else 0,
        "usage_estimated": u.estimated if u else False,
        "images_in": u.images_in if u else 0,
        "images_out": u.images_out if u else 0,
        "cost_usd": round(u.cost_usd, 6) if u else 0.0,
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


_second: tuple[int, str] = (-1, "")  # the last whole second formatted, and its text


def _iso(created: float) -> str:
    """ISO 8601 UTC with milliseconds, e.g. 2025-01-31T12:00:00.123Z."""
    global _second
    sec, text = _second  # one read: another thread may replace it
    if int(created) != sec:
        sec = int(created)
        text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
        _second = (sec, text)
    return f"{text}.{int(created % 1 * 1000):03d}Z"


def _json_line(created: float, fields: dict[str, Any]) -> str:
    return orjson.dumps({"time": _iso(created), **fields}).decode()


def _text_line(created: float, fields: dict[str, Any]) -> str:
    return " ".join([f"time={_iso(created)}", *[f"{k}={_text_value(v)}" for k, v in fields.items()]])


_QUOTE_IF = re.compile(r'[ "=\\]')


def _text_value(v: Any) -> str:
    if type(v) is int or type(v) is float:  # most fields: nothing to quote
        return str(v)
    if v is None:
        return "-"
    if v is True or v is False:
        return "true" if v else "false"
    s = str(v)
    if not s or _QUOTE_IF.search(s) or not s.isprintable():
        return orjson.dumps(s).decode()  # quoted and escaped: no line breaks, no spoofed keys
    return s


def _mark(handler: logging.Handler) -> logging.Handler:
    setattr(handler, _MARK, True)
    return handler


class _Sink:
    """One output stream and its queue. ``add`` queues an access line, or what makes one: a
    (time, ``_snapshot``) pair, formatted with the others when the queue is written, within
    ``FLUSH_INTERVAL_S`` (at once when no event loop runs in this thread). ``write`` writes a line
    now, after the queued ones; ``flush`` writes the queue."""

    def __init__(self, stream: IO[str], access_line: Callable[[float, dict[str, Any]], str]) -> None:
        self.stream = stream
        self._access_line = access_line
        self._queue: list[str | tuple[float, tuple]] = []
        self._lock = threading.RLock()  # the queue; the loop's thread and any other may log
        self._timer_loop: asyncio.AbstractEventLoop | None = None  # where a flush is scheduled

    def add(self, item: str | tuple[float, tuple]) -> None:
        with self._lock:
            self._queue.append(item)
            if len(self._queue) >= FLUSH_LINES:
                self._write()
                return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no event loop here to flush later: now
            self.flush()
            return
        if loop is not self._timer_loop:  # none scheduled, or on a loop that is gone
            self._timer_loop = loop
            loop.call_later(FLUSH_INTERVAL_S, self._on_timer)

    def write(self, line: str) -> None:
        with self._lock:
            self._queue.append(line)
            self._write()

    def flush(self) -> None:
        with self._lock:
            self._write()

    def _on_timer(self) -> None:
        self._timer_loop = None
        self.flush()

    def _write(self) -> None:
        """Under the lock: everything queued, in one write."""
        if not self._queue:
            return
        queue, self._queue = self._queue, []
        try:
            fmt = self._access_line
            self.stream.write("".join([
                (item if type(item) is str else fmt(item[0], _fields(item[1]))) + "\n" for item in queue]))
            self.stream.flush()
        except Exception as exc:  # a full disk, a closed stream: the requests go on
            if self.stream is not sys.__stderr__ and sys.__stderr__ is not None:
                sys.__stderr__.write(f"--- Logging error: {len(queue)} line(s) lost: {exc!r}\n")


class _SinkHandler(logging.Handler):
    """Any log record, formatted and written at once (after the queued access lines)."""

    def __init__(self, sink: _Sink, formatter: logging.Formatter) -> None:
        super().__init__()
        self.sink = sink
        self.setFormatter(formatter)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.sink.write(self.format(record))
        except Exception:
            self.handleError(record)

    def flush(self) -> None:
        self.sink.flush()

    def close(self) -> None:
        self.sink.flush()
        super().close()


class _AccessHandler(_SinkHandler):
    """The access logger's handler: records are formatted and queued. ``write_access_log`` queues
    a snapshot itself when no other handler needs a record."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.sink.add(self.format(record))
        except Exception:
            self.handleError(record)


class AccessJsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "access", None)
        if fields is None:
            return JsonFormatter().format(record)
        return _json_line(record.created, fields)


class AccessTextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "access", None)
        if fields is None:
            return TextFormatter().format(record)
        return _text_line(record.created, fields)


class JsonFormatter(logging.Formatter):
    """Any other log record as one JSON object: time, level, logger, message, the request's ids
    when one is being handled (and exc)."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"time": _iso(record.created), "level": record.levelname.lower(), "logger": record.name,
               "message": record.getMessage()}
        rec = current_request.get()
        if rec is not None:
            out["request_id"] = rec.request_id[:_MAX_STR]
            if rec.trace_id is not None:
                out["trace_id"] = rec.trace_id
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(out).decode()


class TextFormatter(logging.Formatter):
    """Any other log record as ``time level logger message [request_id=.. trace_id=..]``, time in
    UTC like the access lines."""

    def format(self, record: logging.LogRecord) -> str:
        line = f"{_iso(record.created)} {record.levelname.lower()} {record.name} {record.getMessage()}"
        rec = current_request.get()
        if rec is not None:
            line += f" request_id={_text_value(rec.request_id[:_MAX_STR])}"
            if rec.trace_id is not None:
                line += f" trace_id={rec.trace_id}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line
