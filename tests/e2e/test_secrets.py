"""The upstream key never reaches a client or a log line; the client's key never goes upstream."""
from __future__ import annotations

import logging

import aiohttp
import pytest

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
    everything = "\n".join(seen) + caplog.text
    assert simulator.api_key not in everything
    assert gw.key() not in everything
