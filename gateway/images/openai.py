"""OpenAI's Images API mapped onto the model's chat calls: the request in, the answer out.

``parse`` reads an ``/v1/images/generations`` or ``/v1/images/edits`` body (the fields of a
multipart edit arrive as the same dict, files as data URLs) into an ``ImagesRequest``, or an
``InvalidRequest`` naming the field. ``chat_body`` is the one chat call each of the ``n``
images becomes; ``answer`` is OpenAI's answer from the chat answers that came back.

The mapping, in README's table:

- ``size``: ``auto`` (the model's default: 1:1, or an edit's input shape; 1K) or ``WxH``: the
  nearest of the model's aspect ratios (by the ratio's logarithm) and ``1K`` / ``2K`` / ``4K``
  by the longer side (<= 1024, <= 2048, larger).
- ``quality`` picks the resolution only when nothing else does (``size`` auto or absent, no
  ``image_config.image_size``): ``high`` and ``hd`` -> 2K, ``auto``, ``low``, ``medium``,
  ``standard`` -> 1K.
- ``image_config`` (``aspect_ratio``, ``image_size``) wins over both, key by key.
- Whatever the model cannot honour is a 400 ``unsupported_parameter`` naming it: ``mask``,
  ``style``, ``output_compression``, ``partial_images``, ``input_fidelity``, a ``background``
  or ``moderation`` other than ``auto``, an ``output_format`` other than ``jpeg`` (the model
  answers JPEG), ``stream: true``, and any field not listed here.
"""
from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from typing import Any

from gateway.answer import Answer
from gateway.errors import InvalidRequest
from gateway.images.inputs import image_data_urls
from gateway.usage import PROMPT_TOKENS_PER_IMAGE, Usage
from gateway.validate import invalid

ASPECT_RATIOS = ("1:1", "2:3", "3:2", "3:4", "4:3", "4:5", "5:4", "9:16", "16:9", "21:9")  # the model's
IMAGE_SIZES = ("1K", "2K", "4K")
QUALITIES = {"auto": "1K", "low": "1K", "medium": "1K", "standard": "1K", "high": "2K", "hd": "2K"}
FORMATS = ("b64_json", "url")
FIELDS = frozenset({"prompt", "model", "n", "size", "quality", "response_format", "user", "image_config"})
# Fields whose only value the model honours is its default: accepted with that value, else refused.
NEUTRAL = {"background": "auto", "moderation": "auto", "output_format": "jpeg", "stream": False}
_SIZE = re.compile(r"([1-9][0-9]{0,4})x([1-9][0-9]{0,4})")


@dataclass(frozen=True, slots=True)
class ImagesRequest:
    prompt: str
    model: str | None  # None: the first configured model
    n: int
    image_config: dict[str, str]  # what goes to the provider: aspect_ratio and/or image_size
    response_format: str | None  # None: the team's images.delivery decides
    user: str | None
    images: tuple[tuple[str, str], ...] = ()  # edits: (param, data URL) of each input image


def unsupported(param: str, why: str) -> InvalidRequest:
    return InvalidRequest(f"{param}: {why}", code="unsupported_parameter", param=param)


def parse(body: Any, *, max_n: int, images: tuple[tuple[str, str], ...] = (), edit: bool = False) -> ImagesRequest:
    """An Images API body (``images``: an edit's input images, already read) -> ImagesRequest."""
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    for name, value in body.items():
        if name in FIELDS or (edit and name == "images") or value is None:
            continue
        if name in NEUTRAL and value == NEUTRAL[name]:
            continue
        if name in NEUTRAL:
            raise unsupported(name, f"only {NEUTRAL[name]!r} is supported by this model")
        raise unsupported(name, "is not supported by this model")
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise invalid("prompt", "is required (a non-empty string)")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise invalid("model", "must be a string")
    n = 1 if body.get("n") is None else body["n"]
    if type(n) is not int or not 1 <= n <= max_n:
        raise invalid("n", f"must be an integer from 1 to {max_n}; got {n!r}")
    fmt = body.get("response_format")
    if fmt is not None and fmt not in FORMATS:
        raise invalid("response_format", f"must be b64_json or url; got {fmt!r}")
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise invalid("user", "must be a string")
    return ImagesRequest(prompt=prompt, model=model, n=n, image_config=image_config(body), response_format=fmt,
                         user=user, images=images)


