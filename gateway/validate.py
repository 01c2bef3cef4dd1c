"""Request body -> ChatRequest, or an InvalidRequest naming the field at fault.

Everything is checked before any upstream cost, cheapest first: JSON, ``model``, the shape of
``messages`` and of every content part, the scalar parameters, the number of images, and only
then each image's base64, magic number and size (``images/inputs.py``), one image at a time.
Each error's ``param`` is the path of the field at fault (``messages[0].content[2]``) and its
message starts with it.

The body is forwarded as the client's own bytes unless the model name has to be rewritten to
its ``upstream_id``; only then is the parsed body re-encoded. Fields the gateway does not know
(``seed``, ``modalities``, ``image_config``, ``user``, ...) pass through untouched.

Big bodies are base64 in a few strings: ``gateway.bigstrings`` cuts the image data URLs out of
the raw bytes, only the skeleton is parsed, and each image is checked from its raw bytes (the
body keeps a placeholder where an image's URL was; a ``data:`` string that is no image's is put
back). Images are hashed only when the cache needs their key (``ImageFact.sha256``, on demand;
``cache.decide_async`` does it off the event loop). ``validate_async`` runs ``validate`` in a
thread (``gateway.offload``) for bodies over ``INLINE_MAX_BYTES``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import orjson

from gateway import bigstrings, offload
from gateway.config import Config, Limits, ModelConfig
from gateway.errors import InvalidRequest
from gateway.images.inputs import check_data_url, sha256_hex


@dataclass(slots=True)
class ImageFact:
    param: str  # where it stood: "messages[0].content[2]"
    mime: str  # image/png | image/jpeg | image/webp | image/gif
    size: int  # decoded bytes
    digest: str = ""  # hex SHA-256 of the decoded bytes; "" until ``sha256`` is first read
    url: str | memoryview = field(default="", repr=False, compare=False)  # the checked data URL (raw bytes when cut)

    @property
    def sha256(self) -> str:
        """Hashing costs ~1 ms per MB: only a cacheable request's images are hashed."""
        if not self.digest:
            self.digest = sha256_hex(self.url)
        return self.digest


@dataclass(slots=True)
class ChatRequest:
    body: dict[str, Any]  # the parsed body; "model" already rewritten to the upstream id; an image's
    # data URL may be left out of it (a placeholder string): ``images`` has its facts, ``raw`` its bytes
    raw: bytes  # the bytes to send upstream (the client's own bytes when nothing changed)
    model: ModelConfig
    stream: bool
    images: tuple[ImageFact, ...]  # in document order: message by message, part by part
    text_chars: int  # characters of all text content (for the token estimate)
    max_completion_tokens: int | None  # max_completion_tokens, else max_tokens, else None


INLINE_MAX_BYTES = 256 * 1024  # larger bodies are validated in a thread (below offload's rule: every byte is decoded)
_CONTROL = re.compile(rb"[\x00-\x1f]")  # never raw in a JSON string
ROLES = ("system", "developer", "user", "assistant")
DETAILS = ("auto", "low", "high")


def validate(raw: bytes, config: Config, limits: Limits) -> ChatRequest:
    # a body no longer than the shortest string worth cutting has none: not walked for them
    cut = bigstrings.cut(raw) if len(raw) > bigstrings.MIN_BYTES else None
    try:
        body = orjson.loads(raw if cut is None else cut.skeleton)
    except orjson.JSONDecodeError as e:
        raise InvalidRequest(
            f"The request body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno} "
            f"(byte {e.pos})",
            code="invalid_json",
        ) from None
    if not isinstance(body, dict):
        raise InvalidRequest(f"The request body must be a JSON object, not {_kind(body)}")

    model = _model(body, config)
    text_chars, image_parts = _messages(body)
    _parameters(body, model)

    if len(image_parts) > limits.max_images_per_request:
        first_over = image_parts[limits.max_images_per_request][0]
        raise InvalidRequest(
            f"{first_over}: too many images: the request has {len(image_parts)}, the limit is "
            f"{limits.max_images_per_request} per request",
            code="too_many_images",
            param=first_over,
        )
    max_bytes = limits.max_image_bytes
    used: set[int] = set()
    images = tuple(_image(param, url, raw, cut, used, max_bytes) for param, url in image_parts)
    if cut is not None and len(used) < len(cut.spans):
        bigstrings.restore(body, lambda n: None if n in used else _json_string(raw, *cut.spans[n]))

    if body["model"] != model.upstream_id:
        body["model"] = model.upstream_id
        encoded = orjson.dumps(body)
        raw = encoded if cut is None else bigstrings.splice(encoded, raw, {n: cut.spans[n] for n in used})
    max_tokens = body.get("max_completion_tokens")
    if max_tokens is None:
        max_tokens = body.get("max_tokens")
    return ChatRequest(
        body=body,
        raw=raw,
        model=model,
        stream=bool(body.get("stream")),
        images=images,
        text_chars=text_chars,
        max_completion_tokens=max_tokens,
    )


