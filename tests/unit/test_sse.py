"""EventScanner: boundaries found on raw chunks of any size, big events skimmed, not copied."""
from __future__ import annotations

import os
import base64

import orjson
import pytest

from gateway.sse import EventScanner, event_data

IMAGE = base64.b64encode(os.urandom(3_000_000)).decode()


def chunk(delta: dict, **extra) -> bytes:
    return b"data: " + orjson.dumps({"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta, **extra}]})


def image_part(url: str) -> dict:
    return {"type": "image_url", "index": 0, "image_url": {"url": url}}


STREAM = b"\n\n".join(
    [
        b": PROCESSING",
        chunk({"role": "assistant", "content": "Here is"}),
        chunk({"images": [image_part("data:image/jpeg;base64," + IMAGE)]}),
        chunk({}, finish_reason="stop"),
        b'data: {"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":1900,"completion_tokens_details":{"image_tokens":1120}}}',
        b"data: [DONE]",
    ]
) + b"\n\n"


def scan(data: bytes, size: int, **kw) -> EventScanner:
    scanner = EventScanner(**kw)
    for i in range(0, len(data), size):
        for event in scanner.feed(data[i : i + size]):
            scanner.handle(event_data(event))
    return scanner


@pytest.mark.parametrize("size", [5, 997, 65536, 1 << 20, 1 << 30])
@pytest.mark.parametrize("large", [1 << 20, 1 << 40])  # skimmed, and kept whole
def test_usage_images_and_done_whatever_the_chunking(size, large):
    s = scan(STREAM, size, large=large)
    assert s.usage["completion_tokens"] == 1900
    assert (s.images_out, s.finish_reason, s.done, s.error, s.mid_event) == (1, "stop", True, None, False)


@pytest.mark.parametrize("size", [13, 4096, 100_003])
def test_a_skimmed_event_still_yields_its_usage_and_every_image(size):
    event = b"data: " + orjson.dumps(
        {
            "choices": [{"delta": {"images": [image_part("x" * 2_500_000), image_part("y" * 10)]}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 7, "completion_tokens": 3, "completion_tokens_details": {"image_tokens": 2}},
        }
    )
    s = scan(event + b"\r\n\r\ndata: [DONE]\r\n\r\n", size)
    assert (s.images_out, s.finish_reason, s.done) == (2, "stop", True)
    assert s.usage["completion_tokens_details"] == {"image_tokens": 2}


def test_whole_events_go_to_the_listener_when_one_is_given():
    seen = []
    s = scan(STREAM, 65536, on_event=seen.append)
    assert len(seen) == 4 and seen[1]["choices"][0]["delta"]["images"][0]["image_url"]["url"].endswith(IMAGE[-20:])
    assert s.done


def test_a_cut_stream_is_mid_event_and_not_done():
    s = scan(STREAM[: len(STREAM) // 2], 65536)
    assert s.mid_event and not s.done


def test_an_error_event_is_recorded():
    s = scan(b'data: {"error":{"message":"boom","type":"upstream_error","code":"x"}}\n\n', 10)
    assert s.error["message"] == "boom"


def test_multiline_data_is_joined():
    assert bytes(event_data(b'event: x\ndata: {"a":\ndata: 1}')) == b'{"a":\n1}'
    assert event_data(b": comment only") is None
