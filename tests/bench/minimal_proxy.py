"""A minimal pass-through aiohttp proxy: the reference for what any aiohttp proxy costs.

One shared ClientSession (keep-alive, no connection limit); the request body is read and
posted on; the response is streamed back with ``iter_any``. No auth, no validation, nothing.

    python -m tests.bench.minimal_proxy --upstream http://127.0.0.1:PORT [--port P]
"""
from __future__ import annotations

import argparse
import asyncio
import signal

import aiohttp
from aiohttp import web

from .upstream import raise_nofile, use_uvloop

SESSION = web.AppKey("session", aiohttp.ClientSession)
UPSTREAM = web.AppKey("upstream", str)


async def forward(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    headers = {"Content-Type": request.headers.get("Content-Type", "application/json"), "Authorization": "Bearer upstream-key"}
    async with request.app[SESSION].post(request.app[UPSTREAM] + request.path, data=body, headers=headers) as upstream:
        response = web.StreamResponse(status=upstream.status, headers={"Content-Type": upstream.headers.get("Content-Type", "application/json")})
        if upstream.content_length is not None:
            response.content_length = upstream.content_length
        await response.prepare(request)
        async for chunk in upstream.content.iter_any():
            await response.write(chunk)
        await response.write_eof()
        return response


def make_app(upstream: str) -> web.Application:
    app = web.Application(client_max_size=200 * 1024 * 1024)
    app[UPSTREAM] = upstream.rstrip("/")

    async def session(app: web.Application):
        app[SESSION] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=300), auto_decompress=False)
        yield
        await app[SESSION].close()

    app.cleanup_ctx.append(session)
    app.router.add_post("/{tail:.*}", forward)
    return app


async def serve(app: web.Application, name: str, host: str, port: int) -> None:
    """Serve ``app`` until SIGINT or SIGTERM; print "<name> listening on <url>" once it listens."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port, backlog=4096, reuse_address=True).start()
    print(f"{name} listening on http://{host}:{runner.addresses[0][1]}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="minimal aiohttp pass-through proxy (bench reference)")
    p.add_argument("--upstream", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    args = p.parse_args(argv)
    raise_nofile()
    use_uvloop()  # the same event loop the gateway uses when uvloop is installed
    asyncio.run(serve(make_app(args.upstream), "minimal proxy", args.host, args.port))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