async def validate_async(raw: bytes, config: Config, limits: Limits) -> ChatRequest:
    """``validate``, off the event loop for large bodies (base64 checks of up to 100 MB)."""
    return await offload.run(validate, raw, config, limits, size=len(raw), threshold=INLINE_MAX_BYTES)


def _image(param: str, url: str, raw: bytes, cut: bigstrings.Cut | None, used: set[int], max_bytes: int) -> ImageFact:
    """The facts of one image part's data URL: the string itself, or its raw bytes when it was cut."""
    n = None if cut is None else bigstrings.index(url)
    if n is None:
        return ImageFact(param, *check_data_url(url, param=param, max_bytes=max_bytes), url=url)
    used.add(n)
    start, end = cut.spans[n]
    view = memoryview(raw)[start:end]
    try:  # raw bytes of a JSON string: a space may stand between base64 characters, no tab or newline
        return ImageFact(param, *check_data_url(view, param=param, max_bytes=max_bytes, whitespace=b" "), url=view)
    except InvalidRequest:
        _json_string(raw, start, end)  # bytes that are no JSON string make the body invalid JSON
        raise


def _json_string(raw: bytes, start: int, end: int) -> str:
    """The value of a cut string (it holds no backslash), or the invalid-JSON error orjson would give."""
    data = bytes(raw[start:end])
    bad = _CONTROL.search(data)
    try:
        if bad is None:
            return data.decode("utf-8")
    except UnicodeDecodeError as e:
        bad_at = start + e.start
    else:
        bad_at = start + bad.start()
    raise InvalidRequest(f"The request body is not valid JSON: a string holds a control character or "
                         f"invalid UTF-8 (byte {bad_at})", code="invalid_json")


def invalid(param: str, what: str) -> InvalidRequest:
    """The 400 for one field: its message starts with the field's path, ``param`` names it."""
    return InvalidRequest(f"{param}: {what}", param=param)


