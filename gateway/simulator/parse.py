"""A chat-completions body -> ``ChatCall``: what the simulated model is asked to do.

Only what the provider itself would refuse is refused here: a body that is not a JSON object,
no messages, an image part that is not a base64 data URL, an ``image_config`` the model does
not offer. Anything else (``temperature``, ``max_tokens``, unknown fields) is accepted and
ignored, as a real provider does. Any model id is accepted and echoed back, so tests may
configure whatever id they like. Pixel-level decoding of the images is ``inputs.py``'s job.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import re
from dataclasses import dataclass
from typing import Any, Iterator

import orjson

from . import errors

IMAGE_SIZES = ("1K", "2K", "4K")
ASPECT_RATIOS = ("1:1", "2:3", "3:2", "3:4", "4:3", "4:5", "5:4", "9:16", "16:9", "21:9")
_DATA_URL = re.compile(r"data:image/(?:png|jpeg|jpg|webp|gif);base64,", re.IGNORECASE)


@dataclass(frozen=True)
class ChatCall:
    """One parsed request. ``digest`` identifies it for images, caching and reasoning tokens."""

    model: str
    stream: bool
    include_usage: bool
    text: str  # every text part of every message, joined by newlines
    images: tuple[bytes, ...]  # decoded (not yet validated) input image bytes, in order
    image_size: str
    aspect_ratio: str | None  # None: 1:1, or the first input's shape for edits
    seed: int | None
    vision: bool
    digest: bytes


def peek(body: Any) -> tuple[str, bool, str, int]:
    """(model, stream, user, image count) for the stats, from any body, valid or not."""
    if not isinstance(body, dict):
        return "", False, "-", 0
    model = body.get("model") if isinstance(body.get("model"), str) else ""
    user = body.get("user") if isinstance(body.get("user"), str) and body.get("user") else "-"
    try:
        n_images = sum(1 for _, kind, _ in _parts(body.get("messages")) if kind == "image")
    except errors.SimError:
        n_images = 0
    return model, body.get("stream") is True, user, n_images


def parse(body: Any) -> ChatCall:
    """Validate the body; raises ``SimError`` (400) with the provider's wording."""
    if not isinstance(body, dict):
        raise errors.invalid_request("Request body must be a JSON object.")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise errors.invalid_request("model is required.")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise errors.invalid_request("messages must be a non-empty array.")

    texts: list[str] = []
    images: list[bytes] = []
    last_user_text = ""
    for role, kind, value in _parts(messages):
        if kind == "text":
            texts.append(value)
            if role == "user":
                last_user_text = value
        else:
            images.append(_decode_data_url(value))

    config = body.get("image_config") or {}
    if not isinstance(config, dict):
        raise errors.invalid_request("image_config must be an object.")
    image_size = config.get("image_size", "1K")
    if image_size not in IMAGE_SIZES:
        raise errors.invalid_request(f"image_config.image_size must be one of {', '.join(IMAGE_SIZES)}.")
    aspect_ratio = config.get("aspect_ratio")
    if aspect_ratio is not None and aspect_ratio not in ASPECT_RATIOS:
        raise errors.invalid_request(f"image_config.aspect_ratio must be one of {', '.join(ASPECT_RATIOS)}.")
    seed = body.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise errors.invalid_request("seed must be an integer.")
    modalities = body.get("modalities")
    stream_options = body.get("stream_options")

    text = "\n".join(texts)
    digest = hashlib.sha256(
        orjson.dumps([text, seed, image_size, aspect_ratio, [hashlib.sha256(b).hexdigest() for b in images]])
    ).digest()
    return ChatCall(
        model=model,
        stream=body.get("stream") is True,
        include_usage=isinstance(stream_options, dict) and stream_options.get("include_usage") is True,
        text=text,
        images=tuple(images),
        image_size=image_size,
        aspect_ratio=aspect_ratio,
        seed=seed,
        vision=(isinstance(modalities, list) and "image" not in modalities)
        or last_user_text.rstrip().endswith("?"),
        digest=digest,
    )


def _parts(messages: Any) -> Iterator[tuple[str, str, str]]:
    """(role, "text" | "image", text or image URL) for every part, in order."""
    if not isinstance(messages, list):
        return
    for message in messages:
        if not isinstance(message, dict):
            raise errors.invalid_request("Each message must be an object.")
        role = message.get("role") if isinstance(message.get("role"), str) else ""
        content = message.get("content")
        if isinstance(content, str):
            yield role, "text", content
            continue
        if content is None:
            continue
        if not isinstance(content, list):
            raise errors.invalid_request("message content must be a string or an array of parts.")
        for part in content:
            yield role, *_part(part)


def _part(part: Any) -> tuple[str, str]:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text" and isinstance(part.get("text"), str):
        return "text", part["text"]
    if kind == "image":  # the provider's own shape
        return "image", part.get("image")
    if kind == "image_url":  # OpenAI's shape; some clients send the URL as a bare string
        url = part.get("image_url")
        return "image", url.get("url") if isinstance(url, dict) else url
    raise errors.invalid_request(f"Unsupported content part type: {kind!r}.")


def _decode_data_url(url: Any) -> bytes:
    """The bytes of a base64 image data URL; anything else is the provider's invalid_image."""
    if not isinstance(url, str):
        raise errors.invalid_image()
    match = _DATA_URL.match(url)
    if match is None:
        raise errors.invalid_image()
    try:
        data = base64.b64decode(url[match.end():], validate=True)
    except (binascii.Error, ValueError):
        raise errors.invalid_image() from None
    if not data:
        raise errors.invalid_image()
    return data
