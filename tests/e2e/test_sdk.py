"""The official openai SDK against gateway + simulator, both real servers: the five uses."""
from __future__ import annotations

import openai
import pytest

from tests.images import decode_data_url, open_image, png_url

MODEL = "google/gemini-3-pro-image-preview"
ALIAS = "gemini-3-pro-image-preview"


@pytest.fixture
async def gw(start_gateway):
    return await start_gateway()


@pytest.fixture
async def client(gw):
    async with openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=gw.key(), max_retries=0) as c:
        yield c


def images_of(message) -> list[dict]:
    return (message.model_extra or {}).get("images") or []


async def test_text_to_image_is_a_jpeg_saved_to_disk(client, tmp_path):
    r = await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "a red fox in snow"}])
    images = images_of(r.choices[0].message)
    assert len(images) == 1
    url = images[0]["image_url"]["url"]
    assert url.startswith("data:image/jpeg;base64,")
    path = tmp_path / "fox.jpg"
    path.write_bytes(decode_data_url(url))
    img = open_image(path.read_bytes())
    assert (img.format, img.size) == ("JPEG", (1024, 1024))
    assert r.usage.completion_tokens_details.image_tokens == 1120
    assert r.model in (MODEL, ALIAS)


async def test_alias_is_accepted_and_rewritten(client, simulator):
    await client.chat.completions.create(model=ALIAS, messages=[{"role": "user", "content": "a boat"}])
    stats = await simulator.stats()
    assert stats["requests"][-1]["model"] == MODEL


async def test_edit_with_one_image(client):
    r = await client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": [
            {"type": "text", "text": "make the background blue"},
            {"type": "image_url", "image_url": {"url": png_url((10, 200, 10), (80, 60))}},
        ]}],
    )
    img = open_image(decode_data_url(images_of(r.choices[0].message)[0]["image_url"]["url"]))
    assert img.format == "JPEG"
    assert r.usage.prompt_tokens >= 560  # the input image counts


async def test_composition_with_three_images_in_both_part_shapes(client, simulator):
    r = await client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": [
            {"type": "text", "text": "put these three together"},
            {"type": "image_url", "image_url": {"url": png_url((255, 0, 0))}},
            {"type": "image", "image": png_url((0, 255, 0))},
            {"type": "image_url", "image_url": {"url": png_url((0, 0, 255)), "detail": "high"}},
        ]}],
    )
    assert len(images_of(r.choices[0].message)) == 1
    assert (await simulator.stats())["requests"][-1]["n_images"] == 3


async def test_vision_answers_text_without_images(client):
    r = await client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": [
            {"type": "text", "text": "What is in this picture?"},
            {"type": "image_url", "image_url": {"url": png_url()}},
        ]}],
    )
    assert r.choices[0].message.content
    assert images_of(r.choices[0].message) == []


async def test_streaming_delivers_images_and_usage(client):
    stream = await client.chat.completions.create(
        model=MODEL, stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "a castle at night"}],
    )
    images, text, usage = [], "", None
    async for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            text += choice.delta.content or ""
            images += (choice.delta.model_extra or {}).get("images") or []
    assert len(images) == 1
    assert open_image(decode_data_url(images[0]["image_url"]["url"])).format == "JPEG"
    assert usage is not None and usage.completion_tokens_details.image_tokens == 1120


async def test_models_list_shows_ids_and_aliases(client):
    ids = {m.id async for m in client.models.list()}
    assert {MODEL, ALIAS} <= ids


async def test_wrong_key_is_authentication_error(gw):
    async with openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="nope", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError) as info:
            await bad.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])
    assert info.value.code == "invalid_api_key"


async def test_bad_request_carries_code_and_param(client, simulator):
    with pytest.raises(openai.BadRequestError) as info:
        await client.chat.completions.create(model=MODEL, n=2, messages=[{"role": "user", "content": "x"}])
    assert (info.value.code, info.value.param) == ("invalid_request", "n")
    with pytest.raises(openai.BadRequestError) as info:
        await client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://example.com/a.png"}}]}],
        )
    assert (info.value.code, info.value.param) == ("invalid_image", "messages[0].content[0]")
    assert (await simulator.stats())["calls"] == 0  # refused before any upstream cost


async def test_upstream_429_after_retries_is_rate_limit_error(client, simulator):
    with pytest.raises(openai.RateLimitError) as info:
        await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}], extra_body={"sim_fault": "status=429;retry_after=0"}
        )
    assert info.value.code == "rate_limit_exceeded"
    assert (await simulator.stats())["calls"] == 3  # the first try and max_retries=2 retries
