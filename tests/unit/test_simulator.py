"""The simulator answers like the provider of upstream/API.md, through real HTTP."""
from __future__ import annotations

from typing import Any

import openai
import pytest
from PIL import Image

from tests.fixtures.simulator import data_url, open_data_url, sse_data, sse_events

MODEL = "google/gemini-3-pro-image-preview"


def user(content: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}]}


async def chat(sim, body: dict[str, Any], **headers: str) -> tuple[int, Any]:
    url = f"{sim.url}/v1/chat/completions"
    async with sim.session.post(url, json=body, headers={**sim.headers, **headers}) as response:
        return response.status, await response.json()


async def image_of(sim, body: dict[str, Any]) -> tuple[Image.Image, bytes]:
    status, answer = await chat(sim, body)
    assert status == 200, answer
    return open_data_url(answer["choices"][0]["message"]["images"][0]["image_url"]["url"])


def solid(colour: tuple[int, int, int], size: tuple[int, int] = (64, 64)) -> Image.Image:
    return Image.new("RGB", size, colour)


async def test_models_list_is_the_providers(simulator):
    async with simulator.session.get(f"{simulator.url}/v1/models", headers=simulator.headers) as response:
        assert response.status == 200
        assert await response.json() == {
            "object": "list",
            "data": [{"id": "gemini-3-pro-image-preview", "object": "model", "created": 1779778659, "owned_by": "google"}],
        }


@pytest.mark.parametrize("authorization", [None, "Bearer wrong-key", "Basic c2ltOmtleQ=="])
@pytest.mark.parametrize("method,path", [("POST", "/v1/chat/completions"), ("GET", "/v1/models")])
async def test_a_wrong_or_missing_key_gets_the_providers_401(simulator, authorization, method, path):
    headers = {"Authorization": authorization} if authorization else {}
    async with simulator.session.request(method, simulator.url + path, json=user("a cat"), headers=headers) as response:
        assert response.status == 401
        assert await response.json() == {
            "error": {"message": "Invalid API key.", "type": "authentication_error", "code": "invalid_api_key"}
        }


async def test_text_to_image_answer_has_the_exact_shape(simulator):
    status, answer = await chat(simulator, user("an orange cat in an astronaut helmet"))
    assert status == 200
    assert set(answer) == {"id", "object", "created", "model", "choices", "usage", "system_fingerprint", "service_tier", "logprobs"}
    assert answer["id"].startswith("chatcmpl_") and isinstance(answer["created"], int)
    assert (answer["object"], answer["model"]) == ("chat.completion", MODEL)
    assert (answer["system_fingerprint"], answer["service_tier"], answer["logprobs"]) == (None, None, None)
    [choice] = answer["choices"]
    message = choice.pop("message")
    assert choice == {"index": 0, "finish_reason": "stop", "native_finish_reason": "STOP", "logprobs": None}
    [image] = message.pop("images")
    assert message == {
        "role": "assistant", "content": "", "refusal": None, "annotations": None, "reasoning_content": "",
        "function_call": None, "tool_calls": None, "reasoning_details": [],
    }
    assert set(image) == {"type", "index", "image_url"} and (image["type"], image["index"]) == ("image_url", 0)
    assert image["image_url"]["url"].startswith("data:image/jpeg;base64,/9j/")
    picture, _ = open_data_url(image["image_url"]["url"])
    assert (picture.format, picture.size) == ("JPEG", (1024, 1024))
    assert set(answer["usage"]) == {
        "prompt_tokens", "completion_tokens", "total_tokens", "completion_tokens_details",
        "prompt_tokens_details", "cache_creation_input_tokens", "cache_creation", "gemini_cache_tokens_details",
    }
    assert set(answer["usage"]["completion_tokens_details"]) == {
        "accepted_prediction_tokens", "audio_tokens", "image_tokens", "reasoning_tokens", "rejected_prediction_tokens",
    }


@pytest.mark.parametrize(
    "image_config,size",
    [
        (None, (1024, 1024)),
        ({"image_size": "1K"}, (1024, 1024)),
        ({"image_size": "2K"}, (2048, 2048)),
        ({"image_size": "4K"}, (4096, 4096)),
        ({"aspect_ratio": "16:9"}, (1376, 768)),
        ({"image_size": "2K", "aspect_ratio": "3:4"}, (1792, 2400)),
        ({"image_size": "4K", "aspect_ratio": "9:16"}, (3072, 5504)),
        ({"image_size": "1K", "aspect_ratio": "21:9"}, (1584, 672)),
    ],
)
async def test_image_size_follows_image_config(simulator, image_config, size):
    body = user("a lighthouse") | ({"image_config": image_config} if image_config else {})
    picture, _ = await image_of(simulator, body)
    assert (picture.format, picture.size) == ("JPEG", size)
    picture.load()  # the whole JPEG decodes, not just its header


@pytest.mark.parametrize("image_config", [{"image_size": "8K"}, {"image_size": "1k"}, {"aspect_ratio": "7:3"}])
async def test_an_image_config_the_model_lacks_is_a_400(simulator, image_config):
    status, answer = await chat(simulator, user("a lighthouse") | {"image_config": image_config})
    assert status == 400 and answer["error"]["type"] == "invalid_request_error"


