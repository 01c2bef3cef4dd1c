"""The floor: the minimal proxy plus only the work every request of the gateway must do, done by
the gateway's own parts, with none of its request path around them.

One handler, no middleware, no error handling, no phases, no cache, no streaming: the key
looked up (``Authenticator``), the body validated (``validate``), admitted (``Limiter.admit``:
admit.lua through the pipelined ``RedisStore``), posted upstream on one shared ``ClientSession``,
the answer read, cleaned of the upstream key (``KeyGuard``) and parsed (``answer.loads``), its
usage priced, written back, settled (settle.lua), counted (``Metrics.observe_request``) and
logged (``write_access_log``). Its CPU per request against the minimal proxy's is the least any
gateway with these features can spend on this stack (aiohttp, redis-py, one Python process); the
gateway's against the floor's is what its request path costs on top (bench ``full``).

    python -m tests.bench.floor_proxy --config gateway.yaml [--port P]
"""
from __future__ import annotations

import argparse
import asyncio

import aiohttp
from aiohttp import web

from gateway import answer, config as config_mod
from gateway.config import Config
from gateway.http.auth import Authenticator
from gateway.http.record import RequestRecord, new_request_id
from gateway.limits.limiter import Limiter
from gateway.observability.accesslog import configure_logging, write_access_log
from gateway.observability.metrics import Metrics
from gateway.store import connect
from gateway.upstream.secrets import KeyGuard
from gateway.usage import Usage
from gateway.validate import validate

from .minimal_proxy import serve
from .upstream import raise_nofile, use_uvloop

PARTS = web.AppKey("parts", object)


class Parts:
    """What the handler uses, opened once."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.auth = Authenticator(config)
        self.guard = KeyGuard(config.upstream.api_key)
        self.metrics = Metrics(enabled=config.server.metrics, model_ids=[m.id for m in config.models],
                               teams=[t.name for t in config.teams])
        self.url = config.upstream.base_url.rstrip("/") + "/v1/chat/completions"
        self.headers = {"Authorization": f"Bearer {config.upstream.api_key}", "Content-Type": "application/json"}

    async def open(self) -> None:
        self.store = await connect(self.config.store.url)
        self.limiter = Limiter(self.store, self.config, on_error=self.config.store.on_error)
        self.limiter.start()
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), auto_decompress=False)

    async def close(self) -> None:
        await self.session.close()
        await self.limiter.close()
        await self.store.close()


async def forward(request: web.Request) -> web.StreamResponse:
    parts: Parts = request.app[PARTS]
    rec = RequestRecord(request_id=new_request_id(), method=request.method, path=request.path)
    team, rec.key_fingerprint = parts.auth.identify(request)
    rec.team = team.name
    raw = await request.read()
    chat = validate(raw, parts.config, team.limits)
    rec.model = chat.model.id
    admission = await parts.limiter.admit(team, chat)
    async with parts.session.post(parts.url, data=chat.raw, headers=parts.headers) as upstream:
        body = parts.guard.clean_whole(await upstream.read())  # the upstream key out of the answer
    parsed = answer.loads(body, image_data=False)
    usage = Usage.from_provider(parsed.usage, prices=chat.model.prices, images_out=parsed.images_out)
    response = web.Response(body=body, content_type="application/json", headers=admission.headers)
    await response.prepare(request)
    await response.write_eof()
    await admission.settle(usage)
    rec.usage, rec.status, rec.bytes_out = usage, response.status, len(body)
    rec.finish()
    parts.metrics.observe_request(rec)
    write_access_log(rec)
    return response


def make_app(config: Config) -> web.Application:
    app = web.Application(client_max_size=config.server.max_body_bytes)
    app[PARTS] = parts = Parts(config)

    async def opened(app: web.Application):
        await parts.open()
        yield
        await parts.close()

    app.cleanup_ctx.append(opened)
    app.router.add_post("/v1/chat/completions", forward)
    return app


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="the floor: the gateway's per-request work without its request path")
    p.add_argument("--config", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    args = p.parse_args(argv)
    raise_nofile()
    use_uvloop()
    config = config_mod.load(args.config)
    configure_logging(config.logging)
    asyncio.run(serve(make_app(config), "floor proxy", args.host, args.port))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
