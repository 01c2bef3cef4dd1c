"""Tracing end to end: a real gateway process exporting over OTLP/HTTP to a real receiver that
decodes the protobuf (``tests/fixtures/otlp.py``), the simulator recording the ``traceparent``
it got, and the gateway's own log. Without ``tracing``, nothing of OpenTelemetry is imported,
nothing is exported and the provider gets no ``traceparent``. An Images API request with ``n``
images is one server span whose ``n`` upstream calls (with their cache and relay spans) are its
children.
"""
from __future__ import annotations

import asyncio
import io
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import aiohttp
import orjson
import pytest
import pytest_asyncio

from gateway.config import ConfigError, LoggingConfig, TracingConfig
from gateway.config.loader import parse
from gateway.http.middleware import TRACING
from gateway.http.record import RequestRecord
from gateway.http.state import METRICS
from gateway.keytool import hash_key
from gateway.observability.accesslog import configure_logging, current_request
from tests.fixtures.gateway import gateway_config, stop_gateway, team_key
from tests.fixtures.otlp import Receiver, ReceivedSpan, otlp_receiver

MODEL = "google/gemini-3-pro-image-preview"
REPO_ROOT = Path(__file__).resolve().parents[2]
CLIENT_TRACE, CLIENT_SPAN = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"


@pytest_asyncio.fixture
async def receiver():
    async with otlp_receiver() as r:
        yield r


def body(text: str, **extra) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": text}], **extra}


def traced_config(simulator, receiver: Receiver, **extra) -> dict:
    """Traces to ``receiver``; no drain delay: stopping the process (which flushes) is quick."""
    return gateway_config(simulator.url, simulator.api_key, server={"drain_delay_s": 0},
                          tracing={"otlp_endpoint": receiver.url, "service_name": "gw-under-test", **extra})


def sent_context(traceparent: str) -> tuple[str, str, bool]:
    """(trace id, parent span id, sampled) of a W3C ``traceparent``."""
    version, trace_id, span_id, flags = traceparent.split("-")
    assert version == "00"
    return trace_id, span_id, bool(int(flags, 16) & 1)


async def chat(http: aiohttp.ClientSession, url: str, request_id: str, payload: dict, **headers: str):
    headers = {"Authorization": f"Bearer {team_key('alpha')}", "X-Request-ID": request_id, **headers}
    async with http.post(url + "/v1/chat/completions", json=payload, headers=headers) as response:
        return response.status, response.headers, await response.read()


def log_lines(tmp_path: Path, name: str = "gw0") -> list[dict]:
    return [orjson.loads(line) for line in (tmp_path / f"{name}.log").read_text().splitlines() if line.startswith("{")]


class Trace:
    """One request's spans, as the receiver got them."""

    def __init__(self, spans: list[ReceivedSpan]) -> None:
        servers = [s for s in spans if s.kind == "server"]
        assert len(servers) == 1, spans
        self.server = servers[0]
        self.spans = spans
        self.under = [s for s in spans if s.parent_id == self.server.span_id]
        assert len(self.under) == len(spans) - 1, spans  # every other span is the server's child
        self.children = {s.name: s for s in self.under}  # by name: for a request of one upstream call

    def named(self, name: str) -> list[ReceivedSpan]:
        return [s for s in self.under if s.name == name]

    def events(self, span: ReceivedSpan) -> list[str]:
        return [name for name, _ in span.events]


