"""``gateway usage`` as a user runs it: a separate process reading the ledger a gateway wrote to a
real redis-server, as JSON and as a table, and failing cleanly (exit 1, one message, no
traceback) on an unknown team, a bad period, the embedded store or a store that is down.

The expected numbers come from the responses the gateway relayed (their ``usage``) and the
configured prices; nothing about the simulator is hard-coded.
"""
from __future__ import annotations

import asyncio
import os
import sys
from datetime import datetime, timezone
from pathlib import Path

import aiohttp
import orjson
import pytest
import yaml

from tests.fixtures.redis import free_port
from tests.images import png_url

REPO_ROOT = Path(__file__).resolve().parents[2]
MODEL = "google/gemini-3-pro-image-preview"
PRICES = {"prompt": 2.0, "completion": 12.0, "image": 120.0}
COLUMNS = ["TEAM", "REQUESTS", "PROMPT", "COMPLETION", "IMAGE", "REASONING", "IMAGES_IN", "IMAGES_OUT",
           "COST_USD", "CACHE_HITS", "SAVED_TOKENS"]


async def usage_cli(config: dict, tmp_path: Path, *args: str) -> tuple[int, str, str]:
    """``python -m gateway usage --config <file> *args`` -> (exit code, stdout, stderr)."""
    path = tmp_path / f"usage-{os.urandom(4).hex()}.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "usage", "--config", str(path), *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=REPO_ROOT, env=env)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode, out.decode(), err.decode()


def expected(usages: list[dict], *, hits: list[dict] = ()) -> dict:
    """The ledger row of a team that was charged ``usages`` and served ``hits`` from the cache."""
    def image(u):
        return u["completion_tokens_details"]["image_tokens"]

    cost = sum(u["prompt_tokens"] * PRICES["prompt"] + image(u) * PRICES["image"]
               + (u["completion_tokens"] - image(u)) * PRICES["completion"] for u in usages) / 1_000_000
    return {
        "requests": len(usages) + len(hits),
        "tokens": {
            "prompt": sum(u["prompt_tokens"] for u in usages),
            "completion": sum(u["completion_tokens"] for u in usages),
            "image": sum(image(u) for u in usages),
            "reasoning": sum(u["completion_tokens_details"]["reasoning_tokens"] for u in usages),
            "audio": 0,
        },
        "images_out": len(usages) + len(hits),
        "cost_usd": cost,
        "cache_hits": len(hits),
        "cache_saved_tokens": sum(u["total_tokens"] for u in hits),
    }


def same(row: dict, want: dict, images_in: int) -> None:
    assert row["requests"] == want["requests"]
    assert row["tokens"] == want["tokens"]
    assert row["images_in"] == images_in and row["images_out"] == want["images_out"]
    assert row["cost_usd"] == pytest.approx(want["cost_usd"], abs=2e-6)
    assert row["cache_hits"] == want["cache_hits"] and row["cache_saved_tokens"] == want["cache_saved_tokens"]


@pytest.fixture
async def traffic(start_gateway, redis_server):
    """A gateway on the redis-server and some traffic: (config dict, {team: expected row}, images in)."""
    redis_server.start()
    redis_server.flush()
    teams = {"design": {"limits": {"requests_per_minute": 100}}, "research": {"quota": {"usd_per_month": 100}},
             "idle": {}}
    gw = await start_gateway(teams, store={"url": redis_server.url})

    async with aiohttp.ClientSession() as http:
        async def chat(team: str, payload: dict) -> tuple[dict, str]:
            async with http.post(gw.url + "/v1/chat/completions", json=payload, headers=gw.headers(team)) as resp:
                answer = await resp.json()
                assert resp.status == 200, answer
            await gw.idle()  # settled and cached after the answer: the next request and the report see it
            return answer["usage"], resp.headers.get("x-cache", "")

        plain = {"model": MODEL, "messages": [{"role": "user", "content": "a red kite over hills"}]}
        edit = {"model": MODEL, "messages": [{"role": "user", "content": [
            {"type": "text", "text": "make the sky green"},
            {"type": "image_url", "image_url": {"url": png_url()}}]}]}
        seeded = {"model": MODEL, "seed": 11, "messages": [{"role": "user", "content": "a paper boat"}]}
        design = [(await chat("design", plain))[0], (await chat("design", edit))[0]]
        first, label = await chat("research", seeded)
        assert label == "MISS"
        again, label = await chat("research", seeded)
        assert label == "HIT"
    want = {"design": expected(design), "research": expected([first], hits=[again]), "idle": expected([])}
    return gw.config, want, {"design": 1, "research": 0, "idle": 0}


