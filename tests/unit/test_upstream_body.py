"""gateway.upstream.body: a big body sent in slices is the same request on the wire, and can be sent again."""
from __future__ import annotations

import os

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.upstream.body import SLICE, SlicedBody


async def test_a_sliced_body_arrives_whole_with_its_length_and_can_be_resent():
    seen = []

    async def echo(request: web.Request) -> web.Response:
        seen.append((request.headers.get("Content-Length"), request.headers.get("Transfer-Encoding"),
                     await request.read()))
        return web.Response(text="ok")

    app = web.Application(client_max_size=64 * SLICE)
    app.router.add_post("/", echo)
    body = bytearray(os.urandom(3 * SLICE + 123))
    async with TestServer(app) as server, aiohttp.ClientSession() as session:
        payload = SlicedBody(body)
        for _ in range(2):  # a retry sends the same payload again
            async with session.post(server.make_url("/"), data=payload) as resp:
                assert resp.status == 200
    assert seen == [(str(len(body)), None, bytes(body))] * 2


async def test_a_sliced_response_body_arrives_whole():
    body = os.urandom(2 * SLICE + 7)

    async def answer(request: web.Request) -> web.Response:
        return web.Response(body=SlicedBody(body), content_type="application/json")

    app = web.Application()
    app.router.add_get("/", answer)
    async with TestServer(app) as server, aiohttp.ClientSession() as session, session.get(server.make_url("/")) as resp:
        assert (resp.headers["Content-Length"], resp.content_type) == (str(len(body)), "application/json")
        assert await resp.read() == body