async def test_each_request_is_one_server_span_with_genai_attributes_and_its_children(
        gateway_processes, simulator, receiver, tmp_path):
    gw = await asyncio.to_thread(gateway_processes, traced_config(simulator, receiver))
    async with aiohttp.ClientSession() as http:
        status, headers, _ = await chat(http, gw.url, "r-json", body("a cat", temperature=0))
        assert status == 200 and headers["x-cache"] == "MISS"
        await gw.idle()  # its entry is written after the answer
        assert (await chat(http, gw.url, "r-sse", body("a dog", stream=True)))[0] == 200
        status, headers, _ = await chat(http, gw.url, "r-hit", body("a cat", temperature=0))
        assert status == 200 and headers["x-cache"] == "HIT"
        # one retry (503 + Retry-After), then a 500 the client gets as it came
        await simulator.script(["status=503;retry_after=0", "status=500"])
        status, _, answer = await chat(http, gw.url, "r-error", body("a cow"))
        assert status == 500, answer
        status, _, answer = await chat(http, gw.url, "r-cut", body("an owl", stream=True, sim_fault="cut_after=1"))
        assert status == 200 and b'"error"' in answer  # the stream ended with an error event
        assert (await chat(http, gw.url, "r-parent", body("a fox"),
                           traceparent=f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"))[0] == 200
        async with http.get(gw.url + "/v1/nothing/here/42", headers={"X-Request-ID": "r-404"}) as response:
            assert response.status == 404
        async with http.post(gw.url + "/v1/images/generations", json={"model": MODEL, "prompt": "two owls", "n": 2},
                             headers={"Authorization": f"Bearer {team_key('alpha')}",
                                      "X-Request-ID": "r-images"}) as response:
            assert response.status == 200 and len((await response.json())["data"]) == 2
    calls = (await simulator.stats())["requests"]
    await asyncio.to_thread(stop_gateway, gw)  # shutting down flushes what is still queued

    lines = log_lines(tmp_path)
    access = {line["request_id"]: line for line in lines if "path" in line}
    fingerprint = hash_key(team_key("alpha"))[:8]
    traces = {}
    for rid, line in access.items():
        assert line["key_fingerprint"] == (None if rid == "r-404" else fingerprint) and len(line["trace_id"]) == 32
        assert receiver.trace(line["trace_id"]), (rid, receiver.posts, lines[-10:])
        traces[rid] = Trace(receiver.trace(line["trace_id"]))  # the access line names its trace
    sent: dict[str, list[tuple]] = {}  # trace id -> what the provider got: (parent span id, sampled)
    for c in calls:
        trace_id, span_id, sampled = sent_context(c["traceparent"])
        sent.setdefault(trace_id, []).append((span_id, sampled))

    t = traces["r-json"]
    assert t.server.name == f"chat {MODEL}" and t.server.service == "gw-under-test"
    assert t.server.parent_id == "" and t.server.status == "unset"
    line = access["r-json"]
    assert t.server.attributes | {"gateway.request_id": None} == {
        "gen_ai.operation.name": "chat", "gen_ai.request.model": MODEL, "gen_ai.response.model": MODEL,
        "gen_ai.usage.input_tokens": line["prompt_tokens"], "gen_ai.usage.output_tokens": line["completion_tokens"],
        "http.response.status_code": 200, "gateway.team": "alpha", "gateway.cache": "miss",
        "gateway.key_fingerprint": fingerprint, "http.request.method": "POST", "http.route": "/v1/chat/completions",
        "url.path": "/v1/chat/completions", "gateway.request_id": None}
    assert line["completion_tokens"] > 0
    assert set(t.children) == {"admission", "cache", "upstream", "relay"}
    assert {name: s.kind for name, s in t.children.items()} == {
        "admission": "internal", "cache": "internal", "upstream": "client", "relay": "internal"}
    assert "first_byte" in t.events(t.server)
    # the provider got the upstream span's own context: same trace, that span as the parent
    assert sent[t.server.trace_id] == [(t.children["upstream"].span_id, True)]

    t = traces["r-sse"]
    assert t.server.attributes["gateway.cache"] == "bypass" and t.server.attributes["gen_ai.usage.output_tokens"] > 0
    assert set(t.children) == {"admission", "upstream", "relay"}  # a bypass does not look the cache up
    assert sent[t.server.trace_id] == [(t.children["upstream"].span_id, True)]

    t = traces["r-hit"]
    assert t.server.attributes["gateway.cache"] == "hit" and set(t.children) == {"admission", "cache", "relay"}
    assert t.server.trace_id not in sent  # answered from the cache: the provider saw nothing

    t = traces["r-error"]
    assert t.server.status == "error" and t.server.status_message == access["r-error"]["error_code"]
    assert t.server.attributes["http.response.status_code"] == 500
    upstream = t.children["upstream"]
    assert upstream.kind == "client" and upstream.status == "error"
    assert upstream.events == [("retry", {"gateway.retry.attempt": 1, "gateway.retry.reason": "503"})]
    assert sent[t.server.trace_id] == [(upstream.span_id, True)] * 2  # both attempts

    t = traces["r-cut"]
    assert "stream_cut" in t.events(t.server) and t.server.status == "error"
    assert t.server.status_message == access["r-cut"]["error_code"]
    assert t.children["relay"].status == "error"
    warning = [x for x in lines if x.get("logger") == "gateway.http.chat" and x.get("request_id") == "r-cut"]
    assert warning and warning[0]["trace_id"] == t.server.trace_id  # other log lines name the request too

    t = traces["r-404"]  # named by its route, never by the client's path: span names stay few
    assert t.server.name == "GET unmatched" and t.children == {} and t.server.attributes["http.response.status_code"] == 404

    t = traces["r-images"]  # one server span; each of the n chat calls its own upstream span under it
    line = access["r-images"]
    assert t.server.name == f"chat {MODEL}" and t.server.kind == "server" and t.server.status == "unset"
    assert t.server.attributes | {"gateway.request_id": None} == {
        "gen_ai.operation.name": "chat", "gen_ai.output.type": "image", "gen_ai.request.choice.count": 2,
        "gen_ai.request.model": MODEL, "gen_ai.response.model": MODEL,
        "gen_ai.usage.input_tokens": line["prompt_tokens"], "gen_ai.usage.output_tokens": line["completion_tokens"],
        "http.response.status_code": 200, "gateway.team": "alpha", "gateway.cache": "bypass",
        "gateway.key_fingerprint": fingerprint, "http.request.method": "POST", "http.route": "/v1/images/generations",
        "url.path": "/v1/images/generations", "gateway.request_id": None}
    assert sorted((s.name, s.kind) for s in t.under) == [  # not deterministic: no cache lookup (as r-sse)
        ("admission", "internal"), ("relay", "internal"), ("relay", "internal"),
        ("upstream", "client"), ("upstream", "client")]
    upstreams = t.named("upstream")
    assert all(s.attributes == {"gen_ai.operation.name": "chat", "gen_ai.request.model": MODEL,
                                "http.response.status_code": 200} and s.status == "unset" for s in upstreams)
    assert "first_byte" in t.events(t.server)
    # the provider got two calls of this trace, each naming its own upstream span
    assert sorted(sent[t.server.trace_id]) == sorted((s.span_id, True) for s in upstreams)
    assert len({s.span_id for s in upstreams}) == 2

    t = traces["r-parent"]  # the client's trace continued
    assert t.server.trace_id == CLIENT_TRACE and t.server.parent_id == CLIENT_SPAN


async def test_sampling_follows_sample_ratio_and_a_sampled_caller(gateway_processes, simulator, receiver, tmp_path):
    gw = await asyncio.to_thread(gateway_processes, traced_config(simulator, receiver, sample_ratio=0))
    async with aiohttp.ClientSession() as http:
        assert (await chat(http, gw.url, "r-unsampled", body("a cat")))[0] == 200
        assert (await chat(http, gw.url, "r-sampled", body("a dog"),
                           traceparent=f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"))[0] == 200
    calls = (await simulator.stats())["requests"]
    await asyncio.to_thread(stop_gateway, gw)
    lines = log_lines(tmp_path)
    access = {line["request_id"]: line for line in lines if "path" in line}
    unsampled = access["r-unsampled"]["trace_id"]
    assert receiver.trace(unsampled) == []  # not exported...
    contexts = [sent_context(c["traceparent"]) for c in calls]
    assert [(trace_id, sampled) for trace_id, _, sampled in contexts] == [
        (unsampled, False), (CLIENT_TRACE, True)]  # ...and the provider is told so
    assert access["r-sampled"]["trace_id"] == CLIENT_TRACE
    assert {s.name for s in receiver.trace(CLIENT_TRACE)} == {f"chat {MODEL}", "admission", "upstream", "relay"}, \
        (receiver.spans, lines[-10:])


async def test_exemplars_link_the_duration_histogram_to_traces_in_openmetrics(receiver, start_gateway):
    gw = await start_gateway(tracing={"otlp_endpoint": receiver.url})
    async with aiohttp.ClientSession() as http:
        status, headers, _ = await chat(http, gw.url, "r-ex", body("a cat"))
    assert status == 200
    await gw.idle()  # observed after the answer
    metrics = gw.app[METRICS]
    exposition, content_type = metrics.exposition("application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text")
    buckets = [line for line in exposition.decode().splitlines()
               if line.startswith("gateway_request_duration_seconds_bucket") and "# {trace_id=" in line]
    await asyncio.to_thread(gw.app[TRACING].provider.force_flush)
    trace_id = buckets[0].split('trace_id="')[1][:32]
    assert len(buckets) == 1 and receiver.trace(trace_id)  # the exemplar's trace was exported
    assert "# {" not in metrics.exposition("text/plain")[0].decode()  # the Prometheus text format has none


async def test_without_tracing_nothing_is_exported_and_no_traceparent_is_sent(receiver, start_gateway, simulator):
    gw = await start_gateway()
    async with aiohttp.ClientSession() as http:
        assert (await chat(http, gw.url, "r-plain", body("a cat")))[0] == 200
    calls = (await simulator.stats())["requests"]
    assert [c["traceparent"] for c in calls] == [None]
    assert TRACING not in gw.app
    assert receiver.posts == 0 and receiver.spans == []


def test_without_tracing_opentelemetry_is_never_imported():
    """The app made and started (its resources opened) without ``tracing`` imports nothing of
    OpenTelemetry. (redis-py 8 itself imports OpenTelemetry's API and metrics SDK when they are
    installed, for its own optional metrics: that part is measured first and left out.)"""
    script = textwrap.dedent("""
        import asyncio, sys
        import redis, redis.asyncio

        def otel():
            return {m for m in sys.modules if m.split(".")[0] == "opentelemetry"}

        redis_own = otel()
        from aiohttp import web
        from gateway.config.loader import parse
        from gateway.http.app import create_app

        async def main():
            runner = web.AppRunner(create_app(parse({"upstream": {"timeout_s": 60}})))
            await runner.setup()
            await runner.cleanup()

        asyncio.run(main())
        print(sorted(otel() - redis_own), "gateway.observability.tracing" in sys.modules,
              any(m.startswith(("opentelemetry.sdk.trace", "opentelemetry.exporter")) for m in sys.modules))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO_ROOT, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[] False False"


def test_the_tracing_section_is_off_by_default_and_has_defaults():
    assert parse({"upstream": {"timeout_s": 60}}).tracing is None
    assert parse({"upstream": {"timeout_s": 60}, "tracing": {"otlp_endpoint": "http://tempo:4318"}}).tracing == \
        TracingConfig(otlp_endpoint="http://tempo:4318", sample_ratio=1.0, service_name="image-gateway")


@pytest.mark.parametrize("section, problem", [
    (None, "tracing.otlp_endpoint: is required"),
    ({"otlp_endpoint": "tempo:4318"}, "tracing.otlp_endpoint: must be an http:// or https:// URL"),
    ({"otlp_endpoint": "http://t", "sample_ratio": 1.5}, "tracing.sample_ratio: must be a number from 0 to 1"),
    ({"otlp_endpoint": "http://t", "sampler": 1}, "tracing.sampler: unknown key"),
])
def test_the_tracing_section_is_checked_with_key_paths(section, problem):
    with pytest.raises(ConfigError) as info:
        parse({"upstream": {"timeout_s": 60}, "tracing": section})
    assert info.value.problems[0].startswith(problem), info.value.problems


def test_every_log_line_of_a_request_names_it_in_both_formats(restore_logging):
    for fmt in ("json", "text"):
        out = io.StringIO()
        configure_logging(LoggingConfig(format=fmt), stream=out)
        rec = RequestRecord("req-7", "POST", "/v1/chat/completions")
        rec.trace_id = CLIENT_TRACE
        logging.getLogger("gateway.test").warning("outside any request")
        token = current_request.set(rec)
        try:
            logging.getLogger("gateway.test").warning("inside")
        finally:
            current_request.reset(token)
        outside, inside = out.getvalue().splitlines()
        assert "req-7" not in outside
        if fmt == "json":
            assert orjson.loads(inside) | {"time": None} == {
                "time": None, "level": "warning", "logger": "gateway.test", "message": "inside",
                "request_id": "req-7", "trace_id": CLIENT_TRACE}
        else:
            assert inside.endswith(f"warning gateway.test inside request_id=req-7 trace_id={CLIENT_TRACE}")
