"""Chat answers with image links (``images.delivery: url``, per team or by ``X-Image-Delivery``), raw
HTTP against gateway + simulator on real ports: the links stand where the data URLs stood, are
fetched without a key, and give the bytes the simulator generated (the same request answered
inline); a cache hit answers with fresh links to the same stored image; a stream carries them
in ``delta.images``, so a 4K image's stream is a few KB."""
from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

import aiohttp
import orjson
import pytest

from tests.fixtures.simulator import sse_data
from tests.images import decode_data_url
from tests.support.clock import Clock

MODEL = "google/gemini-3-pro-image-preview"
KEY = "an-image-link-signing-key-for-the-tests"



@pytest.fixture
async def env(start_gateway):
    clock = Clock()
    gw = await start_gateway({"alpha": {}, "linked": {"images": {"delivery": "url"}, "cache": {"mode": "always"}}},
                             clock=clock, images={"signing_key": KEY})
    async with aiohttp.ClientSession() as http:
        yield gw, http, clock


def body(prompt: str = "a red fox", **extra) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": prompt}], **extra}


async def chat(env, team: str = "alpha", **kw) -> tuple[int, dict, bytes]:
    gw, http, _ = env
    headers = gw.headers(team, **kw.pop("headers", {}))
    async with http.post(gw.url + "/v1/chat/completions", json=body(**kw), headers=headers) as resp:
        answer = resp.status, resp.headers.copy(), await resp.read()
    await gw.idle()  # its cache entry is written after the answer
    return answer


async def fetch(env, url: str) -> bytes:
    gw, http, _ = env
    assert url.startswith(gw.url + "/v1/images/files/")
    async with http.get(url) as resp:  # no key
        assert resp.status == 200
        return await resp.read()


def json_url(raw: bytes) -> str:
    return orjson.loads(raw)["choices"][0]["message"]["images"][0]["image_url"]["url"]


def stream_urls(raw: bytes) -> list[str]:
    return [part["image_url"]["url"] for event in sse_data(raw) if isinstance(event, dict)
            for choice in event.get("choices", ()) for part in choice["delta"].get("images") or ()]


async def test_json_answer_carries_a_link_to_the_generated_bytes(env):
    status, _, inline = await chat(env)
    generated = decode_data_url(json_url(inline))
    status, _, raw = await chat(env, headers={"X-Image-Delivery": "url"})
    assert status == 200
    answer = orjson.loads(raw)
    url = json_url(raw)
    assert answer["choices"][0]["finish_reason"] == "stop" and answer["usage"]["completion_tokens"] > 0
    assert len(raw) < 4096
    assert await fetch(env, url) == generated


async def test_stream_carries_links_in_delta_images(env):
    _, _, inline = await chat(env, prompt="a tall ship", stream=True)
    generated = decode_data_url(stream_urls(inline)[0])
    status, headers, raw = await chat(env, prompt="a tall ship", stream=True, headers={"X-Image-Delivery": "url"})
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    urls = stream_urls(raw)
    assert len(urls) == 1 and await fetch(env, urls[0]) == generated
    assert raw.rstrip().endswith(b"data: [DONE]")


async def test_a_4k_image_stream_with_links_is_a_few_kb(env):
    status, _, raw = await chat(env, prompt="a city", stream=True, image_config={"image_size": "4K"},
                                sim_fault="image_mb=12", headers={"X-Image-Delivery": "url"})
    assert status == 200
    assert len(raw) < 8 * 1024
    assert len(await fetch(env, stream_urls(raw)[0])) >= 12 * 1024 * 1024


async def test_team_delivery_and_the_header_that_overrides_it(env):
    _, _, raw = await chat(env, "linked", prompt="a lantern")
    assert json_url(raw).startswith("http")
    _, _, raw = await chat(env, "linked", prompt="a lantern", headers={"X-Image-Delivery": "inline"})
    assert json_url(raw).startswith("data:image/jpeg;base64,")
    status, _, raw = await chat(env, headers={"X-Image-Delivery": "sometimes"})
    assert status == 400 and orjson.loads(raw)["error"]["param"] == "X-Image-Delivery"


@pytest.mark.parametrize("stream", [False, True])
async def test_a_cache_hit_answers_with_fresh_links_to_the_same_image(env, stream):
    _, _, clock = env
    _, first_headers, first = await chat(env, "linked", prompt="a mill", stream=stream)
    clock.advance(100)
    _, headers, hit = await chat(env, "linked", prompt="a mill", stream=stream)
    assert (first_headers["x-cache"], headers["x-cache"]) == ("MISS", "HIT")
    old, new = (stream_urls(r)[0] if stream else json_url(r) for r in (first, hit))
    assert urlsplit(old).path == urlsplit(new).path  # the same stored image
    expires = [int(parse_qs(urlsplit(u).query)["expires"][0]) for u in (old, new)]
    assert expires[1] == expires[0] + 100  # signed when the hit answered
    assert await fetch(env, new) == await fetch(env, old)
