"""Probes and the metrics scrape: the routes operators' machines call (neither is metered)."""
from __future__ import annotations

from aiohttp import web

from gateway.http.respond import json_response
from gateway.http.state import METRICS, RUNTIME, SNAPSHOT, STORE

READY_TIMEOUT_S = 1.0


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready when the store answers within READY_TIMEOUT_S and the replica is not draining; else
    503 with the reason (a load balancer stops sending new work at once)."""
    if request.app[RUNTIME].draining:
        return json_response({"status": "draining"}, status=503)
    try:
        await request.app[STORE].ping(timeout_s=READY_TIMEOUT_S)
    except Exception as exc:  # any failure means not ready; the reason is what operators need
        reason = "store: " + (str(exc) or type(exc).__name__)
        return json_response({"status": "unavailable", "reason": reason}, status=503)
    return json_response({"status": "ok", "store": request[SNAPSHOT].config.store.url.split("://", 1)[0]})


async def metrics_exposition(request: web.Request) -> web.Response:
    body, content_type = request.app[METRICS].exposition(request.headers.get("Accept", ""))
    response = web.Response(body=body)
    response.headers["Content-Type"] = content_type
    return response
