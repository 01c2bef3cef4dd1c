"""gateway.accesslog: one line per request, JSON or key=value, and never a secret."""
from __future__ import annotations

import io
import logging
import re

import orjson
import pytest

from gateway.accesslog import ACCESS_LOGGER, configure_logging, write_access_log
from gateway.config import LoggingConfig
from gateway.record import RequestRecord
from gateway.usage import Usage

FIELDS = ["time", "request_id", "method", "path", "team", "model", "status", "error_code", "stream", "cache",
          "duration_ms", "upstream_ms", "ttfb_ms", "bytes_in", "bytes_out", "prompt_tokens", "completion_tokens",
          "image_tokens", "reasoning_tokens", "audio_tokens", "usage_estimated", "images_in", "images_out", "cost_usd"]


@pytest.fixture(autouse=True)
def restore_logging():
    root, access = logging.getLogger(), logging.getLogger(ACCESS_LOGGER)
    saved = (root.level, list(root.handlers), list(access.handlers), access.propagate)
    yield
    root.setLevel(saved[0])
    root.handlers[:], access.handlers[:] = saved[1], saved[2]
    access.propagate = saved[3]


def configured(**kwargs) -> io.StringIO:
    out = io.StringIO()
    configure_logging(LoggingConfig(**kwargs), stream=out)
    return out


def a_request(**kwargs) -> RequestRecord:
    rec = RequestRecord("3f1c9a", "POST", "/v1/chat/completions", team="design",
                        model="google/gemini-3-pro-image-preview", stream=True, cache="miss", status=200,
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
        "time": None, "request_id": "3f1c9a", "method": "POST", "path": "/v1/chat/completions", "team": "design",
        "model": "google/gemini-3-pro-image-preview", "status": 200, "error_code": None, "stream": True,
        "cache": "miss", "duration_ms": 21500.0, "upstream_ms": 21490.0, "ttfb_ms": 14250.0,
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
    logging.getLogger("gateway.upstream").warning("upstream answered %s", 503)
    line = orjson.loads(out.getvalue())
    assert line["level"] == "warning" and line["logger"] == "gateway.upstream"
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
