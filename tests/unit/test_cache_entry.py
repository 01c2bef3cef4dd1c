"""gateway.cache.entry: what becomes an entry, its binary envelope, and how a hit is replayed."""
from __future__ import annotations

import base64
import binascii
import itertools
import os

import orjson
import pytest

from gateway.answer import parse
from gateway.cache import hit_body
from gateway.cache.entry import (
    CacheEntry,
    CachedImage,
    EntryFormatError,
    SSECollector,
    StoredImage,
    entry_from_answer,
)
from gateway.cache.replay import SLICE_BYTES
from gateway.images import inputs as cache_entry_module  # the provider's base64 is decoded there

MODEL = "gemini-3-pro-image-preview"
USAGE = {
    "prompt_tokens": 14, "completion_tokens": 1404, "total_tokens": 1418,
    "completion_tokens_details": {"accepted_prediction_tokens": 0, "audio_tokens": 0, "image_tokens": 1404,
                                  "reasoning_tokens": 0, "rejected_prediction_tokens": 0},
    "prompt_tokens_details": None,
}
SMALL = os.urandom(1000)  # not a multiple of 3: base64 padding is exercised
BIG = os.urandom(2 * SLICE_BYTES + 1234)  # three slices when streamed


def data_url(data: bytes, mime: str = "image/jpeg", wrap: bool = False) -> str:
    b64 = base64.encodebytes(data).decode() if wrap else base64.b64encode(data).decode()
    return f"data:{mime};base64,{b64}"


def from_json(body: dict):
    """The entry a non-streaming body makes, read as the relay reads it."""
    return entry_from_answer(parse(body))


def provider_body(*images: bytes, content: str = "", finish: str = "stop", native: str = "STOP",
                  wrap: bool = False) -> dict:
    """A non-streaming answer exactly as the provider documents it."""
    parts = [{"type": "image_url", "index": i, "image_url": {"url": data_url(img, wrap=wrap)}}
             for i, img in enumerate(images)]
    message = {"role": "assistant", "content": content, "refusal": None, "annotations": None, "images": parts,
               "reasoning_content": "", "function_call": None, "tool_calls": None, "reasoning_details": []}
    return {"id": "chatcmpl_3ca3", "object": "chat.completion", "created": 1779778659, "model": MODEL,
            "choices": [{"index": 0, "message": message, "finish_reason": finish, "native_finish_reason": native,
                         "logprobs": None}],
            "usage": USAGE, "system_fingerprint": None, "service_tier": None, "logprobs": None}


def provider_stream(*images: bytes, content: str = "Generating...", usage: str = "last") -> list[dict]:
    """The provider's stream: content deltas, one images event, a stop chunk, usage somewhere."""
    events = [{"choices": [{"delta": {"content": content[:5]}}]},
              {"model": MODEL, "created": 1779778659, "choices": [{"delta": {"content": content[5:]}}]}]
    if images:
        events.append({"choices": [{"delta": {"images": [
            {"type": "image_url", "image_url": {"url": data_url(img)}} for img in images]}}]})
    last = {"choices": [{"delta": {}, "finish_reason": "stop"}]}
    if usage == "last":
        last["usage"] = USAGE
    events.append(last)
    if usage == "separate":
        events.append({"choices": [], "usage": USAGE})
    return events


def parse_sse(chunks: list[bytes]) -> list[dict | str]:
    """Client side: split the bytes into events; each is its JSON object, or "[DONE]"."""
    raw = b"".join(chunks)
    assert raw.endswith(b"\n\n")
    events: list[dict | str] = []
    for block in raw[:-2].split(b"\n\n"):
        assert block.startswith(b"data: ") and b"\n" not in block
        payload = block[len(b"data: "):]
        events.append("[DONE]" if payload == b"[DONE]" else orjson.loads(payload))
    return events


