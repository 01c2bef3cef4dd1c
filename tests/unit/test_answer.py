"""gateway.answer: the provider's answer checked once; anything else is one 502, never a 500."""
from __future__ import annotations

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
