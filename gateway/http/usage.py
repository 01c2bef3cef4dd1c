"""What a team may call and what it has used: /v1/models, /v1/usage, and /admin/usage for all teams."""
from __future__ import annotations

import time

from aiohttp import web

from gateway.http.respond import json_response
from gateway.http.state import CLOCK, RECORD, SNAPSHOT, STORE
from gateway.limits.ledger import account_usage_report, team_usage_report


async def list_models(request: web.Request) -> web.Response:
    request[RECORD].team = request[SNAPSHOT].auth.team(request).name
    created = int(time.time())
    data = [
        {"id": name, "object": "model", "created": created, "owned_by": model.id.split("/", 1)[0] if "/" in model.id else "gateway"}
        for model in request[SNAPSHOT].config.models
        for name in (model.id, *model.aliases)
    ]
    return json_response({"object": "list", "data": data})


async def team_usage(request: web.Request) -> web.Response:
    team = request[SNAPSHOT].auth.team(request)
    request[RECORD].team = team.name
    return json_response(await team_usage_report(request.app[STORE], team, request.app[CLOCK]()))


async def admin_usage(request: web.Request) -> web.Response:
    request[SNAPSHOT].auth.admin(request)
    now = request.app[CLOCK]()
    config = request[SNAPSHOT].config
    teams = [await team_usage_report(request.app[STORE], team, now) for team in config.teams]
    report = {"object": "list", "data": teams}
    if config.account is not None:  # the shared upstream account: every team's usage, its limits and quotas
        report["account"] = await account_usage_report(request.app[STORE], config.account, now)
    return json_response(report)
