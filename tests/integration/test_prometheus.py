"""deploy/prometheus and deploy/grafana against the real tools: promtool, and a Prometheus that
scrapes a Metrics exposition and answers every alert and dashboard expression."""
from __future__ import annotations

import itertools
import json
import re
import subprocess
from pathlib import Path

import yaml
from aiohttp import web

from gateway.observability.metrics import Metrics
from gateway.http.record import RequestRecord
from gateway.usage import Usage
from tests.fixtures.prometheus import require_binary

REPO = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = REPO / "deploy" / "prometheus"
DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "gateway.json"
MODEL = "google/gemini-3-pro-image-preview"
TEAMS = ("design", "research")
# Grafana's variables, as Grafana would fill them in for a query.
GRAFANA_VARS = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "5m", "$team": "|".join(TEAMS)}


def promtool(*args: str, cwd: Path | None = None, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([require_binary("promtool"), *args], cwd=cwd, input=stdin, capture_output=True,
                          text=True, timeout=60)


def record(team, *, status=200, cache="miss", stream=False, usage=None, duration=20.0, upstream=19.99):
    rec = RequestRecord("r", "POST", "/v1/chat/completions", team=team, model=MODEL, status=status, cache=cache,
                        stream=stream, usage=usage)
    rec.duration_s, rec.upstream_s = duration, upstream
    rec.ttfb_s = duration if status == 200 else None
    return rec


def populate(m: Metrics) -> None:
    """Known traffic: design 2 images (one streamed) and a cache hit, research 1 image, refusals."""
    image = Usage(prompt=100, completion=1300, image=1120, reasoning=180, images_in=1, images_out=1, cost_usd=0.15)
    m.observe_request(record("design", usage=image))
    m.observe_request(record("design", usage=image, stream=True))
    m.observe_request(record("design", cache="hit", usage=Usage(images_out=1), duration=0.05, upstream=0))
    m.cache_saved("design", image.total)
    m.observe_request(record("research", usage=image))
    m.observe_request(record(None, status=401, cache="none", duration=0.001, upstream=0))
    m.observe_request(record("research", status=502, duration=1.0, upstream=0.99))
    m.quota_remaining("design", "usd_per_month", 42.0)
    for quota, left in (("usd_per_month", 9000.0), ("usd_per_day", 400.0), ("tokens_per_day", 4_000_000)):
        m.account_quota_remaining(quota, left)


def traffic_per_scrape(m: Metrics, tick: int) -> None:
    """Keeps every other series moving, so rates are not all zero; tokens stay as populated."""
    for team in TEAMS:
        with m.inflight(team):
            m.observe_request(record(team, status=429, duration=0.002, upstream=0))
            m.rejection(team, "requests_per_minute")
            m.quota_remaining(team, "tokens_per_day", 100_000 - 500 * tick)
    m.upstream_done(MODEL, 200, 15.0)
    m.upstream_done(MODEL, "timeout", 300.0)
    m.upstream_error("timeout")
    m.store_error("script")


def exprs_in(node) -> list[str]:
    if isinstance(node, dict):
        found = [node["expr"]] if isinstance(node.get("expr"), str) else []
        return found + [e for v in node.values() for e in exprs_in(v)]
    if isinstance(node, list):
        return [e for v in node for e in exprs_in(v)]
    return []


def grafana_to_promql(expr: str) -> str:
    for var in sorted(GRAFANA_VARS, key=len, reverse=True):
        expr = expr.replace(var, GRAFANA_VARS[var])
    assert "$" not in expr, f"unknown Grafana variable in {expr!r}"
    return expr


def test_alert_rules_pass_promtool():
    out = promtool("check", "rules", "alerts.yml", cwd=PROMETHEUS_DIR)
    assert out.returncode == 0, out.stdout + out.stderr


def test_prometheus_config_passes_promtool():
    out = promtool("check", "config", "prometheus.yml", cwd=PROMETHEUS_DIR)  # rule_files are relative
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1 rule files found" in out.stdout


def test_exposition_passes_promtool_check_metrics():
    m = Metrics(model_ids=[MODEL])
    populate(m)
    traffic_per_scrape(m, 1)
    out = promtool("check", "metrics", stdin=m.exposition()[0].decode())
    assert out.returncode == 0 and not (out.stdout + out.stderr).strip(), out.stdout + out.stderr


async def test_prometheus_scrapes_and_every_expression_evaluates(prometheus_server, aiohttp_server):
    m = Metrics(model_ids=[MODEL])
    populate(m)
    ticks = itertools.count(1)

    async def metrics_route(request: web.Request) -> web.Response:
        traffic_per_scrape(m, next(ticks))
        body, content_type = m.exposition()
        return web.Response(body=body, headers={"Content-Type": content_type})

    app = web.Application()
    app.router.add_get("/metrics", metrics_route)
    target = await aiohttp_server(app)
    prom = await prometheus_server([f"127.0.0.1:{target.port}"], rule_files=[PROMETHEUS_DIR / "alerts.yml"])
    await prom.wait_scrapes(3)

    images = await prom.values('sum by (team) (gateway_tokens_total{type="image"})', "team")
    assert images == {"design": 2240.0, "research": 1120.0}  # the cache hit charged none
    assert await prom.values("sum by (team) (gateway_cache_saved_tokens_total)", "team") == {"design": 1400.0}

    dashboard = json.loads(DASHBOARD.read_text())
    panel_exprs = [grafana_to_promql(e) for e in exprs_in(dashboard["panels"])]
    assert len(panel_exprs) >= 15
    for expr in panel_exprs:
        assert await prom.query(expr), f"dashboard query returned no data: {expr}"

    rules = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())
    alert_exprs = [r["expr"] for g in rules["groups"] for r in g["rules"]]
    for expr in alert_exprs:
        await prom.query(expr)  # raises PromQLError on any error
    loaded = await prom.wait_for_rules()
    assert len(loaded) == len(alert_exprs)
    assert [r["name"] for r in loaded if r["health"] != "ok"] == []


def test_every_name_in_alerts_and_dashboard_is_a_contract_metric():
    from tests.unit.test_metrics import CONTRACT

    text = DASHBOARD.read_text() + (PROMETHEUS_DIR / "alerts.yml").read_text()
    names = {re.sub(r"_(bucket|count|sum)$", "", n) for n in re.findall(r"\bgateway_[a-z_]+", text)}
    assert names <= set(CONTRACT), names - set(CONTRACT)
    assert {"gateway_tokens_total", "gateway_cost_usd_total", "gateway_images_total",
            "gateway_ratelimit_rejections_total", "gateway_cache_saved_tokens_total",
            "gateway_time_to_first_byte_seconds", "gateway_overhead_seconds",
            "gateway_upstream_errors_total"} <= names


def test_dashboard_uses_the_datasource_variable_and_a_team_filter():
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["current"]["value"] == "prometheus"  # the provisioned uid
    assert variables["team"]["includeAll"] and variables["team"]["multi"]
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert all(p["datasource"]["uid"] == "${datasource}" and p["targets"] for p in panels)
    provisioning = yaml.safe_load((REPO / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())
    assert provisioning["datasources"][0]["uid"] == "prometheus"
    team_panels = [p for p in panels if all('team=~"$team"' in t["expr"] for t in p["targets"])]
    assert len(team_panels) >= 12