async def test_images_are_deterministic_per_prompt_and_seed(simulator):
    _, first = await image_of(simulator, user("a red fox") | {"seed": 7})
    _, again = await image_of(simulator, user("a red fox") | {"seed": 7})
    _, other_prompt = await image_of(simulator, user("a blue whale") | {"seed": 7})
    _, other_seed = await image_of(simulator, user("a red fox") | {"seed": 8})
    assert first == again
    assert len({first, other_prompt, other_seed}) == 3


async def test_an_edit_is_derived_from_its_input_whatever_the_part_shape(simulator):
    red = data_url(solid((220, 20, 20), (200, 100)))
    provider_shape = [{"type": "text", "text": "add sunglasses"}, {"type": "image", "image": red}]
    openai_shape = [{"type": "text", "text": "add sunglasses"}, {"type": "image_url", "image_url": {"url": red, "detail": "auto"}}]
    picture, raw = await image_of(simulator, user(provider_shape))
    _, raw_again = await image_of(simulator, user(openai_shape))
    assert raw == raw_again
    assert picture.size == (1376, 768)  # 2:1 input, no aspect ratio asked: the closest, 16:9
    r, g, b = picture.convert("RGB").getpixel((688, 384))
    assert r > 150 and g < 100 and b < 100
    blue, _ = await image_of(simulator, user([provider_shape[0], {"type": "image", "image": data_url(solid((20, 20, 220)))}]))
    r, g, b = blue.convert("RGB").getpixel((512, 512))
    assert b > 150 and r < 100 and g < 100


async def test_a_composition_tiles_its_inputs_in_order(simulator):
    parts = [
        {"type": "text", "text": "put them side by side"},
        {"type": "image", "image": data_url(solid((220, 20, 20)), "PNG")},
        {"type": "image_url", "image_url": {"url": data_url(solid((20, 20, 220)), "JPEG")}},
    ]
    picture, _ = await image_of(simulator, user(parts) | {"image_config": {"aspect_ratio": "16:9"}})
    rgb = picture.convert("RGB")
    assert picture.size == (1376, 768)
    left, right = rgb.getpixel((344, 384)), rgb.getpixel((1032, 384))
    assert left[0] > 150 and left[2] < 100
    assert right[2] > 150 and right[0] < 100


@pytest.mark.parametrize("ask", [{"modalities": ["text"]}, {}])
async def test_vision_answers_in_text_with_no_images(simulator, ask):
    text = "What is in these pictures?" if not ask else "Describe these pictures"
    parts = [
        {"type": "text", "text": text},
        {"type": "image", "image": data_url(solid((1, 2, 3), (64, 48)), "PNG")},
        {"type": "image", "image": data_url(solid((1, 2, 3), (32, 16)), "GIF")},
    ]
    status, answer = await chat(simulator, user(parts) | ask)
    assert status == 200
    message = answer["choices"][0]["message"]
    assert message["images"] == []
    assert "2 images" in message["content"]
    assert "PNG of 64x48" in message["content"] and "GIF of 32x16" in message["content"]
    details = answer["usage"]["completion_tokens_details"]
    assert details["image_tokens"] == 0
    assert answer["usage"]["prompt_tokens"] >= 2 * 560


@pytest.mark.parametrize("image_size,image_tokens", [("1K", 1120), ("2K", 1120), ("4K", 2000)])
async def test_usage_is_plausible_and_adds_up(simulator, image_size, image_tokens):
    parts = [{"type": "text", "text": "x" * 40}, {"type": "image", "image": data_url(solid((9, 9, 9)))}]
    status, answer = await chat(simulator, user(parts) | {"image_config": {"image_size": image_size}})
    assert status == 200
    usage = answer["usage"]
    details = usage["completion_tokens_details"]
    assert usage["prompt_tokens"] == 10 + 560
    assert details["image_tokens"] == image_tokens
    assert 700 <= details["reasoning_tokens"] <= 900
    assert usage["completion_tokens"] == image_tokens + details["reasoning_tokens"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    _, again = await chat(simulator, user(parts) | {"image_config": {"image_size": image_size}})
    assert again["usage"] == usage


@pytest.mark.parametrize(
    "url",
    [
        "https://example.com/cat.png",
        "data:image/png;base64,not*base64!",
        "data:image/png;base64,aGVsbG8gd29ybGQ=",  # valid base64 of "hello world"
        data_url(solid((1, 1, 1)), "PNG")[:-40],  # truncated
        data_url(solid((1, 1, 1)), "BMP").replace("image/bmp", "image/png"),  # not an accepted format
        "data:text/plain;base64,aGVsbG8=",
        None,
    ],
)
async def test_a_bad_image_gets_the_providers_invalid_image(simulator, url):
    status, answer = await chat(simulator, user([{"type": "text", "text": "edit"}, {"type": "image_url", "image_url": {"url": url}}]))
    assert status == 400
    assert answer == {"error": {"message": "Invalid image format.", "type": "invalid_request_error", "code": "invalid_image"}}


async def test_a_body_that_is_not_json_is_a_400(simulator):
    url = f"{simulator.url}/v1/chat/completions"
    async with simulator.session.post(url, data=b"{not json", headers=simulator.headers) as response:
        assert response.status == 400
        assert (await response.json())["error"]["code"] == "invalid_json"


async def stream_body(sim, body: dict[str, Any], **headers: str) -> bytes:
    url = f"{sim.url}/v1/chat/completions"
    async with sim.session.post(url, json=body | {"stream": True}, headers={**sim.headers, **headers}) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        return await response.read()


async def test_a_stream_sends_text_then_the_whole_image_in_one_event_then_stop(simulator):
    body = await stream_body(simulator, user("a city at night"))
    events = sse_events(body)
    assert events[0] == b": PROCESSING"
    data = sse_data(body)
    assert data[-1] == "[DONE]" and events[-1] == b"data: [DONE]"
    chunks = data[:-1]
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == MODEL for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    deltas = [c["choices"][0]["delta"] for c in chunks]
    image_at = [i for i, d in enumerate(deltas) if "images" in d]
    assert len(image_at) == 1 and image_at[0] >= 1
    assert all("content" in d for d in deltas[: image_at[0]])
    picture, _ = open_data_url(deltas[image_at[0]]["images"][0]["image_url"]["url"])
    assert (picture.format, picture.size) == ("JPEG", (1024, 1024))
    final = chunks[-1]
    assert final["choices"][0]["finish_reason"] == "stop" and final["choices"][0]["delta"] == {}
    assert final["usage"]["completion_tokens_details"]["image_tokens"] == 1120
    assert all("usage" not in c for c in chunks[:-1])


async def test_include_usage_puts_usage_in_its_own_chunk_without_choices(simulator):
    data = sse_data(await stream_body(simulator, user("a city at night") | {"stream_options": {"include_usage": True}}))
    *_, finish, usage_chunk, done = data
    assert done == "[DONE]"
    assert finish["choices"][0]["finish_reason"] == "stop" and "usage" not in finish
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["total_tokens"] > 0


async def test_the_stream_and_json_answers_agree(simulator):
    _, answer = await chat(simulator, user("a quiet harbour") | {"seed": 3})
    data = sse_data(await stream_body(simulator, user("a quiet harbour") | {"seed": 3}))
    [streamed_url] = [c["choices"][0]["delta"]["images"][0]["image_url"]["url"] for c in data[:-1] if "images" in c["choices"][0]["delta"]]
    assert streamed_url == answer["choices"][0]["message"]["images"][0]["image_url"]["url"]
    assert data[-2]["usage"] == answer["usage"]


async def test_a_vision_stream_sends_its_answer_as_text_and_no_image(simulator):
    parts = [{"type": "text", "text": "What is this?"}, {"type": "image", "image": data_url(solid((5, 5, 5)))}]
    data = sse_data(await stream_body(simulator, user(parts)))
    deltas = [c["choices"][0]["delta"] for c in data[:-1]]
    assert not any("images" in d for d in deltas)
    assert "1 image: image 1 is a PNG of 64x64 pixels" in "".join(d.get("content", "") for d in deltas)


async def test_the_openai_sdk_gets_an_image(simulator):
    client = openai.AsyncOpenAI(base_url=simulator.url + "/v1", api_key=simulator.api_key, max_retries=0)
    async with client:
        completion = await client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "a paper boat"}],
            extra_body={"image_config": {"aspect_ratio": "4:3"}},
        )
        images = completion.choices[0].message.model_extra["images"]
        picture, _ = open_data_url(images[0]["image_url"]["url"])
        assert picture.size == (1200, 896)
        assert completion.usage.completion_tokens_details.image_tokens == 1120

        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "a paper boat"}], stream=True,
            stream_options={"include_usage": True},
        )
        streamed, usage = [], None
        async for chunk in stream:
            if chunk.choices and (chunk.choices[0].delta.model_extra or {}).get("images"):
                streamed += chunk.choices[0].delta.model_extra["images"]
            usage = chunk.usage or usage
        assert len(streamed) == 1
        assert open_data_url(streamed[0]["image_url"]["url"])[0].size == (1024, 1024)
        assert usage is not None and usage.total_tokens > 1120

        assert [m.id async for m in client.models.list()] == ["gemini-3-pro-image-preview"]


async def test_the_openai_sdk_sees_the_providers_errors(simulator):
    async with openai.AsyncOpenAI(base_url=simulator.url + "/v1", api_key="wrong", max_retries=0) as client:
        with pytest.raises(openai.AuthenticationError) as caught:
            await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])
        assert caught.value.code == "invalid_api_key"
    async with openai.AsyncOpenAI(base_url=simulator.url + "/v1", api_key=simulator.api_key, max_retries=0) as client:
        with pytest.raises(openai.BadRequestError) as caught:
            await client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}],
            )
        assert caught.value.code == "invalid_image"
        with pytest.raises(openai.RateLimitError):
            await client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "x"}], extra_headers={"X-Sim-Fault": "status=429"}
            )
