"""OpenAI's Images API through the official ``openai`` SDK, against gateway + simulator (real servers).

The simulator's images are a pure function of the chat call (text, image_config, input bytes),
so an image equal to the one a direct chat call with the expected body gets proves what reached
the provider: the prompt, the uploads byte for byte and the image_config that ``size`` became.
"""
from __future__ import annotations

import asyncio
import base64

import aiohttp
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.limits.plan import limit_keys
from gateway.store import connect
from tests.images import decode_data_url, image_bytes, open_image

MODEL = "google/gemini-3-pro-image-preview"
KEY = "an-image-link-signing-key-for-the-tests"


@pytest.fixture
async def gw(start_gateway):
    return await start_gateway({"alpha": {}, "linked": {"images": {"delivery": "url"}},
                                "slow": {"limits": {"requests_per_minute": 2}}, "cached": {"cache": {"mode": "always"}}},
                               images={"signing_key": KEY, "max_n": 3})


@pytest.fixture
async def client(gw):
    async with openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=gw.key(), max_retries=0) as c:
        yield c


@pytest.fixture
async def http():
    async with aiohttp.ClientSession() as session:
        yield session


async def chat_image(client, content, **extra) -> bytes:
    """The image a direct chat call with this content (and ``extra`` body fields) gets."""
    r = await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}],
                                             extra_body={"modalities": ["image", "text"], **extra})
    return decode_data_url(r.choices[0].message.model_extra["images"][0]["image_url"]["url"])


def image_part(data: bytes, mime: str = "image/png") -> dict:
    return {"type": "image_url", "image_url": {"url": f"data:{mime};base64,{base64.b64encode(data).decode()}"}}


async def test_generate_b64_json_maps_size_to_the_image_config(client, simulator):
    r = await client.images.generate(model=MODEL, prompt="a lighthouse at dusk", size="1536x1024",
                                     response_format="b64_json")
    assert len(r.data) == 1 and r.data[0].url is None
    got = base64.b64decode(r.data[0].b64_json)
    img = open_image(got)
    assert (img.format, img.size) == ("JPEG", (2 * 1264, 2 * 848))  # 3:2 at 2K: size's longer side is 1536
    expected = await chat_image(client, [{"type": "text", "text": "a lighthouse at dusk"}],
                                image_config={"aspect_ratio": "3:2", "image_size": "2K"})
    assert got == expected
    assert r.usage.output_tokens > 1120 and r.usage.input_tokens == r.usage.input_tokens_details.text_tokens
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens


async def test_image_config_wins_over_size_and_quality_picks_the_resolution(client):
    r = await client.images.generate(prompt="a kite", size="1024x1024", quality="hd", response_format="b64_json",
                                     extra_body={"image_config": {"aspect_ratio": "16:9"}})
    assert open_image(base64.b64decode(r.data[0].b64_json)).size == (1376, 768)  # 16:9 at 1K (size, not hd)
    r = await client.images.generate(prompt="a kite", quality="hd", response_format="b64_json")
    assert open_image(base64.b64decode(r.data[0].b64_json)).size == (2048, 2048)  # no size: hd is 2K


async def test_generate_three_as_links_fetched_without_a_key(client, simulator, http):
    before = (await simulator.stats())["calls"]
    r = await client.images.generate(prompt="three boats", n=3, response_format="url")
    assert len(r.data) == 3 and all(d.b64_json is None for d in r.data)
    assert (await simulator.stats())["calls"] == before + 3
    expected = await chat_image(client, [{"type": "text", "text": "three boats"}])
    for item in r.data:
        async with http.get(item.url) as resp:  # no Authorization: the link is the credential
            assert resp.status == 200 and resp.headers["Content-Type"] == "image/jpeg"
            assert await resp.read() == expected


async def test_n_3_as_base64(client):
    r = await client.images.generate(prompt="three kites", n=3)  # no response_format, team inline: b64_json
    assert [open_image(base64.b64decode(d.b64_json)).format for d in r.data] == ["JPEG"] * 3


async def test_a_url_team_gets_links_without_asking(gw):
    async with openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=gw.key("linked"), max_retries=0) as c:
        r = await c.images.generate(prompt="a harbour")
    assert r.data[0].url.startswith(gw.url + "/v1/images/files/") and r.data[0].b64_json is None


