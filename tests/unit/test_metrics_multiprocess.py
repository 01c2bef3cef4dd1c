"""Several workers: one scrape shows the sum over workers, and a worker restart loses nothing.

The scenario runs in a child Python (this test process must stay in single-process mode): it
imports the gateway first, as ``gateway serve`` does, then calls ``prepare_multiprocess``, starts
one forked and one spawned worker, restarts one, and prints two scrapes.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[2]

SCENARIO = textwrap.dedent('''
    import json, multiprocessing, sys
    from gateway.observability import metrics as gm  # prometheus_client is imported before the env var is set
    from gateway.http.record import RequestRecord
    from gateway.usage import Usage

    MODEL = "m1"

    def worker(team, requests, hold):
        m = gm.Metrics(model_ids=[MODEL])
        for _ in range(requests):
            rec = RequestRecord("r", "POST", "/v1/chat/completions", team=team, model=MODEL, status=200,
                                cache="miss", usage=Usage(prompt=10, completion=1200, image=1120, images_out=1,
                                                          cost_usd=0.25))
            rec.duration_s = 20.0
            m.observe_request(rec)
        m.rejection(team, "requests_per_minute")
        m.upstream_error("timeout")
        m.quota_remaining(team, "tokens_per_day", 1000 - requests)
        if hold:  # dies with a request in flight
            m.inflight(team).__enter__()
        else:
            with m.inflight(team):
                pass

    def start(method, *args):
        p = multiprocessing.get_context(method).Process(target=worker, args=args)
        p.start()
        return p

    if __name__ == "__main__":
        gm.prepare_multiprocess(sys.argv[1])
        a, b = start("fork", "a", 3, True), start("spawn", "b", 2, True)
        for p in (a, b):
            p.join()
            assert p.exitcode == 0
        exporter = gm.Metrics(model_ids=[MODEL])  # any worker serves /metrics
        first = exporter.exposition()[0].decode()
        gm.mark_worker_dead(a.pid)  # the supervisor restarts worker a
        a2 = start("fork", "a", 1, False)
        a2.join()
        print(json.dumps([first, exporter.exposition()[0].decode()]))
''')


def scenario(tmp_path: Path) -> list[dict]:
    script = tmp_path / "scenario.py"
    script.write_text(SCENARIO)
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    (metrics_dir / "counter_999999.db").write_bytes(b"left over from the last run")
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, str(script), str(metrics_dir)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return [_samples(body) for body in json.loads(out.stdout)]


def _samples(body: str) -> dict:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(body) for s in f.samples}


def tokens(team: str, kind: str) -> tuple:
    return ("gateway_tokens_total", (("model", "m1"), ("team", team), ("type", kind)))


def test_counters_add_up_across_workers_and_survive_a_restart(tmp_path):
    first, second = scenario(tmp_path)

    assert first[tokens("a", "image")] == 3 * 1120
    assert first[tokens("b", "image")] == 2 * 1120
    assert first[("gateway_cost_usd_total", (("model", "m1"), ("team", "a")))] == 0.75
    assert first[("gateway_upstream_errors_total", (("kind", "timeout"),))] == 2  # one per worker
    assert first[("gateway_inflight_requests", (("team", "a"),))] == 1
    assert first[("gateway_inflight_requests", (("team", "b"),))] == 1
    requests_a = ("gateway_requests_total",
                  (("cache", "miss"), ("model", "m1"), ("status", "200"), ("stream", "false"), ("team", "a")))
    assert first[requests_a] == 3
    count_a = ("gateway_request_duration_seconds_count", (("model", "m1"), ("stream", "false"), ("team", "a")))
    assert first[count_a] == 3

    # Worker a died and came back: its counts stay, its in-flight request is gone.
    assert second[tokens("a", "image")] == 4 * 1120
    assert second[requests_a] == 4 and second[count_a] == 4
    assert second[tokens("b", "image")] == 2 * 1120
    assert second[("gateway_upstream_errors_total", (("kind", "timeout"),))] == 3
    assert second[("gateway_ratelimit_rejections_total", (("limit", "requests_per_minute"), ("team", "a")))] == 2
    assert second[("gateway_inflight_requests", (("team", "a"),))] == 0
    assert second[("gateway_inflight_requests", (("team", "b"),))] == 1
    # The latest report wins, whichever worker made it; no pid label leaks out.
    assert second[("gateway_quota_remaining", (("quota", "tokens_per_day"), ("team", "a")))] == 999
    assert not any(dict(labels).get("pid") for _, labels in second)
