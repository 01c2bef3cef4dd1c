"""Response bodies in the provider's exact shapes: completion, stream chunks, usage, model list.

Usage is a function of the request alone (identical for JSON and SSE answers), plausible for
Gemini 3 Pro Image:

- ``prompt_tokens`` = ceil(text characters / 4), at least 1, + 560 per input image;
- ``image_tokens`` = 1120 for a 1K or 2K image, 2000 for 4K, 0 for a vision answer;
- ``reasoning_tokens`` = 700..900, fixed by the request digest (the model always thinks);
- ``completion_tokens`` = image + reasoning + ceil(answer text characters / 4);
- ``total_tokens`` = prompt + completion.

The progress text a stream sends before its image ("Generating your image...") is not
counted; the JSON answer's ``content`` is ``""`` for images, as on the provider's page.
"""
from __future__ import annotations

import math
import time
import uuid
from typing import Any

from .parse import ChatCall

MODEL_ID = "gemini-3-pro-image-preview"
MODEL_LIST = {
    "object": "list",
    "data": [{"id": MODEL_ID, "object": "model", "created": 1779778659, "owned_by": "google"}],
}
PROGRESS_TEXT = ("Generating ", "your image", "...")  # the deltas before a streamed image

_TOKENS_PER_INPUT_IMAGE = 560
_IMAGE_TOKENS = {"1K": 1120, "2K": 1120, "4K": 2000}


def _text_tokens(text: str) -> int:
    return math.ceil(len(text) / 4)


def usage(call: ChatCall, answer_text: str, blocked: bool = False) -> dict[str, Any]:
    """Tokens of one answer; a safety-blocked one has no image but is billed its prompt (and
    its thinking), as API.md says."""
    prompt = max(1, _text_tokens(call.text)) + _TOKENS_PER_INPUT_IMAGE * len(call.images)
    image = 0 if call.vision or blocked else _IMAGE_TOKENS[call.image_size]
    reasoning = 700 + int.from_bytes(call.digest[-2:], "big") % 201
    completion = image + reasoning + _text_tokens(answer_text)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "completion_tokens_details": {
            "accepted_prediction_tokens": 0,
            "audio_tokens": 0,
            "image_tokens": image,
            "reasoning_tokens": reasoning,
            "rejected_prediction_tokens": 0,
        },
        "prompt_tokens_details": None,
        "cache_creation_input_tokens": None,
        "cache_creation": None,
        "gemini_cache_tokens_details": None,
    }


def image_parts(url: str | None) -> list[dict[str, Any]]:
    """``message.images`` / ``delta.images``: one entry for an image answer, none for vision."""
    if url is None:
        return []
    return [{"type": "image_url", "index": 0, "image_url": {"url": url}}]


def split_text(text: str, parts: int = 3) -> list[str]:
    """A vision answer cut at word boundaries into ``parts`` stream deltas that join back to it."""
    words = text.split(" ")
    step = max(1, math.ceil(len(words) / parts))
    return [
        " ".join(words[i : i + step]) + (" " if i + step < len(words) else "")
        for i in range(0, len(words), step)
    ]


class Reply:
    """One answer's identity (id, created, model) and how it finished, shared by its JSON body
    or all its chunks. ``blocked`` is a safety reason (``IMAGE_SAFETY``...): the answer then
    finishes ``content_filter`` with that ``native_finish_reason``."""

    def __init__(self, model: str, blocked: str | None = None) -> None:
        self.id = "chatcmpl_" + uuid.uuid4().hex
        self.created = int(time.time())
        self.model = model
        self.finish = ("content_filter", blocked) if blocked else ("stop", "STOP")

    def completion(self, content: str, image_url: str | None, usage: dict[str, Any] | None) -> dict[str, Any]:
        """The non-streaming answer; ``usage`` None leaves the key out (the ``no_usage`` fault)."""
        message = {
            "role": "assistant",
            "content": content,
            "refusal": None,
            "annotations": None,
            "images": image_parts(image_url),
            "reasoning_content": "",
            "function_call": None,
            "tool_calls": None,
            "reasoning_details": [],
        }
        choice = {
            "index": 0,
            "message": message,
            "finish_reason": self.finish[0],
            "native_finish_reason": self.finish[1],
            "logprobs": None,
        }
        body = {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": usage,
            "system_fingerprint": None,
            "service_tier": None,
            "logprobs": None,
        }
        if usage is None:
            del body["usage"]
        return body

    def chunk(self, delta: dict[str, Any]) -> dict[str, Any]:
        return self._chunk([self._choice(delta, None, None)])

    def final_chunk(self, usage: dict[str, Any] | None) -> dict[str, Any]:
        """The chunk with the finish reason; carries usage unless it goes in its own chunk."""
        chunk = self._chunk([self._choice({}, *self.finish)])
        if usage is not None:
            chunk["usage"] = usage
        return chunk

    def usage_chunk(self, usage: dict[str, Any]) -> dict[str, Any]:
        """The ``stream_options.include_usage`` chunk: no choices, only usage."""
        chunk = self._chunk([])
        chunk["usage"] = usage
        return chunk

    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "system_fingerprint": None,
        }

    @staticmethod
    def _choice(delta: dict[str, Any], finish: str | None, native: str | None) -> dict[str, Any]:
        return {
            "index": 0,
            "delta": delta,
            "finish_reason": finish,
            "native_finish_reason": native,
            "logprobs": None,
        }
