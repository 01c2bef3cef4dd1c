"""/metrics after real traffic: a scripted set of requests through an in-process gateway to the
simulator, then the scrape parsed with prometheus_client's parser and compared, series by
series, with what the responses themselves reported (usage, images) and what the config says
(prices, limits). Nothing about the simulator's numbers is hard-coded.

The script (teams design, research and capped; one model with aliases):

    design    alias name, JSON                200 bypass         usage U1
    design    stream with usage, 1 image in   200 bypass stream  usage U2
    design    seed, 1 image in                200 miss           usage U3
    design    the same again                  200 hit            nothing charged, U3 saved
    design    unknown model                   400 (model label "other")
    research  JSON, 1 image in                200 bypass         usage U5
    research  stream cut after 1 event        200 bypass stream  the gateway's estimate
    research  upstream 503, no retries        503 bypass         nothing charged
    capped    3 requests at 2 per minute      200, 200, 429
    (none)    no key                          401

The same traffic's access log has one line per request, none with a key, prompt or base64; and
the session-wide log scan (tests/fixtures/logscan.py) is proved here: what it flags, what it
lets pass, and that it fails a whole pytest session (run in a subprocess) that leaked.
"""
from __future__ import annotations

import logging
import math
import re
import subprocess
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import aiohttp
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.observability.accesslog import ACCESS_LOGGER, AccessJsonFormatter
from tests.fixtures.logscan import find_leaks
from tests.fixtures.prometheus import require_binary
from tests.fixtures.simulator import API_KEY as UPSTREAM_KEY, REPO_ROOT as REPO
from tests.images import png_url
from tests.unit.test_metrics import CONTRACT

MODEL = "google/gemini-3-pro-image-preview"
ALIASES = ["gemini-3-pro-image-preview", "nano-banana-pro"]
PRICES = {"prompt": 2.0, "completion": 12.0, "image": 120.0}
TEAMS = {"design": {}, "research": {}, "capped": {"limits": {"requests_per_minute": 2}}}
TOKEN_TYPES = ("prompt", "completion", "image", "reasoning", "audio")
PROMPT_CHARS_PER_TOKEN, PROMPT_TOKENS_PER_INPUT_IMAGE = 4, 560  # the gateway's estimate (gateway/usage.py)
CUT_MAX_COMPLETION = 3000  # the cut-off request's max_completion_tokens: its estimated completion


# -- reading a scrape ----------------------------------------------------------------------------


def parse(text: str) -> list:
    return list(text_string_to_metric_families(text))


def samples(families: list, name: str, *labels: str) -> dict[tuple[str, ...], float]:
    """Samples named ``name`` keyed by the values of ``labels``, which must be exactly their labels."""
    out: dict[tuple[str, ...], float] = {}
    for family in families:
        for s in family.samples:
            if s.name == name:
                assert set(s.labels) == set(labels), f"{name} has labels {sorted(s.labels)}"
                out[tuple(s.labels[k] for k in labels)] = s.value
    return out


def nonzero(series: dict) -> dict:
    return {k: v for k, v in series.items() if v}


# -- what the responses said --------------------------------------------------------------------


def sse_payloads(raw: bytes) -> list:
    out = []
    for event in raw.replace(b"\r\n", b"\n").split(b"\n\n"):
        if event.startswith(b"data: ") and event != b"data: [DONE]":
            out.append(orjson.loads(event[6:]))
    return out


def images_in_answer(body: dict | list) -> int:
    """Images a JSON body (message.images) or a stream's chunks (delta.images) carried."""
    if isinstance(body, dict):
        return sum(len(c["message"].get("images") or []) for c in body["choices"])
    return sum(len(c.get("delta", {}).get("images") or []) for chunk in body for c in chunk.get("choices", []))


def usage_of(body: dict | list) -> dict:
    if isinstance(body, dict):
        return body["usage"]
    found = [chunk["usage"] for chunk in body if chunk.get("usage")]
    assert len(found) == 1, body
    return found[0]


