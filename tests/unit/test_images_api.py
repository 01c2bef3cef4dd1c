"""The Images API's request mapping and answer shape (gateway/images/openai.py), one rule at a time."""
from __future__ import annotations

import pytest

from gateway.answer import parse as parse_answer
from gateway.errors import InvalidRequest
from gateway.images import openai
from gateway.usage import Usage


def req(**body):
    return openai.parse({"prompt": "a cat", **body}, max_n=4)


@pytest.mark.parametrize("size, ratio, res", [
    ("1024x1024", "1:1", "1K"), ("1536x1024", "3:2", "2K"), ("1024x1536", "2:3", "2K"),
    ("1792x1024", "16:9", "2K"), ("1024x1792", "9:16", "2K"), ("512x512", "1:1", "1K"),
    ("2048x858", "21:9", "2K"), ("4096x2304", "16:9", "4K"), ("2049x2049", "1:1", "4K"),
    ("1280x1024", "5:4", "2K"), ("1000x800", "5:4", "1K"), ("1200x900", "4:3", "2K"),
])
def test_size_becomes_the_nearest_ratio_and_a_resolution_by_the_longer_side(size, ratio, res):
    assert req(size=size).image_config == {"aspect_ratio": ratio, "image_size": res}


def test_auto_or_no_size_leaves_the_model_default():
    assert req(size="auto").image_config == {} and req().image_config == {}


@pytest.mark.parametrize("quality, res", [("hd", "2K"), ("high", "2K"), ("standard", "1K"), ("low", "1K"),
                                          ("medium", "1K"), ("auto", "1K")])
def test_quality_picks_the_resolution_only_when_size_does_not(quality, res):
    assert req(quality=quality).image_config == {"image_size": res}
    assert req(quality=quality, size="3000x3000").image_config["image_size"] == "4K"


def test_image_config_wins_key_by_key():
    cfg = req(size="1536x1024", image_config={"image_size": "4K"}).image_config
    assert cfg == {"aspect_ratio": "3:2", "image_size": "4K"}


@pytest.mark.parametrize("body, param", [
    ({"mask": "m"}, "mask"), ({"background": "transparent"}, "background"), ({"style": "vivid"}, "style"),
    ({"output_format": "png"}, "output_format"), ({"output_compression": 50}, "output_compression"),
    ({"stream": True}, "stream"), ({"moderation": "low"}, "moderation"), ({"whatever": 1}, "whatever"),
    ({"image_config": {"seed": 1}}, "image_config.seed"),
])
def test_what_cannot_be_honoured_is_named(body, param):
    with pytest.raises(InvalidRequest) as err:
        req(**body)
    assert (err.value.code, err.value.param) == ("unsupported_parameter", param)


def test_defaults_that_change_nothing_are_accepted():
    assert req(background="auto", moderation="auto", output_format="jpeg", stream=False, style=None).n == 1


@pytest.mark.parametrize("body, param", [
    ({"n": 0}, "n"), ({"n": 5}, "n"), ({"n": "2"}, "n"), ({"n": True}, "n"), ({"size": "1024"}, "size"),
    ({"size": "0x10"}, "size"), ({"quality": "ultra"}, "quality"), ({"response_format": "png"}, "response_format"),
    ({"image_config": {"aspect_ratio": "7:3"}}, "image_config.aspect_ratio"),
    ({"image_config": {"image_size": "1k"}}, "image_config.image_size"), ({"prompt": " "}, "prompt"),
])
def test_bad_values_are_invalid_request(body, param):
    with pytest.raises(InvalidRequest) as err:
        req(**body)
    assert (err.value.code, err.value.param) == ("invalid_request", param)


def test_chat_body_puts_the_prompt_then_the_images_in_one_message():
    r = openai.parse({"prompt": "p", "size": "1024x1024", "user": "u"}, max_n=1,
                     images=(("image[0]", "data:a"), ("image[1]", "data:b")), edit=True)
    body = openai.chat_body(r, "m")
    assert body["messages"] == [{"role": "user", "content": [
        {"type": "text", "text": "p"}, {"type": "image_url", "image_url": {"url": "data:a"}},
        {"type": "image_url", "image_url": {"url": "data:b"}}]}]
    assert body["image_config"] == {"aspect_ratio": "1:1", "image_size": "1K"} and body["user"] == "u"
    assert openai.image_param("messages[0].content[2]", r) == "image[1]"
    assert openai.image_param("model", r) == "model"


def test_answer_items_and_usage():
    answer = parse_answer({"choices": [{"message": {"content": "Here it is", "images": [
        {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,AAAA"}}]}, "finish_reason": "stop"}]})
    assert openai.data_items(answer) == [("data:image/jpeg;base64,AAAA", "Here it is")]
    usage = openai.usage_object([Usage(prompt=600, completion=2000, images_in=1), Usage(prompt=10, completion=5)])
    assert usage == {"input_tokens": 610, "output_tokens": 2005, "total_tokens": 2615,
                     "input_tokens_details": {"text_tokens": 50, "image_tokens": 560}}