def entry(*images: bytes, content: str = "", usage: dict | None = USAGE) -> CacheEntry:
    return CacheEntry(model=MODEL, content=content, reasoning_content="thought", images=tuple(
        CachedImage("image/jpeg", img) for img in images), usage=usage, created=1779778659, stored_at=12.5)


# ---- envelope -------------------------------------------------------------------------------


def test_encode_decode_round_trip_keeps_images_byte_identical():
    original = CacheEntry(model=MODEL, content="a cat", reasoning_content="hmm", created=7, stored_at=3.25,
                          usage=USAGE, images=(CachedImage("image/jpeg", BIG), CachedImage("image/png", SMALL)))
    data = original.encode()
    assert len(data) == original.encoded_size()
    assert len(data) < len(BIG) + len(SMALL) + 1024  # raw bytes plus a small envelope, no base64
    back = CacheEntry.decode(data)
    assert [bytes(i.data) for i in back.images] == [BIG, SMALL]
    assert [i.mime for i in back.images] == ["image/jpeg", "image/png"]
    assert all(isinstance(i.data, memoryview) for i in back.images)  # views of the stored buffer, no copy
    assert (back.model, back.content, back.reasoning_content, back.usage, back.created, back.stored_at) == (
        MODEL, "a cat", "hmm", USAGE, 7, 3.25)


def test_read_head_locates_the_images_from_the_header_alone():
    original = entry(BIG, SMALL, content="a cat")
    data = original.encode()
    head_end = CacheEntry.head_size(data[:8])
    head, size = CacheEntry.read_head(data[:head_end])  # no image byte needed
    assert size == len(data)
    assert head.images == (StoredImage("image/jpeg", len(BIG), head_end),
                           StoredImage("image/jpeg", len(SMALL), head_end + len(BIG)))
    assert (head.content, head.usage, head.stored_at) == ("a cat", USAGE, 12.5)
    with pytest.raises(EntryFormatError):
        CacheEntry.read_head(data[:head_end - 1])
    with pytest.raises(EntryFormatError):
        CacheEntry.head_size(b"GWC")


def test_every_put_starts_with_its_own_id():
    """A reader checks an entry's first bytes to know it is still the one it started on."""
    one, two = entry(SMALL).encode(), entry(SMALL).encode()
    assert len(one) == len(two) == entry(SMALL).encoded_size()
    assert one[:32] != two[:32] and one[32:] == two[32:]  # the id, right after the prefix


@pytest.mark.parametrize("data", [b"", b"junk", b"GWC1\x00\x00\x00\x05{}", entry(SMALL).encode()[:-1],
                                  entry(SMALL).encode() + b"x"],
                         ids=["empty", "junk", "no-images", "truncated", "trailing-byte"])  # entries carry random ids
def test_decode_refuses_what_it_did_not_write(data):
    with pytest.raises(EntryFormatError):
        CacheEntry.decode(data)


# ---- what becomes an entry ------------------------------------------------------------------


def test_entry_from_answer_keeps_raw_image_bytes_whatever_the_base64_wrapping():
    e = from_json(provider_body(SMALL, BIG, content="here", wrap=True))
    assert e is not None
    assert [bytes(i.data) for i in e.images] == [SMALL, BIG]
    assert (e.model, e.content, e.usage, e.created) == (MODEL, "here", USAGE, 1779778659)


def test_provider_base64_is_decoded_as_binascii_decodes_it_leniently():
    """pybase64 takes the usual canonical text; the rest goes to binascii's lenient mode, so
    an odd upstream image is kept as the same bytes as before (or refused the same way)."""
    def outcome(decode, text):
        try:
            return decode(text)
        except ValueError:
            return "refused"

    lenient = lambda t: binascii.a2b_base64(t, strict_mode=False)  # noqa: E731
    alphabet = ["A", "Q", "/", "=", "\n", " ", "-", "é"]
    for text in ("".join(p) for n in range(6) for p in itertools.product(alphabet, repeat=n)):
        assert outcome(cache_entry_module._b64decode_lenient, text) == outcome(lenient, text), text