async def test_edit_with_one_file_sends_its_bytes(client, tmp_path):
    upload = image_bytes("PNG", (120, 80), (20, 160, 40))
    path = tmp_path / "in.png"
    path.write_bytes(upload)
    r = await client.images.edit(image=path, prompt="make it night", response_format="b64_json")
    got = base64.b64decode(r.data[0].b64_json)
    assert open_image(got).size == (1264, 848)  # no size: the simulator keeps the input's 3:2 shape
    assert got == await chat_image(client, [{"type": "text", "text": "make it night"}, image_part(upload)])


async def test_edit_with_several_files_and_a_size(client):
    first, second = image_bytes("PNG", (64, 64), (200, 0, 0)), image_bytes("JPEG", (64, 64), (0, 0, 200))
    r = await client.images.edit(image=[("a.png", first, "image/png"), ("b.jpg", second, "image/jpeg")],
                                 prompt="put them side by side", size="1792x1024", response_format="b64_json")
    got = base64.b64decode(r.data[0].b64_json)
    expected = await chat_image(client, [{"type": "text", "text": "put them side by side"}, image_part(first),
                                         image_part(second, "image/jpeg")],
                                image_config={"aspect_ratio": "16:9", "image_size": "2K"})
    assert got == expected


async def test_edit_as_json_with_image_urls(gw, client, http):
    upload = image_bytes("PNG", (80, 80), (90, 90, 10))
    url = f"data:image/png;base64,{base64.b64encode(upload).decode()}"
    async with http.post(gw.url + "/v1/images/edits", headers=gw.headers(),
                         json={"prompt": "add a hat", "images": [{"image_url": url}], "response_format": "url"}) as resp:
        assert resp.status == 200
        body = await resp.json()
    async with http.get(body["data"][0]["url"]) as resp:
        got = await resp.read()
    assert got == await chat_image(client, [{"type": "text", "text": "add a hat"}, image_part(upload)])


@pytest.mark.parametrize("extra, param", [({"extra_body": {"mask": "x"}}, "mask"),
                                          ({"extra_body": {"background": "transparent"}}, "background"),
                                          ({"extra_body": {"output_format": "png"}}, "output_format"),
                                          ({"extra_body": {"style": "vivid"}}, "style")])
async def test_what_cannot_be_honoured_is_unsupported_parameter(client, simulator, extra, param):
    before = (await simulator.stats())["calls"]
    with pytest.raises(openai.BadRequestError) as err:
        await client.images.generate(prompt="a cat", **extra)
    assert err.value.code == "unsupported_parameter" and err.value.param == param
    assert (await simulator.stats())["calls"] == before


async def test_a_mask_on_an_edit_is_refused(client):
    png = image_bytes("PNG")
    with pytest.raises(openai.BadRequestError) as err:
        await client.images.edit(image=("a.png", png, "image/png"), mask=("m.png", png, "image/png"), prompt="x")
    assert (err.value.code, err.value.param) == ("unsupported_parameter", "mask")


async def test_bad_input_is_a_400_naming_the_field(client, gw):
    with pytest.raises(openai.BadRequestError) as err:  # the same image checks as chat: magic bytes
        await client.images.edit(image=[("a.png", image_bytes("PNG"), "image/png"), ("b.png", b"not an image", "image/png")],
                                 prompt="x")
    assert (err.value.code, err.value.param) == ("invalid_image", "image[1]")
    with pytest.raises(openai.BadRequestError) as err:
        await client.images.generate(prompt="x", n=4)
    assert err.value.param == "n"
    with pytest.raises(openai.BadRequestError) as err:
        await client.images.generate(prompt="x", size="big")
    assert err.value.param == "size"
    with pytest.raises(openai.BadRequestError) as err:
        await client.images.edit(image=("a.png", image_bytes("PNG"), "image/png"), prompt="")
    assert err.value.param == "prompt"
    async with openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="wrong", max_retries=0) as c:
        with pytest.raises(openai.AuthenticationError):
            await c.images.generate(prompt="x")