def _kind(value: Any) -> str:
    """The JSON name of a value's type, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _show(value: str, limit: int = 60) -> str:
    """A client-supplied string, quoted and cut short, safe to put in a message."""
    if len(value) > limit:
        value = value[:limit] + "..."
    return orjson.dumps(value).decode()


def _model(body: dict[str, Any], config: Config) -> ModelConfig:
    name = body.get("model")
    if name is None:
        raise invalid("model", "is required")
    if not isinstance(name, str):
        raise invalid("model", f"must be a string, not {_kind(name)}")
    model = config.model(name)
    if model is None:
        available = ", ".join(
            m.id + (f" (aliases: {', '.join(m.aliases)})" if m.aliases else "") for m in config.models
        )
        raise InvalidRequest(
            f"model: {_show(name)} is not available; available models: {available or 'none configured'}",
            code="unknown_model",
            param="model",
        )
    return model


def _messages(body: dict[str, Any]) -> tuple[int, list[tuple[str, str]]]:
    """Check every message and part; return the text length and the (param, url) of each image."""
    messages = body.get("messages")
    if messages is None:
        raise invalid("messages", "is required")
    if not isinstance(messages, list):
        raise invalid("messages", f"must be an array of messages, not {_kind(messages)}")
    if not messages:
        raise invalid("messages", "must not be empty")
    text_chars = 0
    images: list[tuple[str, str]] = []
    for i, message in enumerate(messages):
        here = f"messages[{i}]"
        if not isinstance(message, dict):
            raise invalid(here, f"must be an object with role and content, not {_kind(message)}")
        role = message.get("role")
        if role is None:
            raise invalid(f"{here}.role", f"is required (one of {', '.join(ROLES)})")
        if not isinstance(role, str) or role not in ROLES:
            shown = _show(role) if isinstance(role, str) else _kind(role)
            raise invalid(f"{here}.role", f"{shown} is not a valid role; use one of {', '.join(ROLES)}")
        content = message.get("content")
        if isinstance(content, str):
            text_chars += len(content)
        elif isinstance(content, list):
            text_chars += _parts(content, f"{here}.content", images)
        elif content is None and role == "assistant":
            pass
        elif content is None:
            raise invalid(f"{here}.content", f"is required for a {role} message")
        else:
            raise invalid(f"{here}.content", f"must be a string or an array of content parts, not {_kind(content)}")
    return text_chars, images


def _parts(parts: list[Any], where: str, images: list[tuple[str, str]]) -> int:
    if not parts:
        raise invalid(where, "must not be an empty array")
    text_chars = 0
    for j, part in enumerate(parts):
        here = f"{where}[{j}]"
        if not isinstance(part, dict):
            raise invalid(here, f"a content part must be an object, not {_kind(part)}")
        kind = part.get("type")
        if kind == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise invalid(f"{here}.text", f"must be a string, not {_kind(text)}")
            text_chars += len(text)
        elif kind == "image":
            url = part.get("image")
            if not isinstance(url, str):
                raise invalid(f"{here}.image", f"must be a data URL string, not {_kind(url)}")
            images.append((here, url))
        elif kind == "image_url":
            image_url = part.get("image_url")
            if isinstance(image_url, str):
                url = image_url
            elif isinstance(image_url, dict):
                url = image_url.get("url")
                if not isinstance(url, str):
                    raise invalid(f"{here}.image_url.url", f"must be a data URL string, not {_kind(url)}")
                detail = image_url.get("detail")
                if detail is not None and detail not in DETAILS:
                    shown = _show(detail) if isinstance(detail, str) else _kind(detail)
                    raise invalid(f"{here}.image_url.detail", f"{shown} is not valid; use auto, low or high")
            else:
                raise invalid(f"{here}.image_url", f"must be an object with a url, not {_kind(image_url)}")
            images.append((here, url))
        elif kind is None:
            raise invalid(f"{here}.type", "is required (text, image or image_url)")
        else:
            shown = _show(kind) if isinstance(kind, str) else _kind(kind)
            raise invalid(here, f"content part type {shown} is not supported; use text, image or image_url")
    return text_chars


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _parameters(body: dict[str, Any], model: ModelConfig) -> None:
    """The scalar parameters, each within its bounds: the token estimate (what admission
    reserves and, when the provider reports no usage, charges) is bounded by them."""
    for name, low, high in (("temperature", 0, 2), ("top_p", 0, 1)):
        value = body.get(name)
        if value is None:
            continue
        if not _is_number(value):
            raise invalid(name, f"must be a number from {low} to {high}, not {_kind(value)}")
        if not low <= value <= high:
            raise invalid(name, f"must be from {low} to {high}; got {value}")
    for name in ("max_completion_tokens", "max_tokens"):
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, float):
            raise invalid(name, f"must be a positive integer; got {value}")
        if not isinstance(value, int) or isinstance(value, bool):
            raise invalid(name, f"must be a positive integer, not {_kind(value)}")
        if value < 1:
            raise invalid(name, f"must be a positive integer; got {value}")
        if value > model.max_completion_tokens:
            raise invalid(name, f"must be at most {model.max_completion_tokens} for model {model.id}; got {value}")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise invalid("stream", f"must be a boolean, not {_kind(stream)}")
    n = body.get("n")
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n != 1):
        shown = n if _is_number(n) else _kind(n)
        raise invalid("n", f"must be 1 (the model returns one choice per request); got {shown}")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise invalid("stream_options", f"must be an object, not {_kind(options)}")