def tokens(usage: dict) -> dict[str, int]:
    """The provider's usage by the contract's token types."""
    details = usage.get("completion_tokens_details") or {}
    return {
        "prompt": usage["prompt_tokens"],
        "completion": usage["completion_tokens"],
        "image": details.get("image_tokens") or 0,
        "reasoning": details.get("reasoning_tokens") or 0,
        "audio": details.get("audio_tokens") or 0,
    }


def cost(t: dict[str, int]) -> float:
    """CONTRACT.md: prompt x prompt price + image x image price + (completion - image) x completion price."""
    return (t["prompt"] * PRICES["prompt"] + t["image"] * PRICES["image"]
            + (t["completion"] - t["image"]) * PRICES["completion"]) / 1_000_000


def estimated_tokens(body: dict) -> dict[str, int]:
    """What the gateway charges when the provider never reported usage: ceil(text chars / 4) +
    560 per input image for the prompt, the request's max_completion_tokens for the completion,
    of which one image's worth (1120 at 1K) is image tokens."""
    chars = images = 0
    for message in body["messages"]:
        content = message["content"]
        if isinstance(content, str):
            chars += len(content)
            continue
        for part in content:
            if part["type"] == "text":
                chars += len(part["text"])
            else:
                images += 1
    prompt = math.ceil(chars / PROMPT_CHARS_PER_TOKEN) + PROMPT_TOKENS_PER_INPUT_IMAGE * images
    completion = body["max_completion_tokens"]
    return {"prompt": prompt, "completion": completion, "image": min(completion, 1120), "reasoning": 0, "audio": 0}


@dataclass
class Expected:
    requests: Counter = field(default_factory=Counter)  # (team, model, status, cache, stream)
    tokens: Counter = field(default_factory=Counter)  # (team, model, type)
    cost: defaultdict = field(default_factory=lambda: defaultdict(float))  # (team, model)
    images: Counter = field(default_factory=Counter)  # (team, model, direction)
    saved: Counter = field(default_factory=Counter)  # (team,)
    rejections: Counter = field(default_factory=Counter)  # (team, limit)
    upstream: Counter = field(default_factory=Counter)  # status of each upstream answer

    def request(self, team: str, status: int, cache: str, stream: bool = False, model: str = MODEL) -> None:
        self.requests[(team, model, str(status), cache, "true" if stream else "false")] += 1

    def spend(self, team: str, t: dict[str, int] | None, images_in: int, images_out: int) -> None:
        """A request that reached the upstream: its series exist (at 0 when nothing was charged)."""
        for kind in TOKEN_TYPES:
            self.tokens[(team, MODEL, kind)] += t[kind] if t else 0
        self.cost[(team, MODEL)] += cost(t) if t else 0.0
        self.images[(team, MODEL, "in")] += images_in
        self.images[(team, MODEL, "out")] += images_out


@dataclass
class Traffic:
    expected: Expected
    text: str  # the final scrape
    families: list
    ttfb_before_stream: float  # design's TTFB count just before / after its stream
    ttfb_after_stream: float


def chat(prompt: str, *, model: str = MODEL, image: str | None = None, **extra) -> dict:
    content = prompt if image is None else [{"type": "text", "text": prompt},
                                            {"type": "image_url", "image_url": {"url": image}}]
    return {"model": model, "messages": [{"role": "user", "content": content}], **extra}