async def test_n_images_count_n_requests(gw, simulator):
    async with openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=gw.key("slow"), max_retries=0) as c:
        r = await c.images.generate(prompt="x", n=2)
        assert len(r.data) == 2
        before = (await simulator.stats())["calls"]
        with pytest.raises(openai.RateLimitError):  # the 2 images took the minute's 2 requests
            await c.images.generate(prompt="x")
        with pytest.raises(openai.RateLimitError):  # refused before any call reached the provider
            await c.images.generate(prompt="x", n=3)
        assert (await simulator.stats())["calls"] == before


async def test_partial_failure_answers_what_came_back_and_charges_what_ran(gw, client, simulator, http):
    await simulator.script(["status=400", "", ""])  # the first call is refused by the provider
    raw = await client.images.with_raw_response.generate(prompt="partial", n=3)
    r = raw.parse()
    assert len(r.data) == 2 and raw.headers["x-images-failed"] == "1"
    await gw.idle()  # settled after the answer
    async with http.get(gw.url + "/v1/usage", headers=gw.headers()) as resp:
        day = (await resp.json())["day"]
    assert day["images_out"] == 2
    assert day["tokens"]["prompt"] + day["tokens"]["completion"] == r.usage.total_tokens  # the refusal: nothing

    await simulator.script(["status=400", "status=400"])
    with pytest.raises(openai.BadRequestError):  # none came back: the provider's error
        await client.images.generate(prompt="partial", n=2)


async def usage_day(http, gw, team: str) -> dict:
    await gw.idle()  # the ledger is written after the answer
    async with http.get(gw.url + "/v1/usage", headers=gw.headers(team)) as resp:
        assert resp.status == 200
        return (await resp.json())["day"]


async def test_a_request_refused_at_a_later_image_takes_nothing(start_gateway, simulator, http, store_url, store):
    """n=3 against 2 requests a minute: the 3rd admission is refused, the 2 before it are undone."""
    gw = await start_gateway({"pair": {"limits": {"requests_per_minute": 2, "tokens_per_minute": 100_000}}},
                             store={"url": store_url})
    rpm_key = limit_keys("pair")[0]
    before, calls = await store.client.get(rpm_key), (await simulator.stats())["calls"]
    async with openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=gw.key("pair"), max_retries=0) as c:
        with pytest.raises(openai.RateLimitError) as err:
            await c.images.generate(prompt="three boats", n=3)
        assert "requests_per_minute" in err.value.message
        assert await store.client.get(rpm_key) == before
        day = await usage_day(http, gw, "pair")
        assert day["requests"] == 0 and day["quota_tokens"] == 0
        assert (await simulator.stats())["calls"] == calls
        raw = await c.images.with_raw_response.generate(prompt="two boats", n=2)  # the minute's 2 are there
    assert len(raw.parse().data) == 2 and raw.headers["x-ratelimit-remaining-requests"] == "0"


async def test_a_call_that_never_reached_the_provider_is_charged_nothing(start_gateway, simulator, http):
    """n=2 where call 0 never leaves the gateway (another replica holds its single-flight lock
    past the request's deadline) while call 1 is answered: only call 1 is charged."""
    store = await connect("memory://")
    gw = await start_gateway({"cached": {"cache": {"mode": "always"}}}, store_obj=store, upstream={"timeout_s": 2})
    async with openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=gw.key("cached"), max_retries=0) as c:
        one = await c.images.generate(prompt="a locked boat")  # stores the entry that call 0 of n=2 looks up
        [entry] = [k.decode() for k in await store.client.keys("gw:cache:*:entry")]
        await store.client.delete(entry)
        await store.client.set(entry.removesuffix(":entry") + ":lock", b"another-replica", ex=60)
        before, calls = await usage_day(http, gw, "cached"), (await simulator.stats())["calls"]
        raw = await c.images.with_raw_response.generate(prompt="a locked boat", n=2)
    r = raw.parse()
    assert len(r.data) == 1 and raw.headers["x-images-failed"] == "1"
    assert (await simulator.stats())["calls"] == calls + 1  # call 0 never reached the provider
    after = await usage_day(http, gw, "cached")
    assert after["requests"] == before["requests"] + 2
    tokens = sum(after["tokens"][k] - before["tokens"][k] for k in ("prompt", "completion"))
    assert tokens == r.usage.total_tokens == one.usage.total_tokens  # call 1's usage; call 0 nothing, not its estimate


