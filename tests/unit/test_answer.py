"""gateway.answer: the provider's answer checked once; anything else is one 502, never a 500."""
from __future__ import annotations

import base64
import os

import orjson
import pytest

from gateway import answer
from gateway.errors import UpstreamBadResponse

IMAGE = {"type": "image_url", "index": 0, "image_url": {"url": "data:image/jpeg;base64,AAAA"}}
USAGE = {"prompt_tokens": 14, "completion_tokens": 1404}


def body(message=None, **choice) -> dict:
    message = {"role": "assistant", "content": "hi", "images": [IMAGE], "reasoning_content": "r"} if message is None else message
    return {"model": "m", "created": 7, "usage": USAGE,
            "choices": [{"index": 0, "message": message, "finish_reason": "stop", "native_finish_reason": "STOP", **choice}]}


def test_a_documented_body_reads_whole():
    a = answer.parse(body())
    assert (a.model, a.created, a.usage, a.images_out, a.finish_reason, a.native_finish_reason, a.blocked) == (
        "m", 7, USAGE, 1, "stop", "STOP", False)
    assert (a.choices[0].content, a.choices[0].reasoning, a.choices[0].images) == ("hi", "r", (IMAGE,))


@pytest.mark.parametrize("bad", [
    [1],
    {"choices": 1},
    {"error": {"message": "x"}},  # a 200 body must answer
    body(message="not an object"),
    body(message={"images": 5}),
    body(message={"images": [5]}),
    body(message={"content": 3}),
    body(finish_reason=1),
    {**body(), "usage": "lots"},
])
def test_a_body_that_does_not_fit_is_a_bad_response(bad):
    with pytest.raises(UpstreamBadResponse) as caught:
        answer.parse(bad)
    assert (caught.value.status, caught.value.code) == (502, "upstream_bad_response")


def test_text_that_is_not_json_is_a_bad_response():
    with pytest.raises(UpstreamBadResponse):
        answer.loads(b"<html>502 Bad Gateway</html>")


def test_stream_events_read_delta_and_may_have_no_choices():
    assert answer.parse({"choices": [{"delta": {"images": [IMAGE, IMAGE]}}]}, chunk=True).images_out == 2
    assert answer.parse({"choices": [], "usage": USAGE}, chunk=True).usage == USAGE
    assert answer.parse({"error": {"message": "boom"}}, chunk=True).error == {"message": "boom"}
    assert answer.parse({"choices": [{"finish_reason": "stop"}]}, chunk=True).finish_reason == "stop"
    with pytest.raises(UpstreamBadResponse):
        answer.parse({"choices": [{"delta": []}]}, chunk=True)


@pytest.mark.parametrize("finish, native", [("content_filter", "IMAGE_SAFETY"), ("stop", "PROHIBITED_CONTENT"),
                                            ("content_filter", None)])
def test_a_safety_block_is_well_formed_and_marked(finish, native):
    a = answer.parse(body(message={"role": "assistant", "content": "", "images": []},
                          finish_reason=finish, native_finish_reason=native))
    assert a.blocked and a.images_out == 0 and a.native_finish_reason == native


# ---- big answers: the image data URLs cut out of the bytes, only the skeleton parsed -----------

BIG_URL = "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\n" + os.urandom(300_000)).decode()


def big_body(url: str = BIG_URL, **choice) -> bytes:
    image = {"type": "image_url", "index": 0, "image_url": {"url": url}}
    return orjson.dumps(body({"role": "assistant", "content": "", "images": [image, image]}, **choice))


def test_a_big_answer_parses_only_its_skeleton_and_reads_whole(monkeypatch):
    parsed = []
    real = orjson.loads
    monkeypatch.setattr(answer.orjson, "loads", lambda data: parsed.append(len(data)) or real(data))
    data = big_body()
    a = answer.loads(data)
    assert parsed == [len(data) - 2 * len(BIG_URL) + 2 * len(r"\u00000")]
    assert a == answer.parse(real(data))  # the same Answer as the whole parse
    assert (a.usage, a.images_out, a.finish_reason) == (USAGE, 2, "stop")


def test_without_image_data_the_images_are_counted_not_built():
    a = answer.loads(big_body(), image_data=False)
    assert (a.usage, a.images_out) == (USAGE, 2)
    assert [part["image_url"]["url"] for part in a.choices[0].images] == ["", ""]


def test_a_memoryview_event_reads_as_bytes():
    data = big_body()
    assert answer.loads(memoryview(b"data: " + data)[6:]) == answer.loads(data)


@pytest.mark.parametrize("damage", [b"\n", b"\x01", b"\xff", b'"'])
def test_a_big_answer_with_a_damaged_data_url_is_still_a_bad_response(damage):
    data = big_body()
    at = data.index(b"base64,") + 100_000
    with pytest.raises(UpstreamBadResponse):
        answer.loads(data[:at] + damage + data[at:], image_data=False)


def test_a_truncated_big_answer_is_a_bad_response():
    data = big_body()
    with pytest.raises(UpstreamBadResponse):
        answer.loads(data[: data.index(b"base64,") + 200_000], image_data=False)


def test_a_data_url_that_is_not_plain_base64_is_parsed_whole_as_before():
    url = "data:image/png;base64," + "@" * 50_000  # valid JSON, not base64: the whole parse judges
    a = answer.loads(big_body(url))
    assert [part["image_url"]["url"] for part in a.choices[0].images] == [url, url]
