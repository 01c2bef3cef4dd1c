"""A cached answer: what one complete upstream success produced, and how it is replayed.

An entry keeps images as raw decoded bytes, never base64 text, so it is no larger than the
images plus a small envelope. The envelope is binary: ``GWC1``, a 4-byte header length, an
orjson header (a random id and the store time first, then text, usage, each image's mime and
length), then the image bytes back to back. The id makes an entry's first bytes tell one put
from another, so a reader that takes a big entry in ranges can check every range belongs to
the entry it started on. ``decode`` hands out memoryview slices of the stored buffer, so
reading an entry copies no image; ``read_head`` reads the header alone and locates the images
(``StoredImage``) without having their bytes. A hit is rendered as a plan: literal bytes and
image slots, whose base64 is written slice by slice, so a hit never holds the whole answer
twice. Only complete successes become entries: ``finish_reason: stop``, no safety block, no error,
and an image or some text. Entries are built from ``gateway.answer.Answer``, never the raw JSON.
"""
from __future__ import annotations

import binascii
import re
import secrets
import struct
import time
from dataclasses import dataclass, replace
from typing import Any, Iterator, Sequence

import orjson
import pybase64

from gateway.answer import Answer

_MAGIC = b"GWC1"
_PREFIX = struct.Struct(">4sI")  # magic, header length
_MIME = re.compile(r"^[a-z0-9.+-]+/[a-z0-9.+-]+$")
# Base64 is written in slices of this many raw bytes (a multiple of 3, so slices concatenate
# into one valid base64 string): 768 KiB in, 1 MiB out per write.
SLICE_BYTES = 3 * 256 * 1024
_NO_ID = "0" * 16  # an id's length, to size an entry before it has one
# Stands for each image URL while a body is dumped; random, so no text can collide with it.
_URL_SLOT = f"\x00gw-image-{secrets.token_hex(8)}\x00"
_URL_SLOT_JSON = orjson.dumps(_URL_SLOT)


class EntryFormatError(ValueError):
    """Stored bytes that are not an entry this code wrote (corrupt, truncated, other version)."""


def b64_len(size: int) -> int:
    """Length of the base64 text of ``size`` raw bytes (padded)."""
    return (size + 2) // 3 * 4


@dataclass(frozen=True, slots=True)
class CachedImage:
    mime: str
    data: bytes | memoryview  # the decoded image bytes

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def b64_len(self) -> int:
        return b64_len(len(self.data))


@dataclass(frozen=True, slots=True)
class StoredImage:
    """An image not read yet: ``size`` raw bytes at ``offset`` of the stored entry."""

    mime: str
    size: int
    offset: int

    @property
    def b64_len(self) -> int:
        return b64_len(self.size)