def image_config(body: dict) -> dict[str, str]:
    """``size`` and ``quality`` as the provider's ``image_config``; the client's own wins, key by key."""
    config: dict[str, str] = {}
    size = body.get("size")
    if size is not None and size != "auto":
        match = _SIZE.fullmatch(size) if isinstance(size, str) else None
        if match is None:
            raise invalid("size", f"must be auto or WIDTHxHEIGHT (1536x1024); got {size!r}")
        width, height = int(match[1]), int(match[2])
        config["aspect_ratio"] = nearest_ratio(width, height)
        longer = max(width, height)
        config["image_size"] = "1K" if longer <= 1024 else "2K" if longer <= 2048 else "4K"
    quality = body.get("quality")
    if quality is not None:
        if quality not in QUALITIES:
            raise invalid("quality", f"must be one of {', '.join(QUALITIES)}; got {quality!r}")
        config.setdefault("image_size", QUALITIES[quality])
    given = body.get("image_config")
    if given is None:
        return config
    if not isinstance(given, dict):
        raise invalid("image_config", "must be an object with aspect_ratio and/or image_size")
    for key, allowed in (("aspect_ratio", ASPECT_RATIOS), ("image_size", IMAGE_SIZES)):
        value = given.get(key)
        if value is not None and value not in allowed:
            raise invalid(f"image_config.{key}", f"must be one of {', '.join(allowed)}; got {value!r}")
    other = sorted(set(given) - {"aspect_ratio", "image_size"})
    if other:
        raise unsupported(f"image_config.{other[0]}", "is not supported by this model")
    return {**config, **{k: v for k, v in given.items() if v is not None}}


def nearest_ratio(width: int, height: int) -> str:
    """The model's aspect ratio closest to ``width``:``height`` (on a log scale: 2:1 and 1:2 are as far from 1:1)."""
    want = math.log(width / height)

    def distance(ratio: str) -> float:
        w, h = ratio.split(":")
        return abs(math.log(int(w) / int(h)) - want)

    return min(ASPECT_RATIOS, key=distance)


def chat_body(req: ImagesRequest, model: str) -> dict[str, Any]:
    """The chat call one image becomes: the prompt, then the input images, in one user message."""
    content: list[dict] = [{"type": "text", "text": req.prompt}]
    content += [{"type": "image_url", "image_url": {"url": url}} for _, url in req.images]
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": content}],
                            "modalities": ["image", "text"]}
    if req.image_config:
        body["image_config"] = req.image_config
    if req.user is not None:
        body["user"] = req.user
    return body


def image_param(param: str, req: ImagesRequest) -> str:
    """The client's name for a chat part validation named (``messages[0].content[2]`` -> ``image[1]``)."""
    match = re.fullmatch(r"messages\[0\]\.content\[([0-9]+)\](.*)", param or "")
    if match is None or not 1 <= int(match[1]) <= len(req.images):
        return param
    return req.images[int(match[1]) - 1][0]


def data_items(answer: Answer) -> list[tuple[str, str | None]]:
    """(data URL, revised prompt) of each image of a chat answer; the text the model said with
    them is the revised prompt."""
    text = "".join(c.content for c in answer.choices).strip() or None
    return [(url, text) for choice in answer.choices for url in image_data_urls(choice) if url is not None]


def usage_object(usages: list[Usage]) -> dict[str, Any]:
    """OpenAI's ``usage`` over every call the request made. The provider does not split the
    prompt's tokens: input images are counted at the gateway's estimate per image, the rest is text."""
    prompt = sum(u.prompt for u in usages)
    completion = sum(u.completion for u in usages)
    image_tokens = min(prompt, sum(PROMPT_TOKENS_PER_IMAGE * u.images_in for u in usages))
    return {"input_tokens": prompt, "output_tokens": completion, "total_tokens": prompt + completion,
            "input_tokens_details": {"text_tokens": prompt - image_tokens, "image_tokens": image_tokens}}


def answer(data: list[dict[str, str]], usages: list[Usage]) -> dict[str, Any]:
    return {"created": int(time.time()), "data": data, "usage": usage_object(usages)}