async def run_traffic(start_gateway) -> Traffic:
    gw = await start_gateway(
        teams=TEAMS,
        models=[{"id": MODEL, "aliases": ALIASES, "upstream_id": MODEL, "prices_usd_per_million": PRICES}],
        upstream={"max_retries": 0},
        cache={"mode": "deterministic"},
    )
    exp = Expected()
    url = gw.url + "/v1/chat/completions"
    async with aiohttp.ClientSession() as http:

        async def post(team: str | None, body: dict, status: int = 200):
            headers = gw.headers(team) if team else {}
            async with http.post(url, json=body, headers=headers) as resp:
                raw = await resp.read()
                assert resp.status == status, raw[:500]
            await gw.idle()  # counted, cached and logged after the answer: the next step sees it all
            if body.get("stream") and status == 200:
                return sse_payloads(raw), resp.headers
            return orjson.loads(raw), resp.headers

        async def ttfb_count(team: str) -> float:
            async with http.get(gw.url + "/metrics") as resp:
                found = samples(parse(await resp.text()), "gateway_time_to_first_byte_seconds_count", "model", "team")
            return found.get((MODEL, team), 0.0)

        # design: an alias, a stream with usage, a cache miss and its hit, an unknown model
        body, _ = await post("design", chat("a red lighthouse at dusk", model=ALIASES[1]))
        exp.spend("design", tokens(usage_of(body)), 0, images_in_answer(body))
        exp.request("design", 200, "bypass")
        exp.upstream["200"] += 1

        before = await ttfb_count("design")
        chunks, _ = await post("design", chat("the same lighthouse, in snow", image=png_url(), stream=True,
                                               stream_options={"include_usage": True}))
        after = await ttfb_count("design")
        assert images_in_answer(chunks) == 1
        exp.spend("design", tokens(usage_of(chunks)), 1, 1)
        exp.request("design", 200, "bypass", stream=True)
        exp.upstream["200"] += 1

        seeded = chat("a blue door, watercolor", image=png_url((20, 90, 200)), seed=42)
        body, headers = await post("design", seeded)
        assert headers["x-cache"] == "MISS"
        miss = tokens(usage_of(body))
        exp.spend("design", miss, 1, images_in_answer(body))
        exp.request("design", 200, "miss")
        exp.upstream["200"] += 1
        body, headers = await post("design", seeded)
        assert headers["x-cache"] == "HIT"
        exp.spend("design", None, 1, images_in_answer(body))  # images crossed the gateway; no tokens charged
        exp.saved[("design",)] += miss["prompt"] + miss["completion"]
        exp.request("design", 200, "hit")

        body, _ = await post("design", chat("a cat", model="dall-e-3"), 400)
        assert body["error"]["code"] == "unknown_model"
        exp.request("design", 400, "none", model="other")

        # research: an input image, a stream cut before any usage, an upstream 503
        body, _ = await post("research", chat("make it night", image=png_url((250, 250, 0))))
        exp.spend("research", tokens(usage_of(body)), 1, images_in_answer(body))
        exp.request("research", 200, "bypass")
        exp.upstream["200"] += 1

        cut = chat("a storm over the sea, oil painting", stream=True, stream_options={"include_usage": True},
                   max_completion_tokens=CUT_MAX_COMPLETION, sim_fault="cut_after=1")
        chunks, _ = await post("research", cut)
        assert "error" in chunks[-1] and not any(c.get("usage") for c in chunks), chunks
        exp.spend("research", estimated_tokens(cut), 0, images_in_answer(chunks))
        exp.request("research", 200, "bypass", stream=True)
        exp.upstream["200"] += 1

        body, _ = await post("research", chat("anything", sim_fault="status=503"), 503)
        exp.spend("research", None, 0, 0)
        exp.request("research", 503, "bypass")
        exp.upstream["503"] += 1

        # capped: two admitted, the third refused by requests_per_minute
        for i in range(2):
            body, _ = await post("capped", chat(f"icon number {i}"))
            exp.spend("capped", tokens(usage_of(body)), 0, images_in_answer(body))
            exp.request("capped", 200, "bypass")
            exp.upstream["200"] += 1
        body, headers = await post("capped", chat("icon number 2"), 429)
        assert body["error"]["code"] == "rate_limit_exceeded" and "retry-after" in headers
        exp.request("capped", 429, "bypass")
        exp.rejections[("capped", "requests_per_minute")] += 1

        await post(None, chat("who am I"), 401)
        exp.request("none", 401, "none", model="other")

        async with http.get(gw.url + "/metrics") as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/plain")
            text = await resp.text()
    return Traffic(exp, text, parse(text), before, after)


@pytest.fixture
async def traffic(start_gateway) -> Traffic:
    return await run_traffic(start_gateway)


