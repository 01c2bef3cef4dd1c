"""EventScanner: boundaries found on raw chunks of any size, big events skimmed, not copied."""
from __future__ import annotations

import base64
import json
import os
import random

import orjson
import pytest

from gateway.errors import UpstreamBadResponse
from gateway.upstream.sse import (IMAGE_MARKER, SCAN_STEPS, SEPARATORS, EventScanner, _find_separator, count_images,
                         event_data)

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
    assert len(seen) == 4 and seen[1].choices[0].images[0]["image_url"]["url"].endswith(IMAGE[-20:])
    assert s.done


@pytest.mark.parametrize("event", [b'data: {"choices":1}', b'data: {"choices":[{"delta":"hi"}]}',
                                   b'data: {"choices":[{"delta":{"images":5}}]}', b"data: [1]", b"data: not json"])
def test_an_event_that_is_not_a_provider_event_is_a_bad_response(event):
    s = EventScanner()
    [raw] = s.feed(event + b"\n\n")
    with pytest.raises(UpstreamBadResponse):
        s.handle(event_data(raw))


@pytest.mark.parametrize("large", [1 << 20, 64])  # read whole, and skimmed
def test_a_safety_block_is_seen_with_its_native_reason(large):
    stream = chunk({"content": ""}, finish_reason="content_filter", native_finish_reason="IMAGE_SAFETY") + b"\n\ndata: [DONE]\n\n"
    s = scan(stream, 7, large=large)
    assert (s.finish_reason, s.native_finish_reason, s.done) == ("content_filter", "IMAGE_SAFETY", True)


