"""Answers rewritten with image links: each data URL stored once and replaced in place, the
rest of the bytes untouched (the embedded store; real backends in tests/integration)."""
from __future__ import annotations

import base64
from urllib.parse import parse_qs, urlsplit

import orjson
import pytest

from gateway import answer
from gateway.images.deliver import Links, rewrite_body, rewrite_event
from gateway.images.links import FILES_PATH, LinkSigner
from gateway.images.storage import StoreImages
from gateway.store import connect
from tests.images import data_url, image_bytes

KEY = "s" * 40
BASE = "https://gw.example"


@pytest.fixture
async def store():
    s = await connect("memory://")
    yield s
    await s.close()


@pytest.fixture
def links(store) -> Links:
    return Links(StoreImages(store), LinkSigner(KEY), base_url=BASE, ttl_s=600)


async def fetch(links: Links, url: str) -> bytes:
    """What the link serves: checked as the route checks it, read as the route reads it."""
    u = urlsplit(url)
    assert f"{u.scheme}://{u.netloc}" == BASE and u.path.startswith(FILES_PATH)
    name, q = u.path.removeprefix(FILES_PATH), parse_qs(u.query)
    assert 0 < links.signer.check(name, q["expires"][0], q["signature"][0]) <= 600
    image = await links.storage.stat(name)
    return b"".join([piece async for piece in links.storage.read(image, 0, image.size)])


def body_with(*images: list[str], text: str = "here you go") -> bytes:
    return orjson.dumps({
        "id": "gen-1", "object": "chat.completion", "model": "m", "created": 1,
        "choices": [{"index": i, "finish_reason": "stop", "message": {
            "role": "assistant", "content": text,
            "images": [{"type": "image_url", "image_url": {"url": u}} for u in urls]}}
            for i, urls in enumerate(images)],
        "usage": {"prompt_tokens": 5, "completion_tokens": 1290, "total_tokens": 1295}})


def urls_of(body: bytes, field: str = "message") -> list[str]:
    return [p["image_url"]["url"] for c in orjson.loads(body)["choices"] for p in c[field].get("images", [])]


async def test_a_body_gets_links_in_place_and_keeps_every_other_byte(links, store):
    red, blue = image_bytes("PNG", color=(255, 0, 0)), image_bytes("JPEG", color=(0, 0, 255))
    body = body_with([data_url(red), data_url(blue, "image/jpeg")], [data_url(red)])
    out = await rewrite_body(body, answer.loads(body), links)
    got = urls_of(out)
    assert [await fetch(links, u) for u in got] == [red, blue, red]
    assert urlsplit(got[1]).path.endswith(".jpg")
    assert got[0].split("?")[0] == got[2].split("?")[0]  # the same image: one name, stored once
    assert len(await store.client.keys("gw:img:*")) == 2
    restored = out
    for new, old in zip(got, [data_url(red), data_url(blue, "image/jpeg"), data_url(red)]):
        restored = restored.replace(new.encode(), old.encode(), 1)
    assert restored == body  # nothing else changed, byte for byte
    assert len(out) < 1500


async def test_a_big_image_is_decoded_off_the_loop_and_linked(links):
    big = image_bytes("PNG", size=(1024, 768), noise=True)  # ~2.3 MB: over the offload threshold
    assert len(big) > 1 << 20
    body = body_with([data_url(big)])
    out = await rewrite_body(body, answer.loads(body), links)
    assert await fetch(links, urls_of(out)[0]) == big


async def test_urls_spelled_with_json_escapes_are_still_replaced(links):
    png = image_bytes("PNG", size=(300, 200), noise=True)
    url = data_url(png)
    assert "/" in url
    body = body_with([url]).replace(b"/", b"\\/")  # valid JSON, same strings
    assert answer.loads(body).choices[0].images[0]["image_url"]["url"] == url
    out = await rewrite_body(body, answer.loads(body), links)
    assert await fetch(links, urls_of(out)[0]) == png
    assert orjson.loads(out)["choices"][0]["message"]["content"] == "here you go"


@pytest.mark.parametrize("url", [
    "data:text/plain;base64," + base64.b64encode(b"hello, not an image").decode(),
    "data:image/png;base64,!!!not base64!!!",
    "data:image/png,rawbytes",
])
async def test_what_is_not_a_base64_image_stays_as_it_is(links, url):
    body = body_with([url, data_url(image_bytes())])
    out = await rewrite_body(body, answer.loads(body), links)
    first, second = urls_of(out)
    assert first == url
    assert second.startswith(BASE)


async def test_a_body_without_images_is_returned_as_it_is(links):
    body = body_with([], text="a vision answer")
    assert await rewrite_body(body, answer.loads(body), links) == body


async def test_a_failing_storage_leaves_the_images_inline():
    down = await connect("redis://127.0.0.1:1/0")  # nothing listens there: refused at once
    try:
        links = Links(StoreImages(down), LinkSigner(KEY), base_url=BASE, ttl_s=600)
        body = body_with([data_url(image_bytes())])
        assert await rewrite_body(body, answer.loads(body), links) == body
    finally:
        await down.close()


def event(delta: dict, **extra) -> bytes:
    return b"data: " + orjson.dumps({"id": "gen-1", "object": "chat.completion.chunk", "model": "m", "created": 1,
                                     "choices": [{"index": 0, "delta": delta, **extra}]})


async def test_a_stream_event_gets_its_links_in_delta_images(links):
    png = image_bytes("PNG", size=(200, 100), noise=True)
    ev = event({"role": "assistant", "content": "",
                "images": [{"type": "image_url", "image_url": {"url": data_url(png)}}]})
    out = await rewrite_event(ev, links)
    assert out.startswith(b"data: {")
    (url,) = urls_of(out[6:], "delta")
    assert await fetch(links, url) == png
    assert len(out) < 700


@pytest.mark.parametrize("ev", [event({"content": "thinking"}), b"data: [DONE]", b": keep-alive",
                                event({}, finish_reason="stop")])
async def test_events_without_images_pass_unchanged(links, ev):
    assert await rewrite_event(ev, links) == ev


async def test_a_multi_line_event_keeps_its_other_fields(links):
    png = image_bytes()
    payload = orjson.dumps({"choices": [{"index": 0, "delta": {"images": [
        {"type": "image_url", "image_url": {"url": data_url(png)}}]}}]}, option=orjson.OPT_INDENT_2)
    ev = b"id: 7\n" + b"\n".join(b"data: " + line for line in payload.split(b"\n"))
    out = await rewrite_event(ev, links)
    lines = out.split(b"\n")
    assert lines[0] == b"id: 7" and all(line.startswith(b"data: ") for line in lines[1:])
    (url,) = urls_of(b"\n".join(line[6:] for line in lines[1:]), "delta")
    assert await fetch(links, url) == png