def test_entry_from_answer_text_only_answer_is_an_entry():
    e = from_json(provider_body(content="A cat in a helmet."))
    assert e is not None and e.images == () and e.content == "A cat in a helmet."


@pytest.mark.parametrize("body", [
    provider_body(SMALL, finish="length"),
    provider_body(SMALL, finish="content_filter"),
    provider_body(SMALL, native="IMAGE_SAFETY"),  # a safety block, even one that says "stop"
    provider_body(content=""),  # no image, no text
    {"choices": []},
])
def test_entry_from_answer_refuses_anything_but_a_complete_success(body):
    assert from_json(body) is None


def test_entry_from_answer_refuses_an_image_it_cannot_keep_as_bytes():
    body = provider_body(SMALL)
    body["choices"][0]["message"]["images"][0]["image_url"]["url"] = "https://example.com/cat.jpg"
    assert from_json(body) is None


@pytest.mark.parametrize("usage", ["last", "separate", "absent"])
def test_collector_builds_the_entry_from_a_complete_stream(usage):
    collector = SSECollector()
    for event in provider_stream(BIG, usage=usage):
        collector.feed(parse(event, chunk=True))
    collector.done()
    e = collector.finish()
    assert e is not None
    assert [bytes(i.data) for i in e.images] == [BIG]
    assert e.content == "Generating..." and e.model == MODEL
    assert e.usage == (None if usage == "absent" else USAGE)


def test_collector_refuses_a_cut_off_stream():
    events = provider_stream(SMALL)
    cut = SSECollector()
    for event in events:  # every event arrived, but [DONE] never did
        cut.feed(parse(event, chunk=True))
    assert cut.finish() is None
    early = SSECollector()
    for event in events[:-1]:  # no finish_reason
        early.feed(parse(event, chunk=True))
    early.done()
    assert early.finish() is None


def test_collector_refuses_a_stream_that_ends_in_an_error_event():
    collector = SSECollector()
    for event in provider_stream(SMALL)[:-1]:
        collector.feed(parse(event, chunk=True))
    collector.feed(parse({"error": {"message": "upstream failed", "type": "upstream_error", "code": "x"}}, chunk=True))
    collector.feed(parse({"choices": [{"delta": {}, "finish_reason": "stop"}]}, chunk=True))
    collector.done()
    assert collector.finish() is None


def test_collector_uses_the_model_hint_when_no_chunk_names_one():
    collector = SSECollector("google/gemini-3-pro-image-preview")
    collector.feed(parse({"choices": [{"delta": {"content": "hi"}, "finish_reason": "stop"}]}, chunk=True))
    collector.done()
    assert collector.finish().model == "google/gemini-3-pro-image-preview"


# ---- replaying a hit ------------------------------------------------------------------------


async def hit(entry: CacheEntry, *, stream: bool = False, include_usage: bool = False,
              request_id: str = "req-1") -> tuple[int | None, list[bytes]]:
    """What the handler writes for a hit on ``entry``: (its Content-Length, its pieces in order)."""
    size, pieces = hit_body(entry, stream=stream, include_usage=include_usage, request_id=request_id)
    return size, [piece async for piece in pieces]


async def test_a_json_hit_is_the_provider_shape_with_the_original_images():
    stored = CacheEntry.decode(entry(BIG, SMALL, content="done").encode())
    _, pieces = await hit(stored)
    doc = orjson.loads(b"".join(pieces))
    assert doc["id"] == "chatcmpl_req-1" and doc["object"] == "chat.completion"
    assert (doc["model"], doc["created"], doc["usage"]) == (MODEL, 1779778659, USAGE)
    assert set(doc) >= {"system_fingerprint", "service_tier", "logprobs"}
    choice = doc["choices"][0]
    assert (choice["index"], choice["finish_reason"], choice["native_finish_reason"]) == (0, "stop", "STOP")
    message = choice["message"]
    assert (message["role"], message["content"], message["reasoning_content"]) == ("assistant", "done", "thought")
    urls = [part["image_url"]["url"] for part in message["images"]]
    assert [part["type"] for part in message["images"]] == ["image_url", "image_url"]
    assert [part["index"] for part in message["images"]] == [0, 1]
    assert all(u.startswith("data:image/jpeg;base64,") for u in urls)
    assert [base64.b64decode(u.split(",", 1)[1]) for u in urls] == [BIG, SMALL]
    assert from_json(doc).content == "done"  # a rendered hit is itself a complete success


