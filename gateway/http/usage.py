"""What a team may call and what it has used: /v1/models, /v1/usage, and /admin/usage for all teams."""
from __future__ import annotations

import time

from aiohttp import web

from gateway.http.respond import json_response
from gateway.http.state import AUTH, CLOCK, CONFIG, RECORD, STORE
from gateway.limits.ledger import team_usage_report


async def list_models(request: web.Request) -> web.Response:
    request[RECORD].team = request.app[AUTH].team(request).name
    created = int(time.time())
    data = [
        {"id": name, "object": "model", "created": created, "owned_by": model.id.split("/", 1)[0] if "/" in model.id else "gateway"}
        for model in request.app[CONFIG].models
        for name in (model.id, *model.aliases)
    ]
    return json_response({"object": "list", "data": data})


async def team_usage(request: web.Request) -> web.Response:
    team = request.app[AUTH].team(request)
    request[RECORD].team = team.name
    return json_response(await team_usage_report(request.app[STORE], team, request.app[CLOCK]()))


async def admin_usage(request: web.Request) -> web.Response:
    request.app[AUTH].admin(request)
    now = request.app[CLOCK]()
    teams = [await team_usage_report(request.app[STORE], team, now) for team in request.app[CONFIG].teams]
    return json_response({"object": "list", "data": teams})
