"""Raw HTTP where bytes and timing of bytes matter: streaming, big bodies, disconnects, retries."""
from __future__ import annotations

import asyncio
import base64
import logging
import os
import socket

import aiohttp
import orjson
import pytest

from gateway.http.state import IMAGE_STORAGE, RUNTIME
from gateway.images.deliver import Links
from gateway.images.links import LinkSigner
from tests.fixtures.gateway import wait_for
from tests.images import data_url, decode_data_url, image_bytes, open_image

MODEL = "google/gemini-3-pro-image-preview"


def body(prompt: str = "a lighthouse", **extra) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": prompt}], **extra}


def sse_events(raw: bytes) -> list[bytes]:
    return [e for e in raw.replace(b"\r\n", b"\n").split(b"\n\n") if e]


@pytest.fixture
async def gw(start_gateway):
    return await start_gateway()


@pytest.fixture
async def http():
    async with aiohttp.ClientSession() as session:
        yield session


async def test_first_event_arrives_while_the_upstream_still_holds_the_rest(gw, http, simulator):
    payload = body(stream=True, sim_fault="hold_ms=20000")
    async with http.post(gw.url + "/v1/chat/completions", json=payload, headers=gw.headers()) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        first = await resp.content.readany()
        assert first.startswith(b"data: ") or first.startswith(b":")
        stats = await simulator.stats()
        assert stats["completed"] == 0 and sum(stats["inflight"].values()) == 1  # still holding


async def test_30mb_single_event_stream_arrives_byte_identical(gw, http, simulator):
    payload = body("a huge image", stream=True, seed=7, sim_fault="image_mb=30")
    headers = {"Authorization": f"Bearer {simulator.api_key}"}
    async with http.post(simulator.url + "/v1/chat/completions", json=payload, headers=headers) as resp:
        direct = await resp.read()
    async with http.post(gw.url + "/v1/chat/completions", json=payload, headers=gw.headers()) as resp:
        assert resp.status == 200
        relayed = await resp.read()
    assert len(relayed) > 30 * 4 // 3 * 1024 * 1024
    strip = lambda raw: [orjson.loads(e[6:]) if e != b"data: [DONE]" else e for e in sse_events(raw) if e.startswith(b"data:")]
    # ids and timestamps differ per call; every other byte of every event must be the same
    for a, b in zip(strip(direct), strip(relayed), strict=True):
        if isinstance(a, dict):
            a.pop("id", None), b.pop("id", None), a.pop("created", None), b.pop("created", None)
        assert a == b
    image_events = [e for e in sse_events(relayed) if b'"images"' in e]
    assert len(image_events) == 1
    url = orjson.loads(image_events[0][6:])["choices"][0]["delta"]["images"][0]["image_url"]["url"]
    assert open_image(decode_data_url(url)).format == "JPEG"


async def test_byte_for_byte_relay_of_a_canned_stream(start_gateway, http):
    """An upstream whose exact bytes we know, sent in odd-sized pieces: the client gets them all."""
    from aiohttp import web

    image = base64.b64encode(image_bytes("JPEG", (16, 16)) + b"\0" * (31 * 1024 * 1024)).decode()
    events = [
        b": PROCESSING\n\n",
        b'data: {"id":"c1","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"role":"assistant","content":"Here"}}]}\n\n',
        b'data: {"id":"c1","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"images":[{"type":"image_url","index":0,"image_url":{"url":"data:image/jpeg;base64,'
        + image.encode() + b'"}}]}}]}\r\n\r\n',
        b'data: {"id":"c1","object":"chat.completion.chunk","choices":[{"index":0,"delta":{},"finish_reason":"stop"}],'
        b'"usage":{"prompt_tokens":3,"completion_tokens":1500,"total_tokens":1503,"completion_tokens_details":{"image_tokens":1120}}}\n\n',
        b"data: [DONE]\n\n",
    ]
    canned = b"".join(events)

    async def upstream(request):
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        step, i = 7, 0
        while i < len(canned):
            await resp.write(canned[i : i + step])
            i += step
            step = step * 3 if step < 1_000_000 else 65_537
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", upstream)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        gw = await start_gateway(upstream_url=f"http://127.0.0.1:{runner.addresses[0][1]}")
        async with http.post(gw.url + "/v1/chat/completions", json=body(stream=True), headers=gw.headers()) as resp:
            assert await resp.read() == canned
        await gw.idle()  # settled after the answer
        usage = await (await http.get(gw.url + "/v1/usage", headers=gw.headers())).json()
        assert usage["day"]["tokens"]["image"] == 1120
        assert usage["day"]["images_out"] == 1
    finally:
        await runner.cleanup()


