"""Request body -> ChatRequest, or an InvalidRequest naming the field at fault.

STUB: interface only; being implemented.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .config import Config, Limits, ModelConfig


@dataclass(frozen=True, slots=True)
class ImageFact:
    param: str  # where it stood: "messages[0].content[2]"
    mime: str  # image/png | image/jpeg | image/webp | image/gif
    size: int  # decoded bytes
    sha256: str  # hex digest of the decoded bytes


@dataclass(slots=True)
class ChatRequest:
    body: dict[str, Any]  # the parsed body; "model" already rewritten to the upstream id
    raw: bytes  # the bytes to send upstream (the client's own bytes when nothing changed)
    model: ModelConfig
    stream: bool
    images: tuple[ImageFact, ...]  # in document order: message by message, part by part
    text_chars: int  # characters of all text content (for the token estimate)
    max_completion_tokens: int | None  # max_completion_tokens, else max_tokens, else None


def validate(raw: bytes, config: Config, limits: Limits) -> ChatRequest:
    raise NotImplementedError


async def validate_async(raw: bytes, config: Config, limits: Limits) -> ChatRequest:
    raise NotImplementedError
