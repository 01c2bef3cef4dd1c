"""A cache hit replayed: the provider's JSON body or SSE stream, built from a ``CacheEntry``.

A hit is rendered as a plan: literal bytes and image slots, whose base64 is written slice by
slice (``fill``), so a hit never holds the whole answer twice. An image may instead stand as a
link (``urls``), when the team's images are delivered as links.
"""
from __future__ import annotations

import secrets
from typing import Any, Iterator, Sequence

import orjson
import pybase64

from gateway.cache.entry import CachedImage, CacheEntry, StoredImage

# Base64 is written in slices of this many raw bytes (a multiple of 3, so slices concatenate
# into one valid base64 string): 768 KiB in, 1 MiB out per write.
SLICE_BYTES = 3 * 256 * 1024
# Stands for each image URL while a body is dumped; random, so no text can collide with it.
_URL_SLOT = f"\x00gw-image-{secrets.token_hex(8)}\x00"
_URL_SLOT_JSON = orjson.dumps(_URL_SLOT)


# A hit's body as a plan: literal bytes, and ints that stand for "the base64 of image i" (only
# the base64 itself: the data URL's prefix and closing quote are in the literals around it).
Plan = list  # list[bytes | int]


def _add(plan: Plan, literal: bytes) -> None:
    """Append a literal, joined to the one before it: fewer, larger writes."""
    if plan and isinstance(plan[-1], bytes):
        plan[-1] += literal
    else:
        plan.append(literal)


def _add_doc(plan: Plan, lead: bytes, doc: dict, images: Sequence[CachedImage | StoredImage],
             urls: Sequence[str | None] = ()) -> None:
    """``lead`` and ``doc`` dumped, each URL slot becoming ``"data:<mime>;base64,`` + a slot, or
    the image's link where ``urls`` has one."""
    pieces = orjson.dumps(doc).split(_URL_SLOT_JSON)
    if len(pieces) != len(images) + 1:
        raise AssertionError("image URL slot count mismatch")
    _add(plan, lead + pieces[0])
    for i, (image, after) in enumerate(zip(images, pieces[1:])):
        if i < len(urls) and urls[i] is not None:
            _add(plan, orjson.dumps(urls[i]) + after)
            continue
        _add(plan, b'"data:' + image.mime.encode() + b";base64,")
        plan.append(i)
        _add(plan, b'"' + after)


def _image_parts(images: Sequence[CachedImage | StoredImage]) -> list[dict]:
    return [{"type": "image_url", "index": i, "image_url": {"url": _URL_SLOT}} for i in range(len(images))]


def json_plan(entry: CacheEntry, request_id: str, urls: Sequence[str | None] = ()) -> tuple[int, Plan]:
    """The provider's ``chat.completion`` body for a hit: (its length, its plan); ``urls``: links
    that stand for the images."""
    message = {
        "role": "assistant", "content": entry.content, "refusal": None, "annotations": None,
        "images": _image_parts(entry.images), "reasoning_content": entry.reasoning_content,
        "function_call": None, "tool_calls": None, "reasoning_details": [],
    }
    doc = {
        "id": f"chatcmpl_{request_id}", "object": "chat.completion", "created": entry.created,
        "model": entry.model,
        "choices": [{"index": 0, "message": message, "finish_reason": "stop",
                     "native_finish_reason": "STOP", "logprobs": None}],
        "usage": entry.usage, "system_fingerprint": None, "service_tier": None, "logprobs": None,
    }
    plan: Plan = []
    _add_doc(plan, b"", doc, entry.images, urls)
    size = sum(entry.images[item].b64_len if type(item) is int else len(item) for item in plan)
    return size, plan


def sse_plan(entry: CacheEntry, include_usage: bool, request_id: str, urls: Sequence[str | None] = ()) -> Plan:
    """The provider's stream for a hit: content, one images event, stop (+usage), [DONE]."""
    base = {"id": f"chatcmpl_{request_id}", "object": "chat.completion.chunk",
            "created": entry.created, "model": entry.model}

    def chunk(delta: dict, finish: str | None = None, **extra: Any) -> dict:
        choice = {"index": 0, "delta": delta, "finish_reason": finish,
                  "native_finish_reason": finish and finish.upper(), "logprobs": None}
        return {**base, "choices": [choice], "system_fingerprint": None, **extra}

    first = {"role": "assistant", "content": entry.content}
    if entry.reasoning_content:
        first["reasoning_content"] = entry.reasoning_content
    plan: Plan = [b"data: " + orjson.dumps(chunk(first)) + b"\n\n"]
    if entry.images:
        _add_doc(plan, b"data: ", chunk({"images": _image_parts(entry.images)}), entry.images, urls)
        _add(plan, b"\n\n")
    usage = {"usage": entry.usage} if entry.usage is not None else {}
    _add(plan, b"data: " + orjson.dumps(chunk({}, "stop", **({} if include_usage else usage))) + b"\n\n")
    if include_usage and usage:
        _add(plan, b"data: " + orjson.dumps({**base, "choices": [], "system_fingerprint": None, **usage}) + b"\n\n")
    _add(plan, b"data: [DONE]\n\n")
    return plan


def fill(plan: Plan, images: Sequence[CachedImage | StoredImage]) -> Iterator[bytes]:
    """A plan's pieces with images in memory: each image's base64 in slices of ``SLICE_BYTES`` raw bytes."""
    for item in plan:
        if type(item) is not int:
            yield item
            continue
        image = images[item]
        if not isinstance(image, CachedImage):
            raise TypeError("the image is still in the store; read the entry whole first")
        view = memoryview(image.data)
        for start in range(0, len(view), SLICE_BYTES):
            yield pybase64.b64encode(view[start:start + SLICE_BYTES])

