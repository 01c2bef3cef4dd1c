"""gateway.observability.accesslog: one line per request, JSON or key=value, and never a secret."""
from __future__ import annotations

import asyncio
import io
import logging
import re
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

from gateway.observability.accesslog import ACCESS_LOGGER, FLUSH_INTERVAL_S, FLUSH_LINES, configure_logging, write_access_log
from gateway.config import LoggingConfig
from gateway.http.record import RequestRecord
from gateway.usage import Usage
from tests.fixtures.gateway import wait_for

FIELDS = ["time", "request_id", "trace_id", "method", "path", "team", "key_fingerprint", "model", "status", "error_code", "finish_reason", "stream",
          "cache",
          "duration_ms", "upstream_ms", "ttfb_ms", "bytes_in", "bytes_out", "prompt_tokens", "completion_tokens",
          "image_tokens", "reasoning_tokens", "audio_tokens", "usage_estimated", "images_in", "images_out", "cost_usd"]


@pytest.fixture(autouse=True)
def _logging_restored(restore_logging):
    """Every test here configures logging; the next test finds it as it was."""


def configured(**kwargs) -> io.StringIO:
    out = io.StringIO()
    configure_logging(LoggingConfig(**kwargs), stream=out)
    return out


def a_request(**kwargs) -> RequestRecord:
    rec = RequestRecord("3f1c9a", "POST", "/v1/chat/completions", team="design",
                        model="google/gemini-3-pro-image-preview", stream=True, cache="miss", status=200,
                        finish_reason="STOP",
                        bytes_in=1_048_576, bytes_out=2_500_000,
                        usage=Usage(prompt=120, completion=1400, image=1120, reasoning=250, images_in=1,
                                    images_out=1, cost_usd=0.15168))
    rec.duration_s, rec.upstream_s, rec.ttfb_s = 21.5, 21.49, 14.25
    for k, v in kwargs.items():
        setattr(rec, k, v)
    return rec


def test_json_line_holds_every_field():
    out = configured(format="json")
    write_access_log(a_request())
    lines = out.getvalue().splitlines()
    assert len(lines) == 1
    line = orjson.loads(lines[0])
    assert list(line) == FIELDS
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["time"])
    assert line | {"time": None} == {
        "time": None, "request_id": "3f1c9a", "trace_id": None, "method": "POST", "path": "/v1/chat/completions",
        "team": "design", "key_fingerprint": None, "model": "google/gemini-3-pro-image-preview", "status": 200, "error_code": None, "finish_reason": "STOP",
        "stream": True, "cache": "miss", "duration_ms": 21500.0, "upstream_ms": 21490.0, "ttfb_ms": 14250.0,
        "bytes_in": 1_048_576, "bytes_out": 2_500_000, "prompt_tokens": 120, "completion_tokens": 1400,
        "image_tokens": 1120, "reasoning_tokens": 250, "audio_tokens": 0, "usage_estimated": False,
        "images_in": 1, "images_out": 1, "cost_usd": 0.15168}


def test_a_refused_request_without_usage():
    out = configured(format="json")
    write_access_log(a_request(team=None, status=401, error_code="invalid_api_key", usage=None, ttfb_s=None,
                               stream=False, cache="none"))
    line = orjson.loads(out.getvalue())
    assert line["team"] is None and line["status"] == 401 and line["error_code"] == "invalid_api_key"
    assert line["ttfb_ms"] is None and line["prompt_tokens"] == 0 and line["cost_usd"] == 0.0


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_a_safety_blocked_answer_shows_in_its_line(fmt):
    out = configured(format=fmt)
    write_access_log(a_request(finish_reason="IMAGE_SAFETY", usage=Usage(prompt=120, completion=0)))
    line = out.getvalue()
    if fmt == "json":
        assert orjson.loads(line)["finish_reason"] == "IMAGE_SAFETY"
    else:
        assert " status=200 error_code=- finish_reason=IMAGE_SAFETY " in line


def test_text_line_is_key_value_and_cannot_be_spoofed():
    out = configured(format="text")
    write_access_log(a_request(request_id='evil" status=200\nforged=1', error_code="rate_limit_exceeded"))
    lines = out.getvalue().splitlines()
    assert len(lines) == 1  # the newline stayed inside the quoted value
    line = lines[0]
    assert line.startswith("time=") and " team=design " in line and " stream=true " in line
    assert " image_tokens=1120 " in line and line.endswith(" cost_usd=0.15168")
    assert 'request_id="evil\\" status=200\\nforged=1"' in line
    keys = re.findall(r'(?:^| )(\w+)=(?:"(?:[^"\\]|\\.)*"|\S*)', line)
    assert keys == FIELDS


def test_other_logs_share_the_format():
    out = configured(format="json")
    logging.getLogger("gateway.upstream.client").warning("upstream answered %s", 503)
    line = orjson.loads(out.getvalue())
    assert line["level"] == "warning" and line["logger"] == "gateway.upstream.client"
    assert line["message"] == "upstream answered 503"


def test_level_above_info_silences_the_access_log():
    out = configured(level="warning")
    write_access_log(a_request())
    assert out.getvalue() == ""


def test_reconfiguring_does_not_duplicate_lines():
    configured()
    out = configured()
    write_access_log(a_request())
    assert len(out.getvalue().splitlines()) == 1


def test_no_key_prompt_or_base64_can_reach_a_line():
    """The record has no field for them; the line is made of the record's fixed fields only."""
    key = "sk-team-" + "k" * 40
    b64 = "iVBORw0KGgo" + "A" * 200
    out = configured(format="json")
    rec = a_request()
    with pytest.raises(AttributeError):  # slots: nowhere to hang a prompt or a header
        rec.prompt = b64
    write_access_log(rec)
    logged = out.getvalue()
    assert key not in logged and b64[:40] not in logged and "Bearer" not in logged
    assert not re.search(r"[A-Za-z0-9+/]{100,}", logged)