@dataclass(frozen=True, slots=True)
class CacheEntry:
    model: str
    content: str = ""
    reasoning_content: str = ""
    images: tuple[CachedImage | StoredImage, ...] = ()  # StoredImage only from ``read_head``
    usage: dict[str, Any] | None = None
    created: int = 0  # the provider's "created"
    stored_at: float = 0.0  # when it went into the cache (for the Age header)

    def _header(self, entry_id: str) -> bytes:
        # id and stored_at first: they make the first bytes of each put's entry its own
        return orjson.dumps({
            "id": entry_id, "stored_at": self.stored_at,
            "model": self.model, "content": self.content, "reasoning": self.reasoning_content,
            "usage": self.usage, "created": self.created,
            "images": [[img.mime, img.size] for img in self.images],
        })

    def encoded_size(self) -> int:
        """The length of ``encode()``, known without building it (to refuse over-size entries)."""
        return _PREFIX.size + len(self._header(_NO_ID)) + sum(img.size for img in self.images)

    def encode(self) -> bytes:
        head = self._header(secrets.token_hex(len(_NO_ID) // 2))
        return b"".join([_PREFIX.pack(_MAGIC, len(head)), head, *(img.data for img in self.images)])

    @staticmethod
    def head_size(data: bytes | memoryview) -> int:
        """How many bytes an entry's header ends at, from its first 8; EntryFormatError if not ours."""
        try:
            magic, head_len = _PREFIX.unpack_from(data)
        except struct.error:
            raise EntryFormatError("unreadable cache entry: too short") from None
        if magic != _MAGIC:
            raise EntryFormatError("unreadable cache entry: not an entry")
        return _PREFIX.size + head_len

    @classmethod
    def read_head(cls, data: bytes | memoryview) -> tuple["CacheEntry", int]:
        """The entry whose header starts ``data``, its images as ``StoredImage``, and the entry's
        whole size as the header tells it. ``data`` must hold the header (``head_size``); the
        images need not be there. EntryFormatError on anything this code did not write."""
        view = memoryview(data)
        pos = cls.head_size(view)
        if pos > len(view):
            raise EntryFormatError("unreadable cache entry: the header is cut short")
        try:
            head = orjson.loads(view[_PREFIX.size:pos])
            images = []
            for mime, size in head["images"]:
                if not isinstance(mime, str) or type(size) is not int or size < 0:
                    raise ValueError("bad image")
                images.append(StoredImage(mime, size, pos))
                pos += size
            entry = cls(
                model=head["model"], content=head["content"], reasoning_content=head["reasoning"],
                images=tuple(images), usage=head["usage"], created=head["created"],
                stored_at=head["stored_at"],
            )
        except (KeyError, TypeError, ValueError) as e:  # JSONDecodeError is a ValueError
            raise EntryFormatError(f"unreadable cache entry: {type(e).__name__}") from None
        return entry, pos

    @classmethod
    def decode(cls, data: bytes | bytearray | memoryview) -> "CacheEntry":
        """Raise EntryFormatError on anything this code did not write; images are views of ``data``."""
        view = memoryview(data)
        entry, size = cls.read_head(view)
        if size != len(view):
            raise EntryFormatError("image lengths do not match the entry size")
        images = tuple(CachedImage(i.mime, view[i.offset:i.offset + i.size]) for i in entry.images)
        return replace(entry, images=images)


# ---- building an entry from an upstream success -------------------------------------------


def _image_from_part(part: Any) -> CachedImage | None:
    """``{"type":"image_url","image_url":{"url":"data:<mime>;base64,..."}}`` -> raw bytes."""
    url = part.get("image_url") if isinstance(part, dict) else None
    url = url.get("url") if isinstance(url, dict) else url
    if not isinstance(url, str) or not url.startswith("data:"):
        return None
    comma = url.find(",", 0, 200)
    meta = url[5:comma].split(";") if comma > 0 else []
    if "base64" not in meta[1:] or not _MIME.match(meta[0].lower()):
        return None
    try:
        return CachedImage(meta[0].lower(), _b64decode_lenient(url[comma + 1:]))
    except ValueError:  # binascii.Error is a ValueError
        return None


def _b64decode_lenient(text: str) -> bytes:
    """``binascii.a2b_base64(text, strict_mode=False)``, fast for the usual, canonical text.

    What pybase64 takes with ``validate=True`` binascii decodes to the same bytes; anything
    else (line breaks, odd padding) goes to binascii, whose lenient rules decide as before.
    """
    try:
        return pybase64.b64decode(text, validate=True)
    except ValueError:
        return binascii.a2b_base64(text, strict_mode=False)


class _Builder:
    """What the JSON and SSE paths share: collect the answer's parts, then judge completeness once."""

    def __init__(self, model: str = "") -> None:
        self.model, self.created, self.usage = model, 0, None
        self.content: list[str] = []
        self.reasoning: list[str] = []
        self.images: list[CachedImage] = []
        self.finish_reason: str | None = None
        # an error event, a safety block, or an image we cannot keep as bytes
        self.broken = False

    def add(self, answer: Answer) -> None:
        """One body or event; only its first choice is kept (the provider answers n = 1)."""
        self.broken = self.broken or answer.error is not None or answer.blocked
        self.model = answer.model or self.model
        self.created = answer.created or self.created
        self.usage = answer.usage if answer.usage is not None else self.usage
        if not answer.choices:
            return
        choice = answer.choices[0]
        self.content.append(choice.content)
        self.reasoning.append(choice.reasoning)
        for part in choice.images:
            image = _image_from_part(part)
            if image is None:
                self.broken = True
            else:
                self.images.append(image)
        self.finish_reason = choice.finish_reason or self.finish_reason

    def build(self) -> CacheEntry | None:
        content = "".join(self.content)
        if self.broken or self.finish_reason != "stop" or not (self.images or content):
            return None
        return CacheEntry(
            model=self.model, content=content, reasoning_content="".join(self.reasoning),
            images=tuple(self.images), usage=self.usage, created=self.created or int(time.time()),
        )


def entry_from_answer(answer: Answer) -> CacheEntry | None:
    """The entry for a non-streaming 200 answer, or None when it is not a complete success."""
    builder = _Builder()
    builder.add(answer)
    return builder.build()


class SSECollector:
    """Builds the entry from a stream's events, as the relay forwards them.

    ``feed`` each event (an ``Answer``) in order, ``done()`` on ``data: [DONE]``, then
    ``finish()``: a stream cut off before [DONE] or without ``finish_reason: stop`` yields None.
    """

    def __init__(self, model: str = "") -> None:
        self._b = _Builder(model)  # model: used when no chunk names one
        self._done = False

    def feed(self, event: Answer) -> None:
        self._b.add(event)

    def done(self) -> None:
        self._done = True

    def finish(self) -> CacheEntry | None:
        return self._b.build() if self._done else None


# ---- replaying an entry --------------------------------------------------------------------


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

