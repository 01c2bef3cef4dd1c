"""``POST /v1/images/generations`` and ``/v1/images/edits``: OpenAI's Images API on the chat path.

    auth -> read (JSON, or an edit's multipart) -> map (images/openai.py) -> validate as a chat
         -> admit n -> n x chat.run (cache / single-flight -> upstream -> account) -> answer

Each of the ``n`` images is one chat call through ``chat.run``, the path ``/v1/chat/completions``
takes after admission, so limits, cache, usage, metrics and the access log see them as chat
calls: the request counts ``n`` requests and reserves ``n`` estimates, all admitted before any
call starts. A refusal of one refuses the request before anything reaches the provider, and the
ones admitted before it are released as if they never were (``Admission.release``): no request
in the ledger, none taken from ``requests_per_minute``. Input
images go through the chat validation (magic bytes, size, count), their errors named as the
client sent them (``image[1]``).

Partial failure: the ``n`` calls run concurrently. The answer has the images that came back
(``data`` shorter than ``n``, header ``x-images-failed``); only when none did is the request an
error, the first call's (the provider's error as it sent it). Every call is charged as it
would be alone: what the provider billed, nothing for a call it refused or that never reached it
(whether one did is each call's own ``Served.sent``, not the request's phase).
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import replace

import orjson
import pybase64
from aiohttp import web

from gateway import cache as cache_mod
from gateway import offload
from gateway.errors import GatewayError, InvalidRequest, RequestTooLarge, UpstreamBadResponse
from gateway.http.chat import Served, admitting, charged, identify, read_body, run
from gateway.http.files import image_links
from gateway.http.state import LIMITER, METRICS, RECORD, SNAPSHOT
from gateway.images import openai
from gateway.images.inputs import sniff
from gateway.usage import Usage
from gateway.validate import validate_async

log = logging.getLogger(__name__)

FILE_FIELDS = ("image", "image[]")
INT_FIELDS = ("n", "output_compression", "partial_images")  # multipart sends every field as text


async def generations(request: web.Request) -> web.StreamResponse:
    return await _images(request, edit=False)


async def edits(request: web.Request) -> web.StreamResponse:
    return await _images(request, edit=True)


async def _images(request: web.Request, *, edit: bool) -> web.StreamResponse:
    app, rec = request.app, request[RECORD]
    config = request[SNAPSHOT].config
    team = identify(request)
    req = await _read(request, config.server.max_body_bytes, team.images.max_n, edit=edit)
    if rec.trace is not None:
        rec.trace.choices(req.n)
    links = image_links(request, team.images, delivery=req.response_format)
    model = req.model or (config.models[0].id if config.models else "")
    try:
        body = openai.chat_body(req, model)
        chat = await validate_async(await offload.run(orjson.dumps, body, size=sum(len(url) for _, url in req.images)), config, team.limits)
    except InvalidRequest as e:  # named as the client sent it, not as the chat call it became
        param = openai.image_param(e.param, req)
        raise InvalidRequest(e.message.replace(e.param or "", param, 1), code=e.code, param=param) from None
    admissions = []
    try:
        async with admitting(request, team, chat) as (decision, deadline):
            for _ in range(req.n):
                admissions.append(await app[LIMITER].admit(team, chat, deadline=deadline))
    except BaseException:  # all or none: those admitted already are undone
        await asyncio.shield(asyncio.gather(*(a.release() for a in admissions)))
        raise
    served = [Served(deadline=deadline, collect=True) for _ in admissions]
    try:
        with app[METRICS].inflight(rec.team):  # one request in flight, however many calls
            outcomes = await asyncio.gather(*(run(request, chat, cache_mod.nth(decision, i), adm, s)
                                              for i, (adm, s) in enumerate(zip(admissions, served))),
                                            return_exceptions=True)
    finally:
        # A call cancelled before it started never settled: undo its admission (the others are
        # settled already, and release() is then a no-op).
        await asyncio.shield(asyncio.gather(*(a.release() for a in admissions)))
        rec.usage = _charged(served)
    headers = {**admissions[-1].headers, "x-cache": "HIT" if all(s.cached for s in served) else decision.label.upper()}
    rec.cache = headers["x-cache"].lower()
    data, failures = [], []
    for s, outcome in zip(served, outcomes):
        if isinstance(outcome, BaseException) and not isinstance(outcome, Exception):
            raise outcome  # cancelled: the client left, or the replica is stopping
        items = openai.data_items(s.answer) if s.answer is not None and outcome is None else []
        if items:
            data += [await _item(url, text, links) for url, text in items]
        else:
            failures.append(outcome if outcome is not None else _no_image(s))
    if not data:
        return _failed(failures[0], headers)
    if failures:
        log.warning("images request %s: %d of %d calls failed", rec.request_id, len(failures), len(served))
        headers["x-images-failed"] = str(len(failures))
    rec.first_byte()
    usages = [s.usage for s in served if s.usage is not None]
    body = await offload.run(orjson.dumps, openai.answer(data, usages), size=sum(map(_item_size, data)))
    return web.Response(body=body, content_type="application/json", headers=headers)


def _item_size(item: dict[str, str]) -> int:
    return len(item.get("b64_json", ""))


async def _item(url: str, text: str | None, links) -> dict[str, str]:
    """One ``data`` item: the link (``url``) or the base64 (``b64_json``), and the model's text.
    An image whose storage failed goes out as ``b64_json``: it is paid for."""
    link = await links.link_data_url(url) if links is not None else None
    item = {"url": link} if link is not None else {"b64_json": url.partition(",")[2]}
    if text is not None:
        item["revised_prompt"] = text
    return item


def _no_image(s: Served) -> GatewayError:
    if s.answer is not None and s.answer.blocked:
        return InvalidRequest("The model's safety filter blocked this image; try another prompt.",
                              code="content_policy_violation")
    return UpstreamBadResponse("The model answered without an image.")


def _failed(failure, headers: dict[str, str]) -> web.StreamResponse:
    """The request's answer when no image came back: the first call's failure."""
    if isinstance(failure, web.Response):  # the provider's error, as the chat route relays it
        return failure
    failure.headers = {**headers, **failure.headers}
    raise failure


def _charged(served: list[Served]) -> Usage:
    """What the calls were charged, added up, for the access log and metrics."""
    usages = [charged(s) for s in served if s.usage is not None]
    total = Usage(estimated=any(u.estimated for u in usages))
    for u in usages:
        total = replace(total, **{f: getattr(total, f) + getattr(u, f) for f in (
            "prompt", "completion", "image", "reasoning", "audio", "images_in", "images_out", "cost_usd")})
    return total


async def _read(request: web.Request, limit: int, max_n: int, *, edit: bool) -> openai.ImagesRequest:
    """The request's fields (and an edit's images as data URLs) -> ImagesRequest."""
    mime = (request.content_type or "").lower()
    if edit and mime == "multipart/form-data":
        fields, images = await _multipart(request, limit)
    else:
        raw = await read_body(request, limit)
        request[RECORD].bytes_in = len(raw)
        try:
            fields = await offload.run(orjson.loads, raw, size=len(raw))
        except orjson.JSONDecodeError as e:
            raise InvalidRequest(f"The request body is not valid JSON: {e.msg}", code="invalid_json") from None
        images = _json_images(fields.get("images")) if edit and isinstance(fields, dict) else ()
    req = openai.parse(fields, max_n=max_n, images=images, edit=edit)
    if edit and not req.images:
        raise InvalidRequest("image: an edit needs at least one input image (image or image[] files, or images)",
                             param="image")
    return req


def _json_images(images) -> tuple[tuple[str, str], ...]:
    """``images: [{"image_url": "data:..."}]`` -> ((param, data URL), ...)."""
    if images is None:
        return ()
    if not isinstance(images, list):
        raise InvalidRequest("images: must be an array of {\"image_url\": \"data:...\"}", param="images")
    out = []
    for i, item in enumerate(images):
        here = f"images[{i}]"
        url = item.get("image_url") if isinstance(item, dict) else None
        if isinstance(url, dict):
            url = url.get("url")
        if isinstance(item, dict) and "file_id" in item:
            raise openai.unsupported(f"{here}.file_id", "files are not stored here; send image_url (a data URL)")
        if not isinstance(url, str):
            raise InvalidRequest(f"{here}.image_url: must be a data URL string", param=f"{here}.image_url")
        out.append((here, url))
    return tuple(out)


async def _multipart(request: web.Request, limit: int) -> tuple[dict, tuple[tuple[str, str], ...]]:
    """A multipart edit's text fields and files (as data URLs, the type read from the bytes);
    413 as soon as the parts read are over ``limit``."""
    reader = await request.multipart()
    fields: dict = {}
    files: list[tuple[str, bytes, str]] = []
    size = 0
    while (part := await reader.next()) is not None:
        data = bytearray()
        while chunk := await part.read_chunk():
            data += chunk
            size += len(chunk)
            if size > limit:
                raise RequestTooLarge.over(limit)
        request[RECORD].bytes_in = size
        if part.name in FILE_FIELDS:
            declared = part.headers.get("Content-Type", "application/octet-stream").split(";")[0].strip().lower()
            files.append((part.name, bytes(data), sniff(bytes(data[:12])) or declared))
        elif part.name:
            fields[part.name] = _field(part.name, data.decode("utf-8", "replace"))
    several = len(files) > 1 or any(name == "image[]" for name, _, _ in files)
    encoded = await offload.run(_encode_all, [data for _, data, _ in files], size=size)
    images = tuple((f"image[{i}]" if several else "image", f"data:{mime};base64,{b64}")
                   for i, ((_, _, mime), b64) in enumerate(zip(files, encoded)))
    return fields, images


def _encode_all(files: list[bytes]) -> list[str]:
    return [pybase64.b64encode(data).decode() for data in files]


def _field(name: str, text: str):
    """A multipart text field as the JSON value it stands for."""
    if name in INT_FIELDS and text.strip().lstrip("-").isdigit():
        return int(text)
    if name == "stream":
        return text.strip().lower() == "true"
    if name == "image_config" and text.lstrip().startswith("{"):
        try:
            return orjson.loads(text)
        except orjson.JSONDecodeError:
            raise InvalidRequest("image_config: must be a JSON object", param="image_config") from None
    return text