async def test_60mb_request_with_14_images_passes(gw, http, simulator):
    png = image_bytes("PNG", (1150, 1000), noise=True)
    parts = [{"type": "text", "text": "combine all of these"}] + [
        {"type": "image_url", "image_url": {"url": data_url(png)}} for _ in range(14)
    ]
    raw = orjson.dumps({"model": MODEL, "messages": [{"role": "user", "content": parts}]})
    assert len(raw) > 60 * 1024 * 1024
    async with http.post(gw.url + "/v1/chat/completions", data=raw, headers=gw.headers(**{"Content-Type": "application/json"})) as resp:
        assert resp.status == 200, await resp.text()
        answer = await resp.json()
    assert answer["choices"][0]["message"]["images"]
    assert (await simulator.stats())["requests"][-1]["n_images"] == 14


async def test_101mb_request_is_refused_with_413_before_it_is_read(gw):
    """Send the headers and the first MiB only: the 413 comes back without the rest."""
    host, port = gw.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    size = 101 * 1024 * 1024
    writer.write(
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {gw.key()}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {size}\r\n\r\n".encode() + b"{" + b" " * (1024 * 1024)
    )
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
    assert head.startswith(b"HTTP/1.1 413")
    length = int([l for l in head.split(b"\r\n") if l.lower().startswith(b"content-length")][0].split(b":")[1])
    err = orjson.loads(await reader.readexactly(length))["error"]
    assert (err["type"], err["code"]) == ("invalid_request_error", "request_too_large")
    writer.close()


async def test_client_disconnect_cancels_the_upstream_request(gw, http, simulator):
    task = asyncio.create_task(http.post(gw.url + "/v1/chat/completions", json=body(sim_fault="latency_ms=30000"), headers=gw.headers()))
    await wait_for(lambda: _inflight(simulator))
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await wait_for(lambda: _cancelled(simulator))


async def _inflight(simulator) -> bool:
    return sum((await simulator.stats())["inflight"].values()) == 1


async def _cancelled(simulator) -> bool:
    return (await simulator.stats())["cancelled"] == 1


async def test_retries_happen_before_the_first_byte(gw, http, simulator):
    await simulator.script(["status=429", "status=503;retry_after=0", ""])
    async with http.post(gw.url + "/v1/chat/completions", json=body(), headers=gw.headers()) as resp:
        assert resp.status == 200
    assert (await simulator.stats())["calls"] == 3


async def test_no_retry_after_the_first_byte(gw, http, simulator):
    async with http.post(gw.url + "/v1/chat/completions", json=body(stream=True, sim_fault="cut_after=2"), headers=gw.headers()) as resp:
        assert resp.status == 200
        raw = await resp.read()
    last = sse_events(raw)[-1]
    assert last.startswith(b"data: ")
    assert orjson.loads(last[6:])["error"]["code"] == "upstream_unavailable"  # the connection broke
    assert (await simulator.stats())["calls"] == 1


@pytest.mark.parametrize(
    "fault, status, code",
    [
        ("reset", 502, "upstream_unavailable"),
        ("garbage", 502, "upstream_bad_response"),
        ("status=500", 500, None),  # the provider's own error passes through
        ("status=400", 400, None),
    ],
)
async def test_upstream_failures_map_to_clear_errors(start_gateway, http, simulator, fault, status, code):
    gw = await start_gateway(upstream={"max_retries": 0})
    async with http.post(gw.url + "/v1/chat/completions", json=body(sim_fault=fault), headers=gw.headers()) as resp:
        assert resp.status == status
        err = (await resp.json())["error"]
        assert resp.headers["x-request-id"]
    if code:
        assert err["code"] == code
    else:
        assert err["message"] and err["type"]


async def test_upstream_timeout_is_504(start_gateway, http):
    gw = await start_gateway(upstream={"timeout_s": 1, "max_retries": 0})
    async with http.post(gw.url + "/v1/chat/completions", json=body(sim_fault="latency_ms=5000"), headers=gw.headers()) as resp:
        assert resp.status == 504
        assert (await resp.json())["error"]["code"] == "upstream_timeout"


async def test_request_id_is_kept_or_made(gw, http):
    async with http.get(gw.url + "/v1/models", headers=gw.headers(**{"X-Request-ID": "abc-123"})) as resp:
        assert resp.headers["x-request-id"] == "abc-123"
    async with http.get(gw.url + "/healthz") as resp:
        assert len(resp.headers["x-request-id"]) == 32


@pytest.mark.parametrize(
    "headers, data, status, code",
    [
        ({}, b"{}", 401, "invalid_api_key"),
        ({"Authorization": "Bearer wrong"}, b"{}", 401, "invalid_api_key"),
        ({"Content-Type": "text/plain"}, b"hello", 415, "unsupported_media_type"),
        ({"Content-Type": "application/json"}, b'{"model": ', 400, "invalid_json"),
    ],
)
async def test_front_door_errors(gw, http, headers, data, status, code):
    if "Authorization" not in headers and status != 401:
        headers = {**headers, **gw.headers()}
    async with http.post(gw.url + "/v1/chat/completions", data=data, headers=headers) as resp:
        assert resp.status == status
        assert (await resp.json())["error"]["code"] == code


async def test_health_and_readiness(gw, http):
    async with http.get(gw.url + "/healthz") as resp:
        assert resp.status == 200
    async with http.get(gw.url + "/readyz") as resp:
        assert resp.status == 200 and (await resp.json())["status"] == "ok"


async def test_unknown_routes_and_methods_answer_in_the_provider_shape(gw, http):
    async with http.get(gw.url + "/v1/nothing") as resp:
        assert resp.status == 404
        assert (await resp.json())["error"]["code"] == "not_found"
    async with http.get(gw.url + "/v1/chat/completions", headers=gw.headers()) as resp:
        assert resp.status == 405
        assert (await resp.json())["error"]["code"] == "method_not_allowed"


async def test_a_client_leaving_mid_stream_is_a_quiet_499_not_an_upstream_error(gw, http, simulator, caplog):
    from prometheus_client.parser import text_string_to_metric_families

    resp = await http.post(gw.url + "/v1/chat/completions", json=body(stream=True, sim_fault="drip_ms=300"), headers=gw.headers())
    assert resp.status == 200
    await resp.content.readany()
    resp.close()  # the client goes away mid-stream
    await wait_for(lambda: _cancelled(simulator))  # the upstream call was cancelled too

    async def scraped():
        async with http.get(gw.url + "/metrics") as r:
            text = await r.text()
        return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in text_string_to_metric_families(text) for s in f.samples}

    async def recorded():
        return any(name == "gateway_requests_total" and dict(labels).get("status") == "499" for (name, labels) in await scraped())

    await wait_for(recorded)
    samples = await scraped()
    assert not any(n == "gateway_upstream_errors_total" and v for (n, _), v in samples.items())
    assert not [r for r in caplog.records if r.levelname == "ERROR"]


