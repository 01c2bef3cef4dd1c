"""The upstream key never reaches a client or a log line; the client's key never goes upstream."""
from __future__ import annotations

import codecs
import logging
from typing import Any

import aiohttp
import orjson
import pytest

from tests.fixtures.simulator import sse_events

MODEL = "google/gemini-3-pro-image-preview"


def body(**extra) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "a secret garden"}], **extra}


@pytest.mark.parametrize("status", [400, 404, 500])
async def test_an_upstream_error_quoting_the_key_is_redacted(start_gateway, simulator, caplog, status):
    caplog.set_level(logging.DEBUG)
    gw = await start_gateway(upstream={"max_retries": 0})
    async with aiohttp.ClientSession() as http:
        async with http.post(gw.url + "/v1/chat/completions", json=body(sim_fault=f"status={status};echo_key"), headers=gw.headers()) as resp:
            text = await resp.text()
            assert resp.status == status
    await gw.idle()  # every line of the request is logged
    assert "Incorrect API key provided: [redacted]" in text  # the provider's error, passed through
    assert simulator.api_key not in text and simulator.api_key[:8] not in text
    assert gw.key() not in text  # what went upstream was the gateway's key, not the team's
    assert simulator.api_key not in caplog.text and gw.key() not in caplog.text


async def test_the_provider_refusing_our_key_is_a_502_that_names_no_key(start_gateway, simulator, caplog):
    caplog.set_level(logging.DEBUG)
    gw = await start_gateway(upstream={"max_retries": 0})
    async with aiohttp.ClientSession() as http:
        async with http.post(gw.url + "/v1/chat/completions", json=body(sim_fault="status=401;echo_key"), headers=gw.headers()) as resp:
            err = (await resp.json())["error"]
            assert resp.status == 502
    await gw.idle()  # every line of the request is logged
    assert err["code"] == "upstream_bad_response" and "credentials" in err["message"]
    assert simulator.api_key not in str(err) and simulator.api_key not in caplog.text


async def test_no_response_or_log_line_carries_a_key(start_gateway, simulator, caplog):
    """A tour of every route and failure: no body or header holds the upstream or team key."""
    caplog.set_level(logging.DEBUG)
    gw = await start_gateway(upstream={"max_retries": 0, "timeout_s": 5})
    seen = []
    async with aiohttp.ClientSession() as http:
        calls = [
            ("POST", "/v1/chat/completions", body()),
            ("POST", "/v1/chat/completions", body(stream=True)),
            ("POST", "/v1/chat/completions", body(stream=True, sim_fault="cut_after=1")),
            ("POST", "/v1/chat/completions", body(sim_fault="garbage")),
            ("POST", "/v1/chat/completions", body(sim_fault="reset")),
            ("POST", "/v1/chat/completions", body(model="nope")),
            ("GET", "/v1/models", None),
            ("GET", "/v1/usage", None),
            ("GET", "/admin/usage", None),
            ("GET", "/readyz", None),
            ("GET", "/metrics", None),
        ]
        for method, path, payload in calls:
            async with http.request(method, gw.url + path, json=payload, headers=gw.headers()) as resp:
                seen.append(str(dict(resp.headers)) + (await resp.read()).decode("utf-8", "replace"))
    await gw.idle()  # every line of every request is logged
    everything = "\n".join(seen) + caplog.text
    assert simulator.api_key not in everything
    assert gw.key() not in everything


# A provider that echoes the key, raw or JSON-escaped, wherever it can (see gateway.simulator).
ECHOES = [
    pytest.param("echo_key_header", False, id="header-json"),
    pytest.param("echo_key_header", True, id="header-sse"),
    pytest.param("status=400;echo_key_header", False, id="header-error"),
    pytest.param("status=400;echo_key", False, id="error-body-json"),
    pytest.param("status=400;echo_key", True, id="error-body-sse"),
    pytest.param("echo_key_body", False, id="200-body"),
    pytest.param("echo_key_stream", True, id="stream-content"),
    pytest.param("echo_key_stream_error", True, id="stream-error-event"),
]


def decoded_strings(value: Any):
    """Every string in a decoded JSON value, object keys included."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for item in value:
            yield from decoded_strings(item)
    elif isinstance(value, dict):
        for name, item in value.items():
            yield name
            yield from decoded_strings(item)


def unescaped(text: str) -> str:
    """``text`` with JSON's backslash escapes undone, for text that is not a JSON document."""
    return codecs.decode(text.replace("\\/", "/"), "unicode_escape")


