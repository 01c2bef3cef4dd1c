"""The ways a broken or careless provider answers, for the gateway's fault tier.

Each helper turns a well-formed answer into one a real provider has been seen to send: the
key it was called with echoed back (raw, or JSON-escaped so a byte search cannot see it), a 200
whose shape is wrong, bytes that are not HTTP, an error body that arrives in two pieces.
Answers are built with ``KEY_MARK`` where the key goes and ``spell`` writes the key's bytes in
afterwards, because a JSON encoder would escape the backslashes of an escaped spelling.
"""
from __future__ import annotations

import asyncio
from typing import Any

import orjson
from aiohttp import web

KEY_MARK = "@@sim-upstream-key@@"
_NOT_HTTP = b"SSH-2.0-OpenSSH_9.6\r\n\x00\xff\xfe garbage that is not HTTP \x07\r\n\r\n"


def key_spelling(key: str, escaped: bool) -> bytes:
    """The key as it appears inside a JSON string: raw, or every other character ``\\uXXXX``
    (alternating hex case), the mix a decoder accepts and a plain search misses."""
    if not escaped:
        return orjson.dumps(key)[1:-1]
    return "".join(
        (f"\\u{ord(c):04x}" if i % 4 == 0 else f"\\u{ord(c):04X}") if i % 2 == 0 else c for i, c in enumerate(key)
    ).encode()


def spell(data: bytes, spelling: bytes) -> bytes:
    return data.replace(KEY_MARK.encode(), spelling)


def echo_headers(spelling: bytes) -> dict[str, str]:
    """A debug header that quotes the key, and an informational header a gateway may allow."""
    text = spelling.decode()
    return {"X-Debug-Authorization": "Bearer " + text, "OpenAI-Model": "gemini-3-pro-image-preview; key=" + text}


def malform(completion: dict[str, Any], kind: str) -> dict[str, Any]:
    """A JSON answer whose ``choices``, ``message`` or ``images`` is not what the API says."""
    if kind == "choices":
        completion["choices"] = 1
    elif kind == "message":
        completion["choices"][0]["message"] = "not an object"
    else:
        completion["choices"][0]["message"]["images"] = 5
    return completion


def malformed_chunk(chunk: dict[str, Any], kind: str) -> dict[str, Any]:
    """A stream event with the same fault: ``{"choices": 1}``, a string delta, ``images: 5``."""
    if kind == "choices":
        return {"choices": 1}
    chunk["choices"][0]["delta"] = "not an object" if kind == "message" else {"images": 5}
    return chunk


def stream_error() -> dict[str, Any]:
    """A mid-stream failure as OpenRouter sends it (a top-level ``error``, finish ``error``),
    quoting the key."""
    return {
        "error": {"message": f"Upstream model error (key {KEY_MARK}).", "type": "api_error", "code": "server_error"},
        "choices": [{"index": 0, "delta": {"content": ""}, "finish_reason": "error"}],
    }


def not_http(request: web.Request) -> None:
    """Answer with bytes that are no HTTP status line at all, then close the connection."""
    if request.transport is not None:
        request.transport.write(_NOT_HTTP)
        request.transport.close()


async def in_two_pieces(request: web.Request, response: web.Response, pause_s: float) -> web.StreamResponse:
    """``response`` sent as its headers and half its body, a pause, then the other half."""
    body = bytes(response.body)  # an error body: always bytes here
    out = web.StreamResponse(status=response.status, headers=response.headers)
    out.content_length = len(body)
    await out.prepare(request)
    await out.write(body[: len(body) // 2])
    await asyncio.sleep(pause_s)
    await out.write(body[len(body) // 2 :])
    await out.write_eof()
    return out