# -- the edge: raw bytes a client library would not send -----------------------------------------


async def raw_exchange(url: str, request: bytes, *, close_after: bool = True) -> tuple[int, dict[str, str], bytes]:
    """Send ``request`` on a fresh connection, read one whole response (Content-Length or
    chunked), and close at once, as curl does."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(request)
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        status = int(head[0].split(" ")[1])
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in head[1:] if line)}
        if headers.get("transfer-encoding") == "chunked":
            data = b""
            while size := int((await reader.readuntil(b"\r\n"))[:-2], 16):
                data += (await reader.readexactly(size + 2))[:-2]
            await reader.readexactly(2)  # the last chunk's CRLF: the response's last byte
        else:
            data = await reader.readexactly(int(headers.get("content-length", 0)))
        return status, headers, data
    finally:
        writer.close()


def raw_request(method: str, path: str, auth: bytes, body: bytes = b"", **headers: str) -> bytes:
    head = [f"{method} {path} HTTP/1.1".encode(), b"Host: gw", b"Authorization: " + auth,
            *[f"{k.replace('_', '-')}: {v}".encode() for k, v in headers.items()]]
    if body:
        head += [b"Content-Type: application/json", b"Content-Length: %d" % len(body)]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


@pytest.mark.parametrize("method, path", [("GET", "/v1/models"), ("GET", "/v1/usage"), ("POST", "/v1/chat/completions")])
@pytest.mark.parametrize("key", [b"Bearer \xff\xfe", b"Bearer key-alpha\xc3", b"Bearer \xe9t\xe9"], ids=["ff", "cut", "latin1"])
async def test_a_key_that_is_not_utf8_is_401_on_every_authenticated_route(gw, caplog, method, path, key):
    status, headers, data = await raw_exchange(gw.url, raw_request(method, path, key, orjson.dumps(body())))
    assert status == 401 and headers["content-type"].startswith("application/json")
    assert orjson.loads(data)["error"]["code"] == "invalid_api_key"
    assert not [r for r in caplog.records if r.levelname == "ERROR"]


async def test_a_key_that_is_not_utf8_is_refused_on_the_admin_route(gw):
    status, _, data = await raw_exchange(gw.url, raw_request("GET", "/admin/usage", b"Bearer \xff\xfe"))
    assert status == 403 and orjson.loads(data)["error"]["code"] == "forbidden"


async def test_malformed_http_is_answered_in_the_provider_shape_without_a_key_in_the_log(gw, caplog):
    caplog.set_level(logging.DEBUG)
    status, headers, data = await raw_exchange(gw.url, raw_request("GET", "/v1/models", b"Bearer key-alpha\x7f"))
    assert status == 400 and headers["content-type"].startswith("application/json")
    error = orjson.loads(data)["error"]
    assert error["type"] == "invalid_request_error" and "key-alpha" not in error["message"]
    logged = "\n".join(caplog.text.splitlines())
    assert "malformed HTTP request" in logged
    assert "key-alpha" not in logged and "Traceback" not in logged


# -- reads that stall ----------------------------------------------------------------------------


@pytest.fixture
async def impatient(start_gateway):
    return await start_gateway(server={"read_timeout_s": 0.2})


async def stalled(url: str, sent: bytes) -> bytes:
    """What the gateway sends, until it closes, to a client that sent ``sent`` and then nothing."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(sent)
        return await asyncio.wait_for(reader.read(), 30)  # a guard: without the timeout this hangs
    finally:
        writer.close()


