"""Generated images as links: each data URL of an answer stored once and replaced in place.

``Links`` stores an image and hands out its link (the gateway's signed route, or the object
store's presigned URL). ``rewrite_body`` turns a JSON answer's
``choices[i].message.images[j].image_url.url`` data URLs into links, ``rewrite_event`` one SSE
event's ``choices[i].delta.images[j].image_url.url``: everything else stays byte for byte.

Both work on the bytes: the answer is parsed once (``gateway.answer``, which the relay has done
already for a body), each data URL is found in the bytes by its text and the link spliced in,
so a 10 MB body is never re-encoded. Only a body whose URLs are spelled with JSON escapes
(``\\/``) is parsed again and re-dumped. Finding and decoding a big image (pybase64) runs in a
thread, off the event loop. A data URL that is not a base64 PNG/JPEG/WebP/GIF is left as it is;
so is every image when the storage fails (the answer is paid for: it still reaches the client).
"""
from __future__ import annotations

import asyncio
import logging
from typing import Iterator

import orjson
import pybase64

from gateway import answer
from gateway.images.inputs import MIME_ALIASES, sniff
from gateway.images.links import LinkSigner
from gateway.images.storage import EXTENSIONS, OFFLOAD_BYTES, ImageStorage
from gateway.store import StoreError
from gateway.upstream.sse import count_images, event_data

log = logging.getLogger(__name__)

_HEAD = 64  # characters of a data URL searched for before the whole is compared


class Links:
    """One request's links: images go to ``storage`` for ``ttl_s``; links are signed by
    ``signer`` under ``base_url`` (how the client reaches the gateway) unless presigned."""

    def __init__(self, storage: ImageStorage, signer: LinkSigner, *, base_url: str, ttl_s: int) -> None:
        self.storage, self.signer, self.base_url, self.ttl_s = storage, signer, base_url, ttl_s

    async def link(self, data: bytes | memoryview, content_type: str) -> str:
        """Store an image (once, whoever asks) and return a fresh link to it. StoreError."""
        name = await self.storage.put(data, content_type, ttl_s=self.ttl_s)
        presigned = await self.storage.presigned_url(name, self.ttl_s)
        return presigned or self.signer.url(self.base_url, name, self.ttl_s)

    async def link_data_url(self, url: str) -> str | None:
        """The link for a base64 image data URL, or None to leave it as it is."""
        image = await asyncio.to_thread(decode, url) if len(url) > OFFLOAD_BYTES else decode(url)
        if image is None:
            return None
        try:
            return await self.link(*image)
        except StoreError as e:
            log.warning("image kept inline: the image storage failed: %s", e)
            return None


def decode(url: str) -> tuple[bytes, str] | None:
    """(bytes, MIME type) of a base64 data URL of an image type links serve, else None."""
    head, comma, data = url.partition(",")
    if not comma or len(head) > _HEAD or not head.lower().endswith(";base64"):
        return None
    try:
        raw = pybase64.b64decode(data, validate=True)
    except ValueError:
        return None
    mime = sniff(raw[:12]) or MIME_ALIASES.get(head[5:-7].lower())
    return (raw, mime) if mime in EXTENSIONS else None


def _data_url(part: dict) -> str | None:
    """An image part's ``image_url.url`` if it is a data URL."""
    image_url = part.get("image_url")
    url = image_url.get("url") if isinstance(image_url, dict) else None
    return url if isinstance(url, str) and url[:5].lower() == "data:" else None


def _data_urls(parsed: answer.Answer) -> Iterator[str]:
    for choice in parsed.choices:
        yield from filter(None, map(_data_url, choice.images))


def _locate(body: bytes | bytearray, urls: list[str], start: int) -> list[tuple[int, int]] | None:
    """Each URL's span in ``body``, in order, as a whole JSON string; None if one is not
    spelled there as it reads (JSON escapes)."""
    spans, pos, view = [], start, memoryview(body)
    for url in urls:
        text = url.encode()
        at = body.find(text[:_HEAD], pos)
        while at != -1 and not (view[at:at + len(text)] == text and body[at - 1:at] == b'"'
                                and body[at + len(text):at + len(text) + 1] == b'"'):
            at = body.find(text[:_HEAD], at + 1)
        if at == -1:
            return None
        spans.append((at, at + len(text)))
        pos = at + len(text)
    return spans


async def rewrite_body(body: bytes | bytearray, parsed: answer.Answer, links: Links, *, start: int = 0) -> bytes:
    """``body`` (parsed as ``parsed``) with its images' data URLs replaced by links; ``start``:
    where its JSON begins (an SSE event's payload)."""
    urls = list(_data_urls(parsed))
    if not urls:
        return bytes(body)
    big = len(body) > OFFLOAD_BYTES
    spans = await asyncio.to_thread(_locate, body, urls, start) if big else _locate(body, urls, start)
    if spans is None:
        return await _rewrite_parsed(body[start:], links, prefix=body[:start])
    pieces, pos, view = [], 0, memoryview(body)
    for url, (at, end) in zip(urls, spans):
        link = await links.link_data_url(url)
        if link is not None:
            pieces += [view[pos:at], orjson.dumps(link)[1:-1]]
            pos = end
    pieces.append(view[pos:])
    return b"".join(pieces)


async def _rewrite_parsed(payload: bytes | bytearray, links: Links, *, prefix: bytes | bytearray) -> bytes:
    """The slow path: parse, replace, dump (a body whose URLs the bytes spell with escapes)."""
    obj = await asyncio.to_thread(orjson.loads, payload) if len(payload) > OFFLOAD_BYTES else orjson.loads(payload)
    for choice in obj.get("choices") or ():
        message = choice.get("message") or choice.get("delta") or {}
        for part in message.get("images") or ():
            url = _data_url(part)
            if url is not None and (link := await links.link_data_url(url)) is not None:
                part["image_url"]["url"] = link
    return bytes(prefix) + orjson.dumps(obj)


async def rewrite_event(event: bytes | bytearray, links: Links) -> bytes:
    """One SSE event (as ``EventScanner.feed`` gives it, without its separator) with its images
    as links; an event without images is returned as it is. UpstreamBadResponse if it is not a
    provider event."""
    if not count_images(event):
        return bytes(event)
    payload = event_data(event)
    if payload is None or payload == b"[DONE]":
        return bytes(event)
    big = len(payload) > OFFLOAD_BYTES
    parsed = await asyncio.to_thread(answer.loads, payload, chunk=True) if big else answer.loads(payload, chunk=True)
    if event.startswith(b"data:") and b"\n" not in event:  # the usual shape: splice in place
        return await rewrite_body(event, parsed, links, start=len(event) - len(payload))
    fields = [line for line in bytes(event).splitlines() if not line.startswith(b"data:")]
    new = await rewrite_body(bytes(payload), parsed, links)
    return b"\n".join([*fields, *(b"data: " + line for line in new.split(b"\n"))])
