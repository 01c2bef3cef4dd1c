"""A cached answer: what one complete upstream success produced, and how it is replayed.

An entry keeps images as raw decoded bytes, never base64 text, so it is no larger than the
images plus a small envelope. The envelope is binary: ``GWC1``, a 4-byte header length, an
orjson header (text, usage, each image's mime and length), then the image bytes back to back.
``decode`` hands out memoryview slices of the stored buffer, so reading an entry copies no
image. Rendering writes base64 slice by slice, so a hit never holds the whole answer twice.
Only complete successes become entries: ``finish_reason: stop``, and an image or some text.
"""
from __future__ import annotations

import base64
import binascii
import re
import secrets
import struct
import time
from dataclasses import dataclass
from typing import Any, Iterator

import orjson

_MAGIC = b"GWC1"
_PREFIX = struct.Struct(">4sI")  # magic, header length
_MIME = re.compile(r"^[a-z0-9.+-]+/[a-z0-9.+-]+$")
# Base64 is written in slices of this many raw bytes (a multiple of 3, so slices concatenate
# into one valid base64 string): 768 KiB in, 1 MiB out per write.
SLICE_BYTES = 3 * 256 * 1024
# Stands for each image URL while a body is dumped; random, so no text can collide with it.
_URL_SLOT = f"\x00gw-image-{secrets.token_hex(8)}\x00"
_URL_SLOT_JSON = orjson.dumps(_URL_SLOT)


class EntryFormatError(ValueError):
    """Stored bytes that are not an entry this code wrote (corrupt, truncated, other version)."""


@dataclass(frozen=True, slots=True)
class CachedImage:
    mime: str
    data: bytes | memoryview  # the decoded image bytes

    @property
    def b64_len(self) -> int:
        return (len(self.data) + 2) // 3 * 4


@dataclass(frozen=True, slots=True)
class CacheEntry:
    model: str
    content: str = ""
    reasoning_content: str = ""
    images: tuple[CachedImage, ...] = ()
    usage: dict[str, Any] | None = None
    created: int = 0  # the provider's "created"
    stored_at: float = 0.0  # when it went into the cache (for the Age header)

    def _header(self) -> bytes:
        return orjson.dumps({
            "model": self.model, "content": self.content, "reasoning": self.reasoning_content,
            "usage": self.usage, "created": self.created, "stored_at": self.stored_at,
            "images": [[img.mime, len(img.data)] for img in self.images],
        })

    def encoded_size(self) -> int:
        """The length of ``encode()``, known without building it (to refuse over-size entries)."""
        return _PREFIX.size + len(self._header()) + sum(len(img.data) for img in self.images)

    def encode(self) -> bytes:
        head = self._header()
        return b"".join([_PREFIX.pack(_MAGIC, len(head)), head, *(img.data for img in self.images)])

    @classmethod
    def decode(cls, data: bytes) -> "CacheEntry":
        """Raise EntryFormatError on anything this code did not write; images are views of ``data``."""
        view = memoryview(data)
        try:
            magic, head_len = _PREFIX.unpack_from(view)
            pos = _PREFIX.size + head_len
            head = orjson.loads(view[_PREFIX.size:pos]) if magic == _MAGIC else None
            images = []
            for mime, size in head["images"]:
                images.append(CachedImage(mime, view[pos:pos + size]))
                pos += size
            entry = cls(
                model=head["model"], content=head["content"], reasoning_content=head["reasoning"],
                images=tuple(images), usage=head["usage"], created=head["created"],
                stored_at=head["stored_at"],
            )
        except (struct.error, KeyError, TypeError, ValueError) as e:  # JSONDecodeError is a ValueError
            raise EntryFormatError(f"unreadable cache entry: {type(e).__name__}") from None
        if pos != len(view):
            raise EntryFormatError("image lengths do not match the entry size")
        return entry


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
        return CachedImage(meta[0].lower(), binascii.a2b_base64(url[comma + 1:], strict_mode=False))
    except (binascii.Error, ValueError):
        return None


class _Builder:
    """What the JSON and SSE paths share: collect parts, then judge completeness once."""

    def __init__(self, model: str = "") -> None:
        self.model, self.created, self.usage = model, 0, None
        self.content: list[str] = []
        self.reasoning: list[str] = []
        self.images: list[CachedImage] = []
        self.finish_reason: str | None = None
        self.broken = False  # an error event or an image we cannot keep as bytes

    def add_top(self, obj: dict) -> None:
        if "error" in obj:
            self.broken = True
        if isinstance(obj.get("model"), str) and obj["model"]:
            self.model = obj["model"]
        if isinstance(obj.get("created"), int):
            self.created = obj["created"]
        if isinstance(obj.get("usage"), dict):
            self.usage = obj["usage"]

    def add_message(self, msg: Any) -> None:
        if not isinstance(msg, dict):
            return
        if isinstance(msg.get("content"), str):
            self.content.append(msg["content"])
        reasoning = msg.get("reasoning_content") or msg.get("reasoning")
        if isinstance(reasoning, str):
            self.reasoning.append(reasoning)
        for part in msg.get("images") or ():
            image = _image_from_part(part)
            if image is None:
                self.broken = True
            else:
                self.images.append(image)

    def build(self) -> CacheEntry | None:
        content = "".join(self.content)
        if self.broken or self.finish_reason != "stop" or not (self.images or content):
            return None
        return CacheEntry(
            model=self.model, content=content, reasoning_content="".join(self.reasoning),
            images=tuple(self.images), usage=self.usage, created=self.created or int(time.time()),
        )


