"""``GET /v1/images/files/{name}?expires=...&signature=...``: a stored image, by its signed link.

No key: the link is the credential (gateway/images/links.py). A wrong or missing signature is
403 ``invalid_signature``; a link past its expiry, or an image no longer stored, is 404
``image_not_found``. The answer has ``Content-Length``, a strong ``ETag`` (the image's sha256),
``Cache-Control: private, max-age=<seconds the link has left>`` and honours one ``Range``
(206 with ``Content-Range``; 416 past the end) and ``If-None-Match`` (304). The image is read
from the storage piece by piece as it is written, never whole. The observe middleware counts it
like every route, with its status and no team.

``image_links`` is how a route that answers with images learns whether they go out as links.
"""
from __future__ import annotations

import logging

from aiohttp import web

from gateway.config import ImagesConfig
from gateway.errors import Forbidden, InvalidRequest, NotFound, StoreUnavailable
from gateway.http.record import Phase
from gateway.http.state import CLOCK, IMAGE_STORAGE, RECORD, SNAPSHOT
from gateway.images.deliver import Links
from gateway.images.links import LinkSigner
from gateway.store import StoreError
from gateway.upstream.relay import write_counted

log = logging.getLogger(__name__)

DELIVERY_HEADER = "X-Image-Delivery"


def image_links(request: web.Request, images: ImagesConfig, *, delivery: str | None = None) -> Links | None:
    """``Links`` when this request's images go out as links, else None (inline). ``delivery``
    (an Images API ``response_format``) wins over the ``X-Image-Delivery`` header, which wins
    over ``images`` (the team's config). InvalidRequest for a bad header, or for links asked of
    a gateway without a signing key, naming the field that asked (the config cannot: it is
    refused at load without a key)."""
    header = request.headers.get(DELIVERY_HEADER)
    if header is not None and header.strip().lower() not in ("inline", "url"):
        raise InvalidRequest(f"{DELIVERY_HEADER} must be inline or url.", param=DELIVERY_HEADER)
    if delivery:
        asked, by = delivery, "response_format"
    else:
        asked, by = (header and header.strip().lower()) or images.delivery, DELIVERY_HEADER
    if asked != "url":
        return None
    if not images.signing_key:
        raise InvalidRequest(f"{by}: image links are not enabled on this gateway (it has no images.signing_key).",
                             param=by)
    return Links(request.app[IMAGE_STORAGE], LinkSigner(images.signing_key, clock=request.app[CLOCK]),
                 base_url=images.public_base_url or f"{request.scheme}://{request.host}", ttl_s=images.url_ttl_s)


def _not_found() -> NotFound:
    return NotFound("This image link has expired, or its image is no longer stored.", code="image_not_found")


async def image_file(request: web.Request) -> web.StreamResponse:
    app, rec, name = request.app, request[RECORD], request.match_info["name"]
    key = request[SNAPSHOT].config.images.signing_key  # none: links are off, and no link is ours
    left = LinkSigner(key, clock=app[CLOCK]).check(
        name, request.query.get("expires"), request.query.get("signature")) if key else None
    if left is None:
        raise Forbidden("This image link's signature is missing or wrong.", code="invalid_signature")
    if left <= 0:
        raise _not_found()
    storage = app[IMAGE_STORAGE]
    try:
        image = await storage.stat(name)
    except StoreError as e:
        log.warning("image link: the image storage failed: %s", e)
        raise StoreUnavailable() from None
    if image is None:
        raise _not_found()
    headers = {"Content-Type": image.content_type, "ETag": image.etag, "Accept-Ranges": "bytes",
               "Cache-Control": f"private, max-age={left}"}
    if image.etag in request.headers.get("If-None-Match", ""):
        return web.Response(status=304, headers={k: headers[k] for k in ("ETag", "Cache-Control")})
    start, stop, status = 0, image.size, 200
    if "Range" in request.headers:
        try:
            start, stop, _ = request.http_range.indices(image.size)
            status = 206
        except ValueError:  # not a single byte range we read: ignored, as RFC 9110 allows
            pass
        if start >= stop:
            return web.Response(status=416, headers={"Content-Range": f"bytes */{image.size}"})
        if status == 206:
            headers["Content-Range"] = f"bytes {start}-{stop - 1}/{image.size}"
    response = web.StreamResponse(status=status, headers=headers)
    response.content_length = stop - start
    await response.prepare(request)
    rec.status = status
    rec.reach(Phase.ANSWER_STARTED)
    if request.method != "HEAD":
        try:
            async for piece in storage.read(image, start, stop):
                await write_counted(response, piece, rec)
        except StoreError as e:  # the status line is out: the body can only be cut short
            log.warning("image link: the image could not be read to its end: %s", e)
            rec.error_code = "store_unavailable"
            response.force_close()
            return response
    await response.write_eof()
    rec.reach(Phase.ANSWER_FINISHED)
    return response