def test_a_cut_stream_is_mid_event_and_not_done():
    s = scan(STREAM[: len(STREAM) // 2], 65536)
    assert s.mid_event and not s.done


def test_an_error_event_is_recorded():
    s = scan(b'data: {"error":{"message":"boom","type":"upstream_error","code":"x"}}\n\n', 10)
    assert s.error["message"] == "boom"


def test_multiline_data_is_joined():
    assert bytes(event_data(b'event: x\ndata: {"a":\ndata: 1}')) == b'{"a":\n1}'
    assert event_data(b": comment only") is None


# -- the scanner's searches, against plain ones ---------------------------------------------------


def plain_separator(buf: bytes, start: int) -> tuple[int, int]:
    found = [(i, len(sep)) for sep in SEPARATORS if (i := buf.find(sep, start)) != -1]
    return min(found) if found else (-1, 0)


def test_separators_are_found_where_plain_searches_find_them():
    rng = random.Random(5)
    pieces = [b"a", b"\n", b"\r", b"\r\n", b"\n\n", b"\r\n\r\n", b"xyz"]
    for _ in range(20_000):
        buf = b"".join(rng.choices(pieces, weights=[6, 4, 2, 2, 1, 1, 3], k=rng.randrange(0, 40)))
        start = rng.randrange(0, len(buf) + 1)
        assert _find_separator(buf, start) == plain_separator(buf, start), (buf, start)
        assert _find_separator(bytearray(buf), start) == plain_separator(buf, start)


@pytest.mark.parametrize("sep", [b"\n\n", b"\r\n\r\n"])
@pytest.mark.parametrize("lone", [0, SCAN_STEPS - 1, SCAN_STEPS, SCAN_STEPS + 1, 200])
def test_a_separator_after_many_lone_newlines(sep, lone):
    buf = b"data: x\r\n" * (lone // 2) + b"data: y\n" * (lone - lone // 2) + b"data: z" + sep + b"data: w"
    assert _find_separator(buf, 0) == plain_separator(buf, 0)
    assert _find_separator(buf[: -len(sep) - 7] + b"data: w", 0) == (-1, 0)


def test_images_are_counted_like_a_plain_count_of_the_marker():
    rng = random.Random(7)
    pieces = [IMAGE_MARKER, b'"', b"x", b'"image_url"', b":", b' "type":"image_url",', b"AAAA"]
    for _ in range(20_000):
        buf = b"".join(rng.choices(pieces, k=rng.randrange(0, 50)))
        start = rng.randrange(0, len(buf) + 1)
        end = rng.randrange(start, len(buf) + 1)
        assert count_images(buf, start, end) == buf.count(IMAGE_MARKER, start, end), (buf, start, end)
    assert count_images(b'"x"' * 100 + IMAGE_MARKER * 3) == 3  # past SCAN_STEPS quotes


def test_the_marker_is_once_per_image_in_either_shape_and_any_spacing():
    provider = {"type": "image_url", "index": 0, "image_url": {"url": "data:image/jpeg;base64,/9j/"}}
    openai = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBO", "detail": "auto"}}
    compact = orjson.dumps({"images": [provider, openai, provider]})
    spaced = json.dumps({"images": [provider, openai, provider]}).encode()  # ": " after every colon
    text = orjson.dumps({"content": 'say "image_url": twice, "image_url":'})  # escaped quotes: no image
    assert count_images(compact) == count_images(spaced) == 3
    assert count_images(text) == 0


def skimmed_stream(sep: bytes, spaced: bool) -> tuple[bytes, int]:
    images = [image_part("A" * n) for n in (300, 1, 90)]
    body = {"choices": [{"delta": {"images": images}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 7, "completion_tokens": 3}}
    data = json.dumps(body).encode() if spaced else orjson.dumps(body)
    multiline = sep.join([b": keep-alive", b"data: " + data, b"data: [DONE]"]) + sep
    return multiline, len(images)


@pytest.mark.parametrize("sep", [b"\n\n", b"\r\n\r\n"])
@pytest.mark.parametrize("spaced", [False, True])
def test_a_skimmed_event_split_at_every_byte(sep, spaced):
    """Two chunks, cut at every position: separators and markers straddling the cut included."""
    stream, images = skimmed_stream(sep, spaced)
    for cut in range(1, len(stream)):
        s = EventScanner(large=64)  # the image event is skimmed after its first 64 bytes
        for part in (stream[:cut], stream[cut:]):
            for event in s.feed(part):
                s.handle(event_data(event))
        assert (s.images_out, s.done, s.finish_reason, s.mid_event) == (images, True, "stop", False), cut
        assert s.usage == {"prompt_tokens": 7, "completion_tokens": 3}, cut


@pytest.mark.parametrize("size", [1, 2, 3, 5, 11, 23, 24, 25])
def test_a_skimmed_event_in_small_chunks(size):
    stream, images = skimmed_stream(b"\r\n\r\n", True)
    s = scan(stream, size, large=64)
    assert (s.images_out, s.done, s.finish_reason) == (images, True, "stop")


@pytest.mark.parametrize("size", [1, 7, 4096])
def test_multiline_events_with_more_lone_newlines_than_scan_steps(size):
    event = b"\n".join([b"data: {"] + [b'data: "k%d": %d,' % (i, i) for i in range(3 * SCAN_STEPS)]
                       + [b'data: "choices": [{"delta": {}, "finish_reason": "length"}]}'])
    comments = b"\n".join(b": comment %d" % i for i in range(3 * SCAN_STEPS))
    stream = comments + b"\n\n" + event + b"\n\ndata: [DONE]\n\n"
    s = EventScanner()
    events = [bytes(e) for i in range(0, len(stream), size) for e in s.feed(stream[i : i + size])]
    assert events == [comments, event, b"data: [DONE]"]
    for e in events:
        s.handle(event_data(e))
    assert (s.finish_reason, s.done, s.events) == ("length", True, 1)


def test_a_whole_event_past_whole_max_drops_the_collector_and_is_skimmed():
    """A provider streaming without separators must not grow a kept event without bound: the
    collector (the cache) is let go, and the event is relayed skimmed."""
    seen = []
    scanner = EventScanner(seen.append, large=1 << 10, whole_max=1 << 16)
    for event in scanner.feed(chunk({"content": "first"}) + b"\n\n"):
        scanner.handle(event_data(event))
    assert [e.choices[0].content for e in seen] == ["first"]
    big = chunk({"images": [image_part("data:image/jpeg;base64," + IMAGE[:200_000])]})
    for i in range(0, len(big), 4096):
        assert scanner.feed(big[i:i + 4096]) == []
    assert scanner.on_event is None  # nothing of this stream is cached
    for event in scanner.feed(b"\n\n" + chunk({}, finish_reason="stop") + b"\n\ndata: [DONE]\n\n"):
        scanner.handle(event_data(event))
    assert (scanner.images_out, scanner.finish_reason, scanner.done) == (1, "stop", True)


def test_a_whole_event_the_caller_needs_past_whole_max_is_a_bad_response():
    scanner = EventScanner(whole=True, large=1 << 10, whole_max=1 << 16)
    with pytest.raises(UpstreamBadResponse):
        for _ in range(100):
            scanner.feed(b"data: " + b"A" * 4096)
