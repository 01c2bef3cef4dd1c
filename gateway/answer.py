"""The provider's answer, parsed once: the one reader of its shape.

A non-streaming ``chat.completion`` body and each ``chat.completion.chunk`` of a stream have one
shape (``choices[].message`` or ``choices[].delta``, ``images``, ``usage``, ``finish_reason``,
``native_finish_reason``, a top-level ``error``). ``parse`` checks every field the gateway relies
on, once, and returns an ``Answer``; the relay, the SSE scanner and the cache entry builders read
that, never the raw dict. Anything that does not fit raises ``UpstreamBadResponse`` (502
``upstream_bad_response``): a malformed answer is the provider's fault, never a 500.

A safety block (``native_finish_reason`` such as ``IMAGE_SAFETY``, or ``finish_reason:
content_filter``; see docs) is a well-formed answer: ``Answer.blocked`` says so, so it is relayed
as sent and never cached.

``loads`` reads a 10 MB answer without building it whole: the image data URLs are cut out of
the bytes (``gateway.bigstrings``), each checked to be a data URL of strict base64 (so the body
is still proven to be JSON), and only the skeleton is parsed; the URLs are put back as strings
only when the caller reads them (``image_data``). What does not fit the fast path (a data URL
with escapes or other characters, say) is parsed whole, as before.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from gateway import bigstrings
from gateway.errors import UpstreamBadResponse

SAFETY_REASONS = frozenset({"IMAGE_SAFETY", "PROHIBITED_CONTENT", "IMAGE_PROHIBITED_CONTENT", "SAFETY"})


@dataclass(frozen=True, slots=True)
class Choice:
    content: str = ""
    reasoning: str = ""
    images: tuple[dict, ...] = ()  # the provider's image parts, as sent
    finish_reason: str | None = None
    native_finish_reason: str | None = None


@dataclass(frozen=True, slots=True)
class Answer:
    """One body or one stream event. ``usage`` and ``error`` are the provider's own objects."""

    choices: tuple[Choice, ...] = ()
    usage: dict | None = None
    error: dict | None = None
    model: str = ""
    created: int = 0

    @property
    def images_out(self) -> int:
        return sum(len(c.images) for c in self.choices)

    @property
    def finish_reason(self) -> str | None:
        """The last choice's that has one (streams say it in one event)."""
        return next((c.finish_reason for c in reversed(self.choices) if c.finish_reason), None)

    @property
    def native_finish_reason(self) -> str | None:
        return next((c.native_finish_reason for c in reversed(self.choices) if c.native_finish_reason), None)

    @property
    def blocked(self) -> bool:
        """The provider's safety filter stopped it (billed for its prompt, never a cacheable success)."""
        return any(c.native_finish_reason in SAFETY_REASONS or c.finish_reason == "content_filter"
                   for c in self.choices)


def loads(data: bytes | bytearray | memoryview, *, chunk: bool = False, image_data: bool = True) -> Answer:
    """``parse`` of JSON text; text that is not JSON is malformed too.

    ``image_data=False``: the caller reads no image's data URL (it relays the bytes it has), so
    each one that was cut out reads as ``""``; the images are still counted and checked."""
    if isinstance(data, memoryview) and len(data) > bigstrings.MIN_BYTES:
        data = bytes(data)  # one copy at memcpy speed, for bytes.find
    cut = bigstrings.cut(data) if len(data) > bigstrings.MIN_BYTES else None
    view = memoryview(data)
    if cut is not None and not all(bigstrings.base64_ok(view[start:end]) for start, end in cut.spans):
        cut = None  # not plain base64 data URLs: let the parser judge the whole
    try:
        obj = orjson.loads(data if cut is None else cut.skeleton)
    except orjson.JSONDecodeError:
        raise UpstreamBadResponse("The upstream answered with a body that is not JSON.") from None
    if cut is not None:
        spans = cut.spans
        obj = bigstrings.restore(obj, (lambda n: str(view[spans[n][0]:spans[n][1]], "ascii")) if image_data
                                 else (lambda n: ""))
    return parse(obj, chunk=chunk)


def parse(obj: Any, *, chunk: bool = False) -> Answer:
    """Check and read a ``chat.completion`` (``chunk=False``) or one ``chat.completion.chunk``.

    A body must have ``choices``; an event may lack them (a usage-only or an error event)."""
    if not isinstance(obj, dict):
        raise _bad("is not a JSON object")
    choices = obj.get("choices")
    if choices is None and chunk:
        choices = ()
    elif not isinstance(choices, list):
        raise _bad("has no choices list")
    model, created = obj.get("model"), obj.get("created")
    return Answer(
        choices=tuple(_choice(c, "delta" if chunk else "message") for c in choices),
        usage=_optional(obj, "usage", dict),
        error=_optional(obj, "error", dict),
        model=model if isinstance(model, str) else "",
        created=created if type(created) is int else 0,
    )


def _choice(choice: Any, field: str) -> Choice:
    if not isinstance(choice, dict):
        raise _bad("has a choice that is not an object")
    message = choice.get(field)
    if message is None and field == "delta":
        message = choice.get("message") or {}  # some providers put the last chunk's text there
    if not isinstance(message, dict):
        raise _bad(f"has a {field} that is not an object")
    images = _optional(message, "images", list) or ()
    if not all(isinstance(part, dict) for part in images):
        raise _bad("has an image that is not an object")
    reasoning = _optional(message, "reasoning_content", str) or _optional(message, "reasoning", str)
    return Choice(
        content=_optional(message, "content", str) or "",
        reasoning=reasoning or "",
        images=tuple(images),
        finish_reason=_optional(choice, "finish_reason", str),
        native_finish_reason=_optional(choice, "native_finish_reason", str),
    )


def _optional(obj: dict, key: str, kind: type) -> Any:
    """``obj[key]`` if it is a ``kind``, None if absent or null; anything else is malformed."""
    value = obj.get(key)
    if value is None or isinstance(value, kind):
        return value
    raise _bad(f"has a {key} that is not a {kind.__name__}")


def _bad(what: str) -> UpstreamBadResponse:
    return UpstreamBadResponse(f"The upstream's answer {what}.")