# -- the tests -----------------------------------------------------------------------------------


async def test_tokens_by_type_cost_and_images_are_exact_per_team(traffic):
    exp, fam = traffic.expected, traffic.families
    got_tokens = samples(fam, "gateway_tokens_total", "team", "model", "type")
    assert got_tokens == dict(exp.tokens)
    # cut-off stream: charged exactly the estimate (no image tokens: nothing itemized them)
    assert got_tokens[("research", MODEL, "completion")] > CUT_MAX_COMPLETION
    got_cost = samples(fam, "gateway_cost_usd_total", "team", "model")
    assert got_cost.keys() == exp.cost.keys()
    for key, value in exp.cost.items():
        assert got_cost[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
    assert samples(fam, "gateway_images_total", "team", "model", "direction") == dict(exp.images)
    assert exp.images[("design", MODEL, "in")] == 3 and exp.images[("design", MODEL, "out")] == 4


async def test_requests_rejections_and_cache_savings_are_exact(traffic):
    exp, fam = traffic.expected, traffic.families
    assert samples(fam, "gateway_requests_total", "team", "model", "status", "cache", "stream") == dict(exp.requests)
    rejections = samples(fam, "gateway_ratelimit_rejections_total", "team", "limit")
    assert nonzero(rejections) == dict(exp.rejections)
    assert len(rejections) == 5 * 3  # every team's series exist from the start, at 0
    assert exp.rejections == {("capped", "requests_per_minute"): 1}
    saved = samples(fam, "gateway_cache_saved_tokens_total", "team")
    assert nonzero(saved) == dict(exp.saved) and saved[("design",)] > 0 and len(saved) == 3
    # no series carries an alias, a key or any model but the configured one and "other"
    models = {s.labels["model"] for f in fam for s in f.samples if "model" in s.labels}
    assert models == {MODEL, "other"}
    teams = {s.labels["team"] for f in fam for s in f.samples if "team" in s.labels}
    assert teams == {"design", "research", "capped", "none"}


async def test_upstream_errors_durations_and_inflight(traffic):
    exp, fam = traffic.expected, traffic.families
    errors = samples(fam, "gateway_upstream_errors_total", "kind")
    assert nonzero(errors) == {("status_5xx",): 1.0, ("disconnect",): 1.0}  # the 503, the cut stream
    assert set(errors) == {(k,) for k in ("connect", "timeout", "status_5xx", "status_429", "bad_response",
                                          "disconnect")}
    upstream = samples(fam, "gateway_upstream_duration_seconds_count", "model", "status")
    assert upstream == {(MODEL, status): n for status, n in exp.upstream.items()}

    total = sum(exp.requests.values())
    (overhead,) = samples(fam, "gateway_overhead_seconds_count").values()
    assert overhead == total  # every request, refusals included
    (overhead_sum,) = samples(fam, "gateway_overhead_seconds_sum").values()
    assert overhead_sum > 0
    durations = samples(fam, "gateway_request_duration_seconds_count", "model", "stream", "team")
    expected_durations: Counter = Counter()
    for (team, model, _status, _cache, stream), n in exp.requests.items():
        expected_durations[(model, stream, team)] += n
    assert durations == dict(expected_durations)

    # the stream's first byte was observed (one TTFB observation for design's stream)
    assert traffic.ttfb_after_stream == traffic.ttfb_before_stream + 1
    ttfb = samples(fam, "gateway_time_to_first_byte_seconds_count", "model", "team")
    assert ttfb[(MODEL, "research")] >= 2  # its JSON answer and its (cut) stream

    inflight = samples(fam, "gateway_inflight_requests", "team")
    assert {"design", "research", "capped"} <= {t for (t,) in inflight}
    assert set(inflight.values()) == {0.0}


async def test_every_series_has_exactly_the_contract_labels(traffic):
    seen = set()
    for family in traffic.families:
        for s in family.samples:
            for suffix in ("_bucket", "_count", "_sum", ""):
                base = s.name[: len(s.name) - len(suffix)] if suffix else s.name
                if suffix and not s.name.endswith(suffix) or base not in CONTRACT:
                    continue
                labels = set(s.labels) - ({"le"} if suffix == "_bucket" else set())
                assert labels == CONTRACT[base][1], (s.name, s.labels)
                seen.add(base)
                break
            else:
                raise AssertionError(f"series outside the contract: {s.name}")
    assert {"gateway_requests_total", "gateway_tokens_total", "gateway_cost_usd_total", "gateway_images_total",
            "gateway_ratelimit_rejections_total", "gateway_cache_saved_tokens_total", "gateway_inflight_requests",
            "gateway_upstream_errors_total", "gateway_overhead_seconds"} <= seen


async def test_promtool_check_metrics_accepts_the_real_exposition(traffic):
    out = subprocess.run([require_binary("promtool"), "check", "metrics"], input=traffic.text,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and not (out.stdout + out.stderr).strip(), out.stdout + out.stderr


# -- the access log of the same traffic, and the session-wide log scan ---------------------------


async def test_the_access_log_has_one_clean_line_per_request_matching_the_metrics(start_gateway, caplog,
                                                                                   monkeypatch):
    monkeypatch.setattr(logging.getLogger(ACCESS_LOGGER), "propagate", True)  # to caplog, whatever ran before
    caplog.set_level(logging.INFO)
    traffic = await run_traffic(start_gateway)
    records = [r for r in caplog.records if r.name == ACCESS_LOGGER]
    assert len(records) == sum(traffic.expected.requests.values())
    lines = [AccessJsonFormatter().format(r) for r in records]
    assert [line for line in lines if find_leaks(line)] == []  # every request carried a key, most a prompt
    assert not any(word in line for line in lines for word in ("lighthouse", "watercolor", "storm"))
    # tokens and cost in the lines add up to what the counters hold (a cache hit's line charges nothing)
    for team in ("design", "research", "capped"):
        for kind in TOKEN_TYPES:
            logged = sum(r.access[f"{kind}_tokens"] for r in records if r.access["team"] == team)
            assert logged == traffic.expected.tokens[(team, MODEL, kind)], (team, kind)
        logged_cost = sum(r.access["cost_usd"] for r in records if r.access["team"] == team)
        assert logged_cost == pytest.approx(traffic.expected.cost[(team, MODEL)], abs=1e-5)


@pytest.mark.parametrize("line, leaks", [
    ('{"message":"forwarding with Bearer abc"}', ["bearer token"]),
    ("team key-design refused", ["team key"]),
    ('{"request_id":"key-research.v2"}', ["team key"]),
    (f"calling upstream with {UPSTREAM_KEY}", ["upstream key"]),
    ("new key gw-design-" + "Ab3_-x" * 7 + "Q issued", ["issued key"]),
    ('{"url":"data:image/png;base64,iVBORw0KGgo"}', ["data URL"]),
    ("payload " + "iVBORw0KGgoAAAANSUhEUgAA/+" * 8, ["base64 run"]),
    # what aiohttp's parser error used to log (and answer) for a key it refused: whole, or its start
    ("    b'Authorization: Bearer key-design\\x7f'", ["team key", "bearer token"]),
    ("Got more than 8190 bytes when reading: b'key-des...'.", ["team key"]),
], ids=["bearer", "team-key", "team-key-in-json", "upstream-key", "issued-key", "data-url", "base64-run",
        "aiohttp-parser-error", "part-of-a-key"])
def test_logscan_finds_every_kind_of_leak(line, leaks):
    assert find_leaks(line) == leaks


async def test_every_authenticated_route_is_labelled_with_its_team_and_counts_its_bytes(start_gateway, caplog,
                                                                                        monkeypatch):
    monkeypatch.setattr(logging.getLogger(ACCESS_LOGGER), "propagate", True)
    caplog.set_level(logging.INFO)
    gw = await start_gateway(teams={"design": {}})
    sizes = {}
    async with aiohttp.ClientSession() as http:
        for method, path, body in (("GET", "/v1/models", None), ("GET", "/v1/usage", None),
                                   ("POST", "/v1/chat/completions", chat("a lighthouse"))):
            async with http.request(method, gw.url + path, json=body, headers=gw.headers("design")) as resp:
                assert resp.status == 200
                sizes[path] = len(await resp.read())
        await gw.idle()  # counted and logged after the answer
        async with http.get(gw.url + "/metrics") as resp:
            requests = samples(parse(await resp.text()), "gateway_requests_total",
                               "team", "model", "status", "cache", "stream")
    lines = {r.access["path"]: r.access for r in caplog.records if r.name == ACCESS_LOGGER}
    assert {path: (line["team"], line["bytes_out"]) for path, line in lines.items()} == {
        path: ("design", size) for path, size in sizes.items()}
    assert sum(v for (team, *_), v in requests.items() if team == "design") == 3
    assert not nonzero({k: v for k, v in requests.items() if k[0] == "none"})


@pytest.mark.parametrize("line", [
    '{"time":"2026-01-31T12:00:00.123Z","request_id":"3f1c9a","team":"design","status":200,"cost_usd":0.15}',
    "WARNING gateway.http.chat upstream reported no usage; charging the estimate",
    "cache key gw:cache:{" + "a" * 64 + "} stored; sha256:" + "0" * 64,
    "the monkey-patched key is fine, and so is gw-design-short",
    "x " + "A" * 199 + " y",  # one short of a base64 run
    'INFO aiohttp.access 127.0.0.1 "POST /v1/chat/completions HTTP/1.1" 401 "-" "Bearer-less client"',
], ids=["access-line", "warning", "hashes", "near-misses", "199-base64-chars", "aiohttp-access"])
def test_logscan_passes_clean_lines(line):
    assert find_leaks(line) == []


INNER_TESTS = '''
import io, logging
from gateway.observability.accesslog import configure_logging, write_access_log
from gateway.config import LoggingConfig
from gateway.http.record import RequestRecord
from tests.fixtures.logscan import watch_file

def test_a_log_line(tmp_path):
    logging.getLogger("gateway.upstream.client").warning("retrying with Authorization: Bearer %s", "sk-0")

def test_an_access_line_of_a_non_propagating_logger():
    configure_logging(LoggingConfig(level="info"), stream=io.StringIO())
    write_access_log(RequestRecord("key-alpha", "POST", "/v1/chat/completions"))

def test_a_spawned_gateways_log_file(tmp_path):
    path = tmp_path / "gw0.log"
    path.write_text('{"level":"info","message":"ok"}\\n{"message":"image data:image/png;base64,AAAA"}\\n')
    watch_file(path)

def test_clean(tmp_path):
    logging.getLogger("gateway.http.chat").warning("upstream reported no usage; charging the estimate")
    path = tmp_path / "gw1.log"
    path.write_text('{"level":"info","message":"gateway listening"}\\n')
    watch_file(path)
'''


def test_the_logscan_plugin_fails_a_session_that_leaked_and_only_that(pytester, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(REPO))  # pytester adds its own directory in front
    pytester.makepyfile(test_inner=INNER_TESTS)
    args = ("-p", "tests.fixtures.logscan", "-p", "no:cacheprovider", "-v")
    leaked = pytester.runpytest_subprocess(*args)
    assert leaked.ret == 1, leaked.stdout.str()
    leaked.assert_outcomes(passed=4)  # every test passed; the log scan failed the session
    report = leaked.stdout.str()
    assert "3 log line(s) hold a key" in report
    assert re.search(r"\[bearer token\] logger gateway.upstream.client \(during test_inner.py::test_a_log_line\)", report)
    assert re.search(r"\[team key\] logger gateway.access \(during .*non_propagating_logger\)", report)
    assert re.search(r"\[data URL\] \S*gw0.log:2 \(during .*spawned_gateways_log_file\)", report)
    assert "gw1.log" not in report and "charging the estimate" not in report

    clean = pytester.runpytest_subprocess(*args, "-k", "clean")
    assert clean.ret == 0, clean.stdout.str()
    assert "none leaks" in clean.stdout.str()
