"""A cached answer: what one complete upstream success produced, and how it is replayed.

An entry keeps images as raw decoded bytes, never base64 text, so it is no larger than the
images plus a small envelope. The envelope is binary: ``GWC1``, a 4-byte header length, an
orjson header (a random id and the store time first, then text, usage, each image's mime and
length), then the image bytes back to back. The id makes an entry's first bytes tell one put
from another, so a reader that takes a big entry in ranges can check every range belongs to
the entry it started on. ``decode`` hands out memoryview slices of the stored buffer, so
reading an entry copies no image; ``read_head`` reads the header alone and locates the images
(``StoredImage``) without having their bytes; a hit is replayed by ``gateway.cache.replay``.
Only complete successes become entries: ``finish_reason: stop``, no safety block, no error,
and an image or some text. Entries are built from ``gateway.answer.Answer``, never the raw JSON.
"""
from __future__ import annotations

import secrets
import struct
import time
from dataclasses import dataclass, replace
from typing import Any

import orjson

from gateway.answer import Answer
from gateway.images.inputs import decode_data_url, image_data_urls

_MAGIC = b"GWC1"
_PREFIX = struct.Struct(">4sI")  # magic, header length
_NO_ID = "0" * 16  # an id's length, to size an entry before it has one


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
        for url in image_data_urls(choice):
            decoded = None if url is None else decode_data_url(url, strict=False)
            if decoded is None:
                self.broken = True
            else:
                self.images.append(CachedImage(*decoded))
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