async def test_a_json_hit_goes_out_in_slices_under_its_exact_length():
    size, chunks = await hit(CacheEntry.decode(entry(BIG, SMALL).encode()))
    assert size == sum(map(len, chunks))
    assert max(map(len, chunks)) < len(base64.b64encode(BIG))  # the big image goes out in slices


@pytest.mark.parametrize("include_usage", [False, True])
async def test_a_stream_hit_is_the_provider_stream(include_usage):
    stored = CacheEntry.decode(entry(BIG, content="Here it is").encode())
    size, chunks = await hit(stored, stream=True, include_usage=include_usage, request_id="req-2")
    assert size is None  # a stream has no Content-Length
    events = parse_sse(chunks)
    assert events[-1] == "[DONE]"
    first, images, final = events[0], events[1], events[2]
    assert first["object"] == "chat.completion.chunk" and first["id"] == "chatcmpl_req-2"
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": "Here it is",
                                             "reasoning_content": "thought"}
    [part] = images["choices"][0]["delta"]["images"]
    assert base64.b64decode(part["image_url"]["url"].split(",", 1)[1]) == BIG
    assert (final["choices"][0]["finish_reason"], final["choices"][0]["native_finish_reason"]) == ("stop", "STOP")
    assert images["choices"][0]["finish_reason"] is None
    if include_usage:
        assert "usage" not in final
        assert events[3] == {**{k: first[k] for k in ("id", "object", "created", "model")}, "choices": [],
                             "system_fingerprint": None, "usage": USAGE}
        assert len(events) == 5
    else:
        assert final["usage"] == USAGE and len(events) == 4


async def test_a_stream_hit_writes_the_big_image_event_in_slices():
    _, chunks = await hit(entry(BIG), stream=True)
    b64_len = len(base64.b64encode(BIG))
    assert max(map(len, chunks)) < b64_len  # never the whole event as one bytes object
    slices = [c for c in chunks if len(c) == SLICE_BYTES // 3 * 4]
    assert len(slices) == 2  # two full slices, and the rest in a third
    assert base64.b64decode(b"".join(slices)) == BIG[:2 * SLICE_BYTES]


async def test_a_stream_hit_without_images_or_usage():
    events = parse_sse((await hit(entry(content="just text", usage=None), stream=True, include_usage=True))[1])
    assert [e if isinstance(e, str) else list(e["choices"][0]["delta"]) for e in events] == [
        ["role", "content", "reasoning_content"], [], "[DONE]"]


async def test_both_hit_answers_rebuild_the_same_entry_whichever_way_it_was_fetched():
    from_stream = SSECollector()
    for event in provider_stream(SMALL, BIG, content="Generating..."):
        from_stream.feed(parse(event, chunk=True))
    from_stream.done()
    from_body = from_json(provider_body(SMALL, BIG, content="Generating..."))
    for original in (from_stream.finish(), from_body):
        stored = CacheEntry.decode(original.encode())
        again = SSECollector()
        for event in parse_sse((await hit(stored, stream=True, include_usage=True))[1]):
            if event != "[DONE]":
                again.feed(parse(event, chunk=True))
        again.done()
        for rebuilt in (again.finish(), from_json(orjson.loads(b"".join((await hit(stored))[1])))):
            assert [bytes(i.data) for i in rebuilt.images] == [SMALL, BIG]
            assert (rebuilt.content, rebuilt.usage, rebuilt.model) == ("Generating...", USAGE, MODEL)