async def test_links_asked_of_a_gateway_without_a_key_name_the_field_that_asked(gw, start_gateway, http):
    plain = await start_gateway({"alpha": {}})  # no images.signing_key: links are off
    async with openai.AsyncOpenAI(base_url=plain.url + "/v1", api_key=plain.key(), max_retries=0) as c:
        with pytest.raises(openai.BadRequestError) as err:
            await c.images.generate(prompt="x", response_format="url")
        assert err.value.param == "response_format"
        with pytest.raises(openai.BadRequestError) as err:
            await c.images.generate(prompt="x", extra_headers={"X-Image-Delivery": "url"})
        assert err.value.param == "X-Image-Delivery"
        with pytest.raises(openai.BadRequestError) as err:
            await c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                            extra_headers={"X-Image-Delivery": "url"})
        assert err.value.param == "X-Image-Delivery"


async def test_metrics_and_access_log_count_it_like_a_chat_request(gw, client, http, caplog):
    caplog.set_level("INFO", logger="gateway.access")
    upload = image_bytes("PNG", (32, 32))
    r = await client.images.edit(image=[("a.png", upload, "image/png")] * 2, prompt="metered", n=2)
    await gw.idle()  # counted and logged after the answer
    async with http.get(gw.url + "/metrics") as resp:
        samples = [s for f in text_string_to_metric_families(await resp.text()) for s in f.samples]

    def value(name: str, **labels: str) -> float:
        return sum(s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))

    assert value("gateway_requests_total", team="alpha", model=MODEL, status="200", cache="bypass") == 1
    assert value("gateway_images_total", team="alpha", model=MODEL, direction="out") == 2
    assert value("gateway_images_total", team="alpha", model=MODEL, direction="in") == 4  # 2 inputs x 2 calls
    assert value("gateway_tokens_total", team="alpha", model=MODEL, type="prompt") == r.usage.input_tokens
    lines = [rec.access for rec in caplog.records if getattr(rec, "access", {}).get("path") == "/v1/images/edits"]
    assert len(lines) == 1
    line = lines[0]
    assert (line["team"], line["model"], line["status"], line["images_in"], line["images_out"]) == ("alpha", MODEL, 200, 4, 2)
    assert line["prompt_tokens"] + line["completion_tokens"] == r.usage.total_tokens and line["bytes_in"] > 2 * len(upload)


async def test_a_repeat_is_answered_from_the_cache_image_by_image(gw, simulator):
    async with openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=gw.key("cached"), max_retries=0) as c:
        before = (await simulator.stats())["calls"]
        first = await c.images.with_raw_response.generate(prompt="cached boats", n=2)
        calls = (await simulator.stats())["calls"]
        assert calls == before + 2  # two images, two calls: never one image handed out twice
        await gw.idle()  # the entries are written after the answer
        again = await c.images.with_raw_response.generate(prompt="cached boats", n=2)
    assert (first.headers["x-cache"], again.headers["x-cache"]) == ("MISS", "HIT")
    assert (await simulator.stats())["calls"] == calls  # each image its own entry: both hit
    assert [d.b64_json for d in again.parse().data] == [d.b64_json for d in first.parse().data]


async def test_one_request_of_concurrent_calls_is_one_in_flight_and_waits_as_long_as_its_longest_call(
        gw, client, http, simulator, caplog):
    """n=2: the calls overlap, so the request is one in flight (not two) and its upstream wait is
    the longest call's (not their sum, which would exceed its duration and hide the overhead)."""
    caplog.set_level("INFO", logger="gateway.access")
    await simulator.script(["latency_ms=1000", "latency_ms=1000"])
    call = asyncio.create_task(client.images.generate(prompt="two slow ones", n=2))
    await simulator.wait_for_stats(lambda s: sum(s["inflight"].values()) == 2)
    async with http.get(gw.url + "/metrics") as resp:
        samples = [s for f in text_string_to_metric_families(await resp.text()) for s in f.samples]
    assert [s.value for s in samples if s.name == "gateway_inflight_requests" and s.labels["team"] == "alpha"] == [1]
    assert len((await call).data) == 2
    await gw.idle()  # logged after the answer
    line = next(r.access for r in caplog.records if getattr(r, "access", {}).get("path") == "/v1/images/generations")
    assert line["upstream_ms"] <= line["duration_ms"]