# -- the short way: this module's handler alone on the access logger (a served gateway) ----------


def alone() -> None:
    """Only the handler configure_logging installed stays on the access logger (the fixture
    restores the others, such as the session's log scan)."""
    access = logging.getLogger(ACCESS_LOGGER)
    access.handlers[:] = [h for h in access.handlers if getattr(h, "_gateway_handler", False)]


class Writes(io.StringIO):
    """A stream that counts its writes."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, s: str) -> int:
        self.writes += 1
        return super().write(s)


def configured_alone(stream=None, **kwargs):
    out = stream if stream is not None else io.StringIO()
    configure_logging(LoggingConfig(**kwargs), stream=out)
    alone()
    return out


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_the_short_way_writes_the_same_line_as_a_record(fmt, monkeypatch):
    monkeypatch.setattr(time, "time", lambda: 1767225600.25)  # 2026-01-01T00:00:00.250Z, records too
    rec = a_request(request_id='odd "id"=1', path="/v1/chat/completions?x=1")
    by_record = configured(format=fmt)
    logging.getLogger(ACCESS_LOGGER).addHandler(logging.NullHandler())  # another listener: a LogRecord is made
    write_access_log(rec)
    short = configured_alone(format=fmt)
    write_access_log(rec)  # no event loop: written at once
    assert short.getvalue() == by_record.getvalue()
    assert short.getvalue().startswith("time=2026-01-01T00:00:00.250Z " if fmt == "text"
                                       else '{"time":"2026-01-01T00:00:00.250Z",')


def test_the_short_way_makes_no_log_record(monkeypatch):
    out = configured_alone()
    monkeypatch.setattr(logging.Logger, "makeRecord", lambda *a, **k: pytest.fail("a LogRecord was made"))
    write_access_log(a_request())
    assert list(orjson.loads(out.getvalue())) == FIELDS


def test_the_short_way_keeps_the_level():
    out = configured_alone(level="warning")
    write_access_log(a_request())
    assert out.getvalue() == ""


def test_any_other_handler_still_gets_a_record():
    out = configured_alone()
    seen = []
    handler = logging.Handler()
    handler.emit = seen.append
    logging.getLogger(ACCESS_LOGGER).addHandler(handler)
    write_access_log(a_request())
    assert len(seen) == 1 and seen[0].access["team"] == "design"
    assert orjson.loads(out.getvalue())["team"] == "design"


async def test_on_an_event_loop_lines_are_written_together_within_the_interval():
    out = configured_alone(Writes())
    for i in range(50):
        write_access_log(a_request(request_id=f"r{i}"))
        await asyncio.sleep(0)  # other ticks pass: the lines wait
    assert out.getvalue() == "" and out.writes == 0
    await wait_for(lambda: out.writes, timeout_s=5, interval_s=FLUSH_INTERVAL_S / 2)
    ids = [orjson.loads(line)["request_id"] for line in out.getvalue().splitlines()]
    assert ids == [f"r{i}" for i in range(50)] and out.writes == 1
    write_access_log(a_request(request_id="later"))  # a new timer after the last one fired
    await wait_for(lambda: out.writes == 2, timeout_s=5, interval_s=FLUSH_INTERVAL_S / 2)
    assert out.getvalue().splitlines()[-1].startswith('{"time"') and out.writes == 2


async def test_a_queued_line_shows_the_request_as_it_was_logged():
    out = configured_alone()
    rec = a_request()
    write_access_log(rec)
    rec.status, rec.bytes_out = 500, 0  # the record is the request's; the queue holds a copy
    logging.getLogger(ACCESS_LOGGER).handlers[0].flush()
    line = orjson.loads(out.getvalue())
    assert (line["status"], line["bytes_out"]) == (200, 2_500_000)


async def test_a_full_queue_is_written_at_once():
    out = configured_alone(Writes())
    for _ in range(FLUSH_LINES - 1):
        write_access_log(a_request())
    assert out.writes == 0
    write_access_log(a_request())
    assert out.writes == 1 and out.getvalue().count("\n") == FLUSH_LINES


async def test_other_log_lines_keep_their_place_after_queued_access_lines():
    out = configured_alone()
    write_access_log(a_request(request_id="first"))
    logging.getLogger("gateway.upstream.client").warning("then this")
    write_access_log(a_request(request_id="last"))
    lines = [orjson.loads(line) for line in out.getvalue().splitlines()]
    assert [line.get("request_id") or line["message"] for line in lines] == ["first", "then this"]
    logging.getLogger(ACCESS_LOGGER).handlers[0].flush()
    assert orjson.loads(out.getvalue().splitlines()[-1])["request_id"] == "last"


async def test_reconfiguring_writes_what_was_queued():
    before = configured_alone()
    write_access_log(a_request())
    configured_alone()
    assert len(before.getvalue().splitlines()) == 1


def test_lines_queued_when_the_process_exits_are_written():
    """A served gateway's clean exit: the loop is gone with its timer, logging.shutdown flushes."""
    code = (
        "import asyncio\n"
        "from gateway.observability.accesslog import configure_logging, write_access_log\n"
        "from gateway.config import LoggingConfig\n"
        "from gateway.http.record import RequestRecord\n"
        "configure_logging(LoggingConfig(level='info'))\n"
        "async def main():\n"
        "    for i in range(1000):\n"
        "        write_access_log(RequestRecord(f'r{i}', 'POST', '/v1/chat/completions'))\n"
        "asyncio.run(main())\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr
    ids = [orjson.loads(line)["request_id"] for line in done.stderr.splitlines()]
    assert ids == [f"r{i}" for i in range(1000)]
