"""Logging setup and the one access-log line per request.

The line is built only from a ``RequestRecord``'s fixed fields (ids, sizes, timings, counts):
no header, body, key, prompt or base64 ever reaches it, and there is no free-form field to put
one in. ``logging.format`` picks JSON (one object per line, for log pipelines) or ``key=value``
text (for people). The format lives in the handler's formatter, not in a module global, so
``configure_logging`` may be called again (tests, reloads) without duplicating handlers.
"""
from __future__ import annotations

import logging
import sys
import time
from typing import IO, Any

import orjson

from .config import LoggingConfig
from .record import RequestRecord

ACCESS_LOGGER = "gateway.access"
_access = logging.getLogger(ACCESS_LOGGER)
_MAX_STR = 200  # request ids and paths come from clients: keep lines bounded
_MARK = "_gateway_handler"  # tags the handlers this module installed


def configure_logging(cfg: LoggingConfig, *, stream: IO[str] | None = None) -> None:
    """Root level from ``cfg.level``; JSON or text on stderr for every log, access lines included."""
    root = logging.getLogger()
    root.setLevel(getattr(logging, cfg.level.upper()))
    fmt_json = cfg.format == "json"
    for logger in (root, _access):
        for h in [h for h in logger.handlers if getattr(h, _MARK, False)]:
            logger.removeHandler(h)
    out = stream if stream is not None else sys.stderr
    root.addHandler(_handler(out, JsonFormatter() if fmt_json else TextFormatter()))
    # Access lines are already structured: their own handler, so they are not wrapped twice.
    _access.addHandler(_handler(out, AccessJsonFormatter() if fmt_json else AccessTextFormatter()))
    _access.propagate = False
    _access.setLevel(logging.NOTSET)  # follow the root level


def write_access_log(rec: RequestRecord) -> None:
    """One line for a finished request; cheap when the level hides INFO."""
    if _access.isEnabledFor(logging.INFO):
        _access.info("access", extra={"access": access_fields(rec)})


def access_fields(rec: RequestRecord) -> dict[str, Any]:
    """The access-log fields, in a fixed order: the only data a line can hold."""
    u = rec.usage
    return {
        "request_id": rec.request_id[:_MAX_STR],
        "method": rec.method,
        "path": rec.path[:_MAX_STR],
        "team": rec.team,
        "model": rec.model,
        "status": rec.status,
        "error_code": rec.error_code,
        "stream": rec.stream,
        "cache": rec.cache,
        "duration_ms": _ms(rec.duration_s),
        "upstream_ms": _ms(rec.upstream_s),
        "ttfb_ms": _ms(rec.ttfb_s),
        "bytes_in": rec.bytes_in,
        "bytes_out": rec.bytes_out,
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


def _iso(created: float) -> str:
    """ISO 8601 UTC with milliseconds, e.g. 2025-01-31T12:00:00.123Z."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{int(created % 1 * 1000):03d}Z"


def _handler(stream: IO[str], formatter: logging.Formatter) -> logging.Handler:
    h = logging.StreamHandler(stream)
    h.setFormatter(formatter)
    setattr(h, _MARK, True)
    return h


def _text_value(v: Any) -> str:
    if v is None:
        return "-"
    if v is True or v is False:
        return "true" if v else "false"
    s = str(v)
    if not s or any(c in s for c in ' "=\\') or not s.isprintable():
        return orjson.dumps(s).decode()  # quoted and escaped: no line breaks, no spoofed keys
    return s


class AccessJsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "access", None)
        if fields is None:
            return JsonFormatter().format(record)
        return orjson.dumps({"time": _iso(record.created), **fields}).decode()


class AccessTextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "access", None)
        if fields is None:
            return TextFormatter().format(record)
        parts = [f"time={_iso(record.created)}"]
        parts.extend(f"{k}={_text_value(v)}" for k, v in fields.items())
        return " ".join(parts)


class JsonFormatter(logging.Formatter):
    """Any other log record as one JSON object: time, level, logger, message (and exc)."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"time": _iso(record.created), "level": record.levelname.lower(), "logger": record.name,
               "message": record.getMessage()}
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(out).decode()


class TextFormatter(logging.Formatter):
    """Any other log record as ``time level logger message``, time in UTC like the access lines."""

    def format(self, record: logging.LogRecord) -> str:
        line = f"{_iso(record.created)} {record.levelname.lower()} {record.name} {record.getMessage()}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line
