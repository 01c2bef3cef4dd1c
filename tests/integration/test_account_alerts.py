"""The account's alerts in deploy/prometheus/alerts.yml, run by ``promtool test rules`` on
series of ``gateway_account_quota_remaining``: they fire when the budget falls below 10% of
what it was, or a quota is spent, and not before."""
from __future__ import annotations

import yaml

from tests.integration.test_prometheus import PROMETHEUS_DIR, promtool

MONTHLY = 'gateway_account_quota_remaining{quota="usd_per_month"}'
DAILY = 'gateway_account_quota_remaining{quota="usd_per_day"}'


def alert(name: str, at: str, *expected: dict) -> dict:
    return {"eval_time": at, "alertname": name, "exp_alerts": list(expected)}


def test_account_alerts_fire_below_10_percent_and_when_spent(tmp_path):
    tests = {
        "rule_files": [str(PROMETHEUS_DIR / "alerts.yml")],
        "evaluation_interval": "1m",
        "tests": [{
            "interval": "1m",
            # $10,000 spent at $100 a minute down to $900 (9%), where it stays; the daily one is spent
            "input_series": [{"series": MONTHLY, "values": "10000-100x91 900x40"},
                             {"series": DAILY, "values": "300-100x3 0x20"}],
            "alert_rule_test": [
                alert("GatewayAccountMonthlyBudgetLow", "80m"),  # $2,000 left: 20%
                alert("GatewayAccountMonthlyBudgetLow", "100m"),  # below 10%, not yet for 15 minutes
                alert("GatewayAccountMonthlyBudgetLow", "120m", {
                    "exp_labels": {"severity": "warning", "quota": "usd_per_month"},
                    "exp_annotations": {
                        "summary": "The upstream account has less than 10% of its monthly budget left",
                        "description": "900 USD left for all teams together until the 1st (UTC)."}}),
                alert("GatewayAccountQuotaSpent", "4m"),
                alert("GatewayAccountQuotaSpent", "15m", {
                    "exp_labels": {"severity": "critical", "quota": "usd_per_day"},
                    "exp_annotations": {
                        "summary": "The upstream account has spent its usd_per_day quota",
                        "description": "Every team's requests are refused with 429 insufficient_quota until "
                                       "the quota resets."}}),
            ],
        }],
    }
    path = tmp_path / "account_alerts_test.yml"
    path.write_text(yaml.safe_dump(tests, sort_keys=False))
    out = promtool("test", "rules", str(path))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout
