"""A 404 names every route the gateway serves: the README's HTTP table, all of it."""
from __future__ import annotations

import re
from pathlib import Path

import aiohttp

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_routes() -> list[str]:
    """``METHOD /path`` of every row of the README's HTTP table, up to its first parameter."""
    rows = re.findall(r"^\| `(GET|POST) (/[^`{?]*)", README.read_text(), flags=re.M)
    return [f"{method} {path}" for method, path in rows]


async def test_a_404_names_every_route_in_the_readme(start_gateway):
    gw = await start_gateway()
    async with aiohttp.ClientSession() as http, http.get(gw.url + "/v1/nothing") as resp:
        assert resp.status == 404
        message = (await resp.json())["error"]["message"]
    routes = readme_routes()
    assert len(routes) >= 10
    for route in routes:
        assert route in message, route