async def test_a_client_that_stalls_mid_head_is_cut_off(impatient):
    assert await stalled(impatient.url, b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nAuthoriz") == b""


@pytest.mark.parametrize("framing", ["length", "chunked"])
async def test_a_client_that_stalls_mid_body_gets_408_and_is_cut_off(impatient, framing):
    payload = orjson.dumps(body())
    if framing == "length":
        sent = raw_request("POST", "/v1/chat/completions", b"Bearer key-alpha", payload)[:-10]
    else:
        sent = raw_request("POST", "/v1/chat/completions", b"Bearer key-alpha", Transfer_Encoding="chunked",
                           Content_Type="application/json") + b"%x\r\n%s" % (len(payload), payload[:10])
    answer = await stalled(impatient.url, sent)
    head, _, data = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 ")
    assert orjson.loads(data)["error"]["code"] == "request_timeout"


async def test_a_slow_but_steady_client_is_not_cut_off(impatient, simulator):
    """The timeout is between bytes, not for the whole request: each piece comes in time."""
    payload = orjson.dumps(body())
    host, port = impatient.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    request = raw_request("POST", "/v1/chat/completions", b"Bearer key-alpha", payload, Connection="close")
    for i in range(0, len(request), len(request) // 4 + 1):
        writer.write(request[i:i + len(request) // 4 + 1])
        await writer.drain()
        await asyncio.sleep(0.1)  # the pace of a slow client (half the timeout), not an ordering
    answer = await asyncio.wait_for(reader.read(), 30)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 200 ")


# -- a response delivered whole keeps its status ---------------------------------------------------


class SettleGate:
    """A store whose settles wait for ``gate``: the handler is still running (settling) when the
    client, which has every byte, closes."""

    def __init__(self, store) -> None:
        self._store = store
        self.gate = asyncio.Event()

    def __getattr__(self, name):
        return getattr(self._store, name)

    async def run_script(self, name, keys, args, **kw):
        if name == "settle":
            await self.gate.wait()
        return await self._store.run_script(name, keys, args, **kw)


@pytest.fixture
async def gated(start_gateway):
    from gateway import store as store_mod

    store = SettleGate(await store_mod.connect("memory://"))
    gw = await start_gateway(store_obj=store)
    yield gw, store
    store.gate.set()
    await store.close()


@pytest.mark.parametrize("stream, hit", [(False, False), (True, False), (False, True), (True, True)],
                         ids=["json", "stream", "hit", "hit-stream"])
async def test_a_response_read_whole_then_closed_at_once_keeps_its_status(gated, caplog, monkeypatch, stream, hit):
    from gateway.observability.accesslog import ACCESS_LOGGER

    monkeypatch.setattr(logging.getLogger(ACCESS_LOGGER), "propagate", True)
    caplog.set_level(logging.INFO)
    gw, store = gated
    payload = orjson.dumps(body(seed=7, stream=stream))
    if hit:  # store the entry first, settles flowing
        store.gate.set()
        status, headers, _ = await raw_exchange(gw.url, raw_request("POST", "/v1/chat/completions", b"Bearer key-alpha",
                                                                    payload, Connection="close"))
        assert status == 200 and headers["x-cache"] == "MISS"
        await wait_for(lambda: [r for r in caplog.records if r.name == ACCESS_LOGGER])
        store.gate.clear()
    status, headers, data = await raw_exchange(gw.url, raw_request("POST", "/v1/chat/completions", b"Bearer key-alpha",
                                                                   payload, X_Request_ID="whole-then-gone"))
    assert status == 200 and headers["x-cache"] == ("HIT" if hit else "MISS") and data
    # The gateway saw the client go while the request was still settling; then it may finish.
    await wait_for(lambda: all(conn.transport is None for conn in gw.runner.server.connections))
    store.gate.set()
    line = await wait_for(lambda: [r.access for r in caplog.records
                                   if r.name == ACCESS_LOGGER and r.access["request_id"] == "whole-then-gone"])
    assert line[0]["status"] == 200
    assert line[0]["bytes_out"] == len(data)
    # and what the answer left to do after its last byte was done: its entry is in the cache
    status, headers, _ = await raw_exchange(gw.url, raw_request("POST", "/v1/chat/completions", b"Bearer key-alpha",
                                                                payload, Connection="close"))
    assert status == 200 and headers["x-cache"] == "HIT"


async def test_an_answer_ended_after_its_status_line_is_cut_never_given_a_second_one(start_gateway):
    """An image download the shutdown timeout ends mid-body: the client sees the body cut short
    (the connection closed), never a 503 head written into it."""
    key = "a-signing-key-of-forty-characters-000000"
    gw = await start_gateway(images={"delivery": "url", "signing_key": key})
    image = os.urandom(32 << 20)  # more than any socket buffers hold: the download stays mid-body
    url = await Links(gw.app[IMAGE_STORAGE], LinkSigner(key), base_url=gw.url, ttl_s=600).link(image, "image/png")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a client that reads slowly
    sock.connect(("127.0.0.1", int(gw.url.rsplit(":", 1)[1])))
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(f"GET {url.split(gw.url, 1)[1]} HTTP/1.1\r\nHost: gw\r\n\r\n".encode())
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert gw.app[RUNTIME].stop() == 1  # what the shutdown timeout does: the download is ended

    received = bytearray()
    while chunk := await asyncio.wait_for(reader.read(1 << 20), 10):
        received += chunk
    writer.close()
    assert len(received) < len(image) and image.startswith(bytes(received))  # cut, and only image bytes