async def test_json_report_matches_what_the_gateway_relayed(traffic, tmp_path):
    config, want, images_in = traffic
    today = datetime.now(timezone.utc)
    month_run, day_run, other_month = await asyncio.gather(
        usage_cli(config, tmp_path, "--json"),
        usage_cli(config, tmp_path, "--json", "--team", "research", "--day", today.date().isoformat()),
        usage_cli(config, tmp_path, "--json", "--month", "2000-01"),
    )

    code, out, err = month_run
    assert code == 0, err
    report = orjson.loads(out)
    assert report["period"] == "month" and report["month"] == today.strftime("%Y-%m")
    rows = {row["team"]: row for row in report["data"]}
    assert list(rows) == ["design", "research", "idle"]  # every team of the config, in its order
    for team, row in rows.items():
        same(row, want[team], images_in[team])
    assert report["total"]["requests"] == 4
    assert report["total"]["cost_usd"] == pytest.approx(want["design"]["cost_usd"] + want["research"]["cost_usd"], abs=2e-6)

    code, out, err = day_run
    assert code == 0, err
    report = orjson.loads(out)
    assert report["period"] == "day" and report["day"] == today.date().isoformat()
    assert [row["team"] for row in report["data"]] == ["research"]
    same(report["data"][0], want["research"], 0)

    code, out, err = other_month
    assert code == 0, err
    assert all(row["requests"] == 0 and row["cost_usd"] == 0 for row in orjson.loads(out)["data"])


async def test_table_lists_each_team_and_a_total(traffic, tmp_path):
    config, want, images_in = traffic
    code, out, err = await usage_cli(config, tmp_path)
    assert code == 0, err
    lines = [line.split() for line in out.splitlines() if line.strip()]
    header = next(i for i, cells in enumerate(lines) if cells[:1] == ["TEAM"])
    assert lines[header] == COLUMNS
    rows = {cells[0]: dict(zip(COLUMNS, cells)) for cells in lines[header + 2:]}
    assert list(rows) == ["design", "research", "idle", "TOTAL"]
    for team in ("design", "research", "idle"):
        w, row = want[team], rows[team]
        assert row["REQUESTS"] == str(w["requests"])
        assert [row[c] for c in ("PROMPT", "COMPLETION", "IMAGE", "REASONING")] == [
            str(w["tokens"][t]) for t in ("prompt", "completion", "image", "reasoning")]
        assert row["IMAGES_IN"] == str(images_in[team]) and row["IMAGES_OUT"] == str(w["images_out"])
        assert float(row["COST_USD"]) == pytest.approx(w["cost_usd"], abs=2e-6)
        assert row["CACHE_HITS"] == str(w["cache_hits"]) and row["SAVED_TOKENS"] == str(w["cache_saved_tokens"])
    assert rows["TOTAL"]["REQUESTS"] == "4"


async def test_clear_errors_and_exit_1(start_gateway, redis_server, tmp_path):
    redis_server.start()
    gw = await start_gateway({"design": {}}, store={"url": redis_server.url})
    on_redis = gw.config
    on_memory = {**on_redis, "store": {"url": "memory://", "on_error": "open"}}
    down_url = f"redis://:s3cret-pw@127.0.0.1:{free_port()}/0"  # nothing listens there
    down = {**on_redis, "store": {"url": down_url, "on_error": "open"}}

    unknown, bad_month, bad_day, memory, dead = await asyncio.gather(
        usage_cli(on_redis, tmp_path, "--team", "nobody"),
        usage_cli(on_redis, tmp_path, "--month", "2026-13"),
        usage_cli(on_redis, tmp_path, "--day", "yesterday"),
        usage_cli(on_memory, tmp_path),
        usage_cli(down, tmp_path, "--json"),
    )
    for code, out, err in (unknown, bad_month, bad_day, memory, dead):
        assert code == 1 and out == "", (code, out, err)
        assert "Traceback" not in err and err.startswith("gateway usage: ")
    assert "unknown team 'nobody'" in unknown[2] and "design" in unknown[2]
    assert "--month" in bad_month[2] and "YYYY-MM" in bad_month[2]
    assert "--day" in bad_day[2] and "YYYY-MM-DD" in bad_day[2]
    assert "memory://" in memory[2] and "GET /admin/usage" in memory[2]
    assert "unavailable" in dead[2] and "s3cret-pw" not in dead[2] and "127.0.0.1" in dead[2]
