"""A real Prometheus scraping a real gateway (in this test's loop, on a real port) that serves
real traffic to the simulator: the numbers Prometheus reports are the responses' own, every
dashboard and alert expression evaluates, and the dashboard's main panels show data.

tests/integration/test_prometheus.py checks the same files against a synthetic exposition;
this one closes the loop through the gateway itself. Its helpers are reused, not copied.
"""
from __future__ import annotations

import json
import math

import aiohttp
import orjson
import yaml

from tests.integration.test_prometheus import DASHBOARD, PROMETHEUS_DIR, TEAMS, exprs_in, grafana_to_promql

MODEL = "google/gemini-3-pro-image-preview"
IMAGE_TOKENS_BY_TEAM = 'sum by (team) (gateway_tokens_total{type="image"})'
# Panels that must show data after traffic, by a word of their title (each must match a panel).
MAIN_PANELS = ("requests per second", "tokens", "cost", "images", "request duration", "time to first byte")


def chat(prompt: str, **extra) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": prompt}], **extra}


def image_tokens(raw: bytes, stream: bool) -> int:
    """The image tokens the upstream reported in one response (JSON body or SSE stream)."""
    if not stream:
        usage = orjson.loads(raw)["usage"]
    else:
        chunks = [orjson.loads(e[6:]) for e in raw.split(b"\n\n") if e.startswith(b"data: {")]
        (usage,) = [c["usage"] for c in chunks if c.get("usage")]
    return usage["completion_tokens_details"]["image_tokens"]


async def test_prometheus_reads_the_gateways_numbers_and_every_panel_and_rule_evaluates(
        start_gateway, prometheus_server):
    design, research = TEAMS  # the teams test_prometheus' Grafana $team variable selects
    gw = await start_gateway(teams={design: {"quota": {"tokens_per_day": 10_000_000}}, research: {}},
                             account={"quota": {"tokens_per_day": 50_000_000, "usd_per_day": 500, "usd_per_month": 10_000}})
    port = gw.url.rsplit(":", 1)[1]
    prom = await prometheus_server([f"127.0.0.1:{port}"], rule_files=[PROMETHEUS_DIR / "alerts.yml"])
    expected = {design: 0, research: 0}

    async def send(http: aiohttp.ClientSession, team: str, body: dict, charged: bool = True) -> None:
        async with http.post(gw.url + "/v1/chat/completions", json=body, headers=gw.headers(team)) as resp:
            raw = await resp.read()
            assert resp.status == 200, raw[:300]
        await gw.idle()  # cached and counted after the answer: the next request hits
        if charged:
            expected[team] += image_tokens(raw, bool(body.get("stream")))

    async def prometheus_shows_expected() -> dict[str, float]:
        def ready(result: list) -> bool:
            return {r["metric"]["team"]: float(r["value"][1]) for r in result} == expected
        await prom.wait_for(IMAGE_TOKENS_BY_TEAM, ready)
        return await prom.values(IMAGE_TOKENS_BY_TEAM, "team")

    async with aiohttp.ClientSession() as http:
        # Two rounds, a scrape apart, so every rate() and histogram_quantile() sees an increase
        # (a series' first sample is no increase: the cache hits come in both rounds).
        await send(http, design, chat("a lighthouse, round one"))
        await send(http, research, chat("a glacier, seeded", seed=7))
        await send(http, research, chat("a glacier, seeded", seed=7), charged=False)  # a cache hit
        assert await prometheus_shows_expected() == expected
        await send(http, design, chat("a lighthouse, round two"))
        await send(http, design, chat("a lighthouse, streamed", stream=True, stream_options={"include_usage": True}))
        await send(http, research, chat("a glacier, round two"))
        await send(http, research, chat("a glacier, seeded", seed=7), charged=False)
    images = await prometheus_shows_expected()
    assert images == expected and all(v > 0 for v in images.values())
    assert expected[design] > expected[research] > 0  # design had one more image charged
    saved = await prom.values("sum by (team) (gateway_cache_saved_tokens_total)", "team")
    assert saved[research] > 0 and saved[design] == 0  # design's series is there, at 0

    # Every dashboard expression evaluates; the main panels return real (finite) numbers.
    dashboard = json.loads(DASHBOARD.read_text())
    panels = [p for p in dashboard["panels"] if p.get("targets")]
    for panel in panels:
        for expr in exprs_in(panel["targets"]):
            await prom.query(grafana_to_promql(expr))  # PromQLError on any error
    for word in MAIN_PANELS:
        chosen = [p for p in panels if word in p["title"].lower()]
        assert chosen, f"no dashboard panel titled with {word!r}"
        for panel in chosen:
            for expr in exprs_in(panel["targets"]):
                result = await prom.query(grafana_to_promql(expr))
                values = [float(r["value"][1]) for r in result]
                assert any(math.isfinite(v) for v in values), f"{panel['title']}: no data from {expr}: {result}"

    # Every alert expression evaluates, and Prometheus' own rule evaluation finds them healthy.
    rules = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())
    alert_exprs = [r["expr"] for g in rules["groups"] for r in g["rules"]]
    for expr in alert_exprs:
        await prom.query(expr)
    loaded = await prom.wait_for_rules()
    assert len(loaded) == len(alert_exprs)
    assert [(r["name"], r.get("lastError")) for r in loaded if r["health"] != "ok"] == []