def _first_choice(obj: dict) -> dict | None:
    choices = obj.get("choices")
    return choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], dict) else None


def entry_from_json(body: dict) -> CacheEntry | None:
    """The entry for a non-streaming 200 body, or None when it is not a complete success."""
    builder = _Builder()
    builder.add_top(body)
    choice = _first_choice(body)
    if choice is None:
        return None
    builder.finish_reason = choice.get("finish_reason")
    builder.add_message(choice.get("message"))
    return builder.build()


class SSECollector:
    """Builds the entry from a stream's parsed ``data:`` objects, as the relay forwards them.

    ``feed`` each JSON object in order, ``done()`` on ``data: [DONE]``, then ``finish()``: a
    stream cut off before [DONE] or without ``finish_reason: stop`` yields None.
    """

    def __init__(self, model: str = "") -> None:
        self._b = _Builder(model)  # model: used when no chunk names one
        self._done = False

    def feed(self, event: dict) -> None:
        self._b.add_top(event)
        choice = _first_choice(event)
        if choice is not None:
            self._b.add_message(choice.get("delta"))
            if choice.get("finish_reason"):
                self._b.finish_reason = choice["finish_reason"]

    def done(self) -> None:
        self._done = True

    def finish(self) -> CacheEntry | None:
        return self._b.build() if self._done else None


# ---- replaying an entry --------------------------------------------------------------------


def _filled(doc: dict, images: tuple[CachedImage, ...], slice_bytes: int) -> tuple[int, Iterator[bytes]]:
    """``doc`` dumped with each URL slot filled by its image's data URL: (length, pieces).

    The base64 comes in slices of ``slice_bytes`` raw bytes, never as one whole string.
    """
    pieces = orjson.dumps(doc).split(_URL_SLOT_JSON)
    if len(pieces) != len(images) + 1:
        raise AssertionError("image URL slot count mismatch")
    # each slot becomes "data:<mime>;base64,<b64>": 15 bytes of quotes and markers
    size = sum(map(len, pieces)) + sum(img.b64_len + len(img.mime) + 15 for img in images)

    def fill() -> Iterator[bytes]:
        yield pieces[0]
        for image, after in zip(images, pieces[1:]):
            yield b'"data:' + image.mime.encode() + b";base64,"
            view = memoryview(image.data)
            for start in range(0, len(view), slice_bytes):
                yield base64.b64encode(view[start:start + slice_bytes])
            yield b'"' + after

    return size, fill()


def _image_parts(images: tuple[CachedImage, ...]) -> list[dict]:
    return [{"type": "image_url", "index": i, "image_url": {"url": _URL_SLOT}} for i in range(len(images))]


def render_json_chunks(entry: CacheEntry, request_id: str,
                       slice_bytes: int = SLICE_BYTES) -> tuple[int, Iterator[bytes]]:
    """The provider's ``chat.completion`` body as (Content-Length, pieces), to stream a hit."""
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
    return _filled(doc, entry.images, slice_bytes)


def render_json(entry: CacheEntry, request_id: str) -> bytearray:
    """The same body in one buffer of exactly its size (small slices: few temporaries)."""
    size, pieces = render_json_chunks(entry, request_id, slice_bytes=3 * 16 * 1024)
    buf, pos = bytearray(size), 0
    for piece in pieces:
        buf[pos:pos + len(piece)] = piece
        pos += len(piece)
    if pos != size:
        raise AssertionError("render_json size mismatch")
    return buf


def render_sse(entry: CacheEntry, include_usage: bool, *, request_id: str = "") -> Iterator[bytes]:
    """The provider's stream for a hit: content, one images event, stop (+usage), [DONE].

    The images event is yielded in slices; write each chunk as it comes.
    """
    base = {"id": f"chatcmpl_{request_id or secrets.token_hex(16)}", "object": "chat.completion.chunk",
            "created": entry.created, "model": entry.model}

    def chunk(delta: dict, finish: str | None = None, **extra: Any) -> dict:
        choice = {"index": 0, "delta": delta, "finish_reason": finish,
                  "native_finish_reason": finish and finish.upper(), "logprobs": None}
        return {**base, "choices": [choice], "system_fingerprint": None, **extra}

    first = {"role": "assistant", "content": entry.content}
    if entry.reasoning_content:
        first["reasoning_content"] = entry.reasoning_content
    yield b"data: " + orjson.dumps(chunk(first)) + b"\n\n"
    if entry.images:
        _, parts = _filled(chunk({"images": _image_parts(entry.images)}), entry.images, SLICE_BYTES)
        yield b"data: " + next(parts)
        yield from parts
        yield b"\n\n"
    usage = {"usage": entry.usage} if entry.usage is not None else {}
    yield b"data: " + orjson.dumps(chunk({}, "stop", **({} if include_usage else usage))) + b"\n\n"
    if include_usage and usage:
        yield b"data: " + orjson.dumps({**base, "choices": [], "system_fingerprint": None, **usage}) + b"\n\n"
    yield b"data: [DONE]\n\n"