def assert_no_key(key: str, headers, raw: bytes) -> list[Any]:
    """No header, body byte, JSON string or SSE event holds ``key``, raw or escaped; returns
    the body's JSON documents (the body, or each stream event) to assert on."""
    for name, value in headers.items():
        assert key not in value and key not in unescaped(value), f"header {name}: {value}"
    text = raw.decode()
    assert key not in text and key not in unescaped(text)
    payloads = [event[len(b"data: "):] for event in sse_events(raw) if event.startswith(b"data: ")] if raw.startswith(b":") else [raw]
    documents = [orjson.loads(p) for p in payloads if p != b"[DONE]"]  # still valid JSON after redaction
    for document in documents:
        assert not [s for s in decoded_strings(document) if key in s]
    return documents


@pytest.mark.parametrize("escaped", [False, True], ids=["raw", "escaped"])
@pytest.mark.parametrize("fault,stream", ECHOES)
async def test_a_provider_echoing_the_key_never_shows_it_to_the_client(start_gateway, simulator, fault, stream, escaped):
    gw = await start_gateway(upstream={"max_retries": 0})
    spec = fault + (";key_escaped" if escaped else "")
    async with aiohttp.ClientSession() as http:
        async with http.post(gw.url + "/v1/chat/completions", json=body(stream=stream, sim_fault=spec), headers=gw.headers()) as resp:
            raw = await resp.read()
            status, headers = resp.status, resp.headers
    documents = assert_no_key(simulator.api_key, headers, raw)
    if fault.startswith("status="):
        message = documents[0]["error"]["message"]
        assert status == 400 and message == ("Incorrect API key provided: [redacted]" if fault.endswith("echo_key") else "Invalid request.")
    elif fault == "echo_key_stream_error":  # the provider's error event, relayed without the key
        errors = [d["error"]["message"] for d in documents if "error" in d]
        assert status == 200 and errors[0] == "Upstream model error (key [redacted])."
    elif stream:
        assert status == 200 and raw.endswith(b"data: [DONE]\n\n")
        assert any(d["choices"] and d["choices"][0]["delta"].get("images") for d in documents)
    else:
        assert status == 200 and len(documents[0]["choices"][0]["message"]["images"]) == 1
    if fault in ("echo_key_body", "echo_key_stream"):
        content = "".join(d["choices"][0]["message"]["content"] if "message" in d["choices"][0] else d["choices"][0]["delta"].get("content") or "" for d in documents if d.get("choices"))
        assert content.endswith(" (key [redacted])")


@pytest.mark.parametrize("escaped", [False, True], ids=["raw", "escaped"])
@pytest.mark.parametrize("fault,stream", [("echo_key_body", False), ("echo_key_stream", True)])
async def test_a_cache_hit_of_an_answer_that_echoed_the_key_holds_no_key(start_gateway, simulator, fault, stream, escaped):
    """The cache keeps what the client was sent (key-free), never the provider's raw bytes."""
    gw = await start_gateway(upstream={"max_retries": 0})
    spec = fault + (";key_escaped" if escaped else "")
    async with aiohttp.ClientSession() as http:
        for expected in ("MISS", "HIT"):
            async with http.post(gw.url + "/v1/chat/completions", json=body(stream=stream, seed=7, sim_fault=spec),
                                 headers=gw.headers()) as resp:
                raw = await resp.read()
                assert (resp.status, resp.headers["x-cache"]) == (200, expected)
                headers = resp.headers
            await gw.idle()  # the entry is written after the answer
    leading = b": a hit\n\n" if stream and not raw.startswith(b":") else b""  # what assert_no_key tells streams by
    documents = assert_no_key(simulator.api_key, headers, leading + raw)
    content = "".join(d["choices"][0]["message"]["content"] if "message" in d["choices"][0] else d["choices"][0]["delta"].get("content") or "" for d in documents if d.get("choices"))
    assert content.endswith(" (key [redacted])")


@pytest.mark.parametrize("escaped", [False, True], ids=["raw", "escaped"])
async def test_an_images_answer_whose_provider_echoed_the_key_holds_no_key(start_gateway, simulator, escaped):
    """The Images API answers from the parsed answer (its revised_prompt is the message text):
    parsed from the key-free bytes."""
    gw = await start_gateway(upstream={"max_retries": 0})
    await simulator.script(["echo_key_body" + (";key_escaped" if escaped else "")])
    async with aiohttp.ClientSession() as http:
        async with http.post(gw.url + "/v1/images/generations", headers=gw.headers(),
                             json={"model": MODEL, "prompt": "a secret garden", "response_format": "b64_json"}) as resp:
            raw = await resp.read()
            assert resp.status == 200
            documents = assert_no_key(simulator.api_key, resp.headers, raw)
    assert documents[0]["data"][0]["revised_prompt"].endswith("(key [redacted])")
