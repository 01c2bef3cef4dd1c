"""Generated images as links: each data URL of an answer stored once and replaced in place.

``Links`` stores an image and hands out its link (the gateway's signed route, or the object
store's presigned URL). ``rewrite_body`` turns a JSON answer's
``choices[i].message.images[j].image_url.url`` data URLs into links, ``rewrite_event`` one SSE
event's ``choices[i].delta.images[j].image_url.url``: everything else stays byte for byte.

Both work on the bytes: the answer is parsed once (``gateway.answer``, which the relay has done
already for a body), each data URL is found in the bytes by its text and the link spliced in,
so a 10 MB body is never re-encoded. Only a body whose URLs are spelled with JSON escapes
(``\\/``) is parsed again and re-dumped. Finding and decoding a big image runs off the event
loop (``gateway.offload``). A data URL that is not a base64 PNG/JPEG/WebP/GIF is left as it is;
so is every image when the storage fails (the answer is paid for: it still reaches the client).
"""
from __future__ import annotations

import functools
import logging
from typing import Iterator

import orjson

from gateway import answer, offload
from gateway.images.inputs import (
    MIME_ALIASES,
    decode_data_url,
    image_data_url,
    image_data_urls,
    sniff,
)
from gateway.images.links import LinkSigner
from gateway.images.storage import EXTENSIONS, ImageStorage
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
        image = await offload.run(_linkable, url, size=len(url))
        if image is None:
            return None
        try:
            return await self.link(*image)
        except StoreError as e:
            log.warning("image kept inline: the image storage failed: %s", e)
            return None


def _linkable(url: str) -> tuple[bytes, str] | None:
    """(bytes, MIME type) of a base64 data URL of an image type links serve, else None."""
    decoded = decode_data_url(url, strict=True)
    if decoded is None:
        return None
    declared, raw = decoded
    mime = sniff(raw[:12]) or MIME_ALIASES.get(declared)
    return (raw, mime) if mime in EXTENSIONS else None


def _data_urls(parsed: answer.Answer) -> Iterator[str]:
    for choice in parsed.choices:
        yield from filter(None, image_data_urls(choice))


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
    spans = await offload.run(_locate, body, urls, start, size=len(body))
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
    obj = await offload.run(orjson.loads, payload, size=len(payload))
    for choice in obj.get("choices") or ():
        message = choice.get("message") or choice.get("delta") or {}
        for part in message.get("images") or ():
            url = image_data_url(part)
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
    parsed = await offload.run(functools.partial(answer.loads, chunk=True), payload, size=len(payload))
    if event.startswith(b"data:") and b"\n" not in event:  # the usual shape: splice in place
        return await rewrite_body(event, parsed, links, start=len(event) - len(payload))
    fields = [line for line in bytes(event).splitlines() if not line.startswith(b"data:")]
    new = await rewrite_body(bytes(payload), parsed, links)
    return b"\n".join([*fields, *(b"data: " + line for line in new.split(b"\n"))])
