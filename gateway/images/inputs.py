"""Inline images: base64 data URLs, checked by their magic bytes (never decoded as pictures).

``check_data_url`` turns ``data:<mime>;base64,<data>`` (a str, or the raw bytes of the JSON
string) into ``(mime, decoded size)`` or raises ``InvalidRequest(code="invalid_image",
param=<the part>)``; ``sha256_hex`` hashes the decoded bytes of an accepted one, only when the
cache needs it. The gateway fetches nothing, so any other URL is refused.

The base64 is decoded in slices of ``SLICE`` characters, each one dropped (or hashed) before the
next. So no decoded copy of a whole image ever exists, an oversized image is refused as soon as
it crosses the limit, a wrong magic number as soon as the first slice is decoded, and a thread
running this hands the GIL back to the event loop between slices.

Base64 must be strictly valid (``binascii.a2b_base64(strict_mode=True)``: standard alphabet,
correct padding), except that ASCII whitespace (space, tab, CR, LF) is ignored, so the same
image wrapped at 76 columns or not gives the same facts. Slices are decoded by pybase64 (SIMD,
~20x binascii); what it refuses goes to binascii, so binascii's strict rules stay the judge.

The provider's answers carry images as data URLs too: ``image_data_url`` reads one from an
answer's image part, ``decode_data_url`` decodes one whole (what the cache keeps and the links
store), strictly or by binascii's lenient rules.
"""
from __future__ import annotations

import hashlib
import re
from binascii import a2b_base64
from collections.abc import Iterator

import orjson
import pybase64

from gateway.answer import Choice
from gateway.errors import InvalidRequest

MIME_ALIASES = {
    "image/png": "image/png",
    "image/jpeg": "image/jpeg",
    "image/jpg": "image/jpeg",
    "image/webp": "image/webp",
    "image/gif": "image/gif",
}
FORMAT_NAMES = {"image/png": "PNG", "image/jpeg": "JPEG", "image/webp": "WEBP", "image/gif": "GIF"}

SLICE = 1 << 20  # base64 characters decoded at a time; a multiple of 4
_HEAD = 12  # bytes needed to tell the formats apart (WEBP: RIFF....WEBP)
_MAX_HEADER = 64  # characters between "data:" and the comma
WHITESPACE = b" \t\r\n"  # ignored between base64 characters
_MIME = re.compile(r"[a-z0-9.+-]+/[a-z0-9.+-]+")


def _strict_b64decode(data: str | bytes | memoryview) -> bytes:
    """``a2b_base64(data, strict_mode=True)``, fast for the usual, valid input.

    pybase64 with ``validate=True`` accepts a subset of what binascii's strict mode accepts,
    decoded to the same bytes (binascii also takes, e.g., a stray ``=`` after a full group), so
    only input pybase64 refuses is handed to binascii, which accepts it or raises as before.
    """
    try:
        return pybase64.b64decode(data, validate=True)
    except ValueError:  # binascii.Error is a ValueError
        return a2b_base64(data, strict_mode=True)


def _b64decode_lenient(text: str) -> bytes:
    """``a2b_base64(text, strict_mode=False)``, fast for the usual, canonical text.

    What pybase64 takes with ``validate=True`` binascii decodes to the same bytes; anything
    else (line breaks, odd padding) goes to binascii, whose lenient rules decide as before.
    """
    try:
        return pybase64.b64decode(text, validate=True)
    except ValueError:
        return a2b_base64(text, strict_mode=False)


def image_data_url(part: dict) -> str | None:
    """An answer's image part's ``image_url.url`` if it is a data URL, else None."""
    image_url = part.get("image_url")
    url = image_url.get("url") if isinstance(image_url, dict) else None
    return url if isinstance(url, str) and url[:5].lower() == "data:" else None


def image_data_urls(choice: Choice) -> list[str | None]:
    """``image_data_url`` of each image part of one choice of the provider's answer."""
    return [image_data_url(part) for part in choice.images]


def decode_data_url(url: str, *, strict: bool) -> tuple[str, bytes] | None:
    """(declared MIME type, decoded bytes) of a ``data:<type>[;...];base64,<data>`` URL, or None.

    ``strict``: binascii's strict base64 rules, else its lenient ones (line breaks, odd padding:
    what the provider's answers have always been kept as)."""
    comma = url.find(",", 0, 5 + _MAX_HEADER + 1)
    if url[:5].lower() != "data:" or comma < 0:
        return None
    mime, *params = url[5:comma].lower().split(";")
    if params[-1:] != ["base64"] or not _MIME.fullmatch(mime):
        return None
    try:
        return mime, (_strict_b64decode if strict else _b64decode_lenient)(url[comma + 1:])
    except ValueError:  # binascii.Error is a ValueError
        return None


def sniff(head: bytes) -> str | None:
    """The MIME type that the first bytes of an image announce, or None."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if head.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "image/gif"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    return None


def _mb(n: int) -> str:
    mb = f"{n / (1024 * 1024):.2f}".rstrip("0").rstrip(".")
    return f"{n} bytes" if mb == "0" else f"{mb} MB"


def check_data_url(url: str | bytes | memoryview, *, param: str, max_bytes: int,
                   whitespace: bytes = WHITESPACE) -> tuple[str, int]:
    """``(mime, decoded size)`` of a base64 image data URL, or InvalidRequest.

    ``url`` is the value (a str) or its raw bytes in the JSON text (a cut string: see
    ``gateway.bigstrings``), where only a space may stand between base64 characters (a raw
    tab or newline in a JSON string makes the body invalid JSON: pass ``whitespace=b" "``)."""

    def bad(what: str) -> InvalidRequest:
        return InvalidRequest(f"{param}: {what}", code="invalid_image", param=param)

    data = _bytes(url)
    head_b = bytes(data[:5 + _MAX_HEADER])
    head = head_b.decode("utf-8", "replace")
    if head[:5].lower() != "data:":
        if head[:8].lower().startswith(("http://", "https://")):
            raise bad("remote image URLs are not fetched; send the image inline as a base64 "
                      "data URL (data:image/png;base64,...)")
        raise bad("the image must be a base64 data URL (data:<mime>;base64,<data>); "
                  "the gateway fetches no URLs")
    comma = head_b.find(b",", 5)
    declared, sep, encoding = head_b[5:max(comma, 5)].decode("utf-8", "replace").lower().rpartition(";")
    if not sep or encoding != "base64":
        raise bad("the image must be a base64 data URL of the form data:<mime>;base64,<data>")
    mime = MIME_ALIASES.get(declared)
    if mime is None:
        raise bad(f"image type {orjson.dumps(declared[:40]).decode()} is not supported; use image/png, image/jpeg, "
                  "image/webp or image/gif")

    size = 0
    head_bytes = b""
    not_base64 = bad("the image's base64 is not valid (truncated, or not standard base64)")
    for piece in _decoded(data, comma + 1, whitespace, not_base64):
        size += len(piece)
        if size > max_bytes:
            estimate = max(size, (len(data) - comma - 1) * 3 // 4)
            raise bad(f"the image is about {_mb(estimate)} decoded; the limit is "
                      f"{_mb(max_bytes)} per image")
        if len(head_bytes) < _HEAD:
            head_bytes += piece[:_HEAD - len(head_bytes)]
            if len(head_bytes) == _HEAD:
                _check_magic(head_bytes, mime, bad)
    if size == 0:
        raise bad("the image data is empty")
    if len(head_bytes) < _HEAD:
        _check_magic(head_bytes, mime, bad)
    return mime, size


def sha256_hex(url: str | bytes | memoryview) -> str:
    """The SHA-256 of the decoded bytes of a data URL that ``check_data_url`` accepted.

    Slice by slice: hashlib hands the GIL back while it hashes a slice, so a thread running this
    leaves the event loop free."""
    data = _bytes(url)
    digest = hashlib.sha256()
    comma = bytes(data[:5 + _MAX_HEADER]).find(b",", 5)
    for piece in _decoded(data, comma + 1, WHITESPACE, ValueError("not base64")):
        digest.update(piece)
    return digest.hexdigest()


def _bytes(url: str | bytes | memoryview) -> memoryview:
    return memoryview(url.encode("utf-8", "surrogatepass") if isinstance(url, str) else url)


def _decoded(data: memoryview, start: int, whitespace: bytes, not_base64: Exception) -> Iterator[bytes]:
    """The decoded bytes of ``data[start:]``, ``SLICE`` characters at a time; raises ``not_base64``."""
    carry = b""  # slow path: the last partial 4-character group, kept for the next slice
    slow = False  # whitespace (or an error) seen: strip whitespace and re-align the groups
    padded = False  # the last group decoded ended in "=": nothing may follow
    for pos in range(start, len(data), SLICE):
        text = data[pos:pos + SLICE]
        piece = None
        if not slow:
            try:
                piece = _strict_b64decode(text)
                last = text[-1]
            except ValueError:
                slow = True
        if slow:
            chunk = carry + bytes(text).translate(None, whitespace)
            cut = len(chunk) - len(chunk) % 4
            carry = chunk[cut:]
            if not cut:
                continue
            try:
                piece = _strict_b64decode(memoryview(chunk)[:cut])
            except ValueError:
                raise not_base64 from None
            last = chunk[cut - 1]
        if padded:
            raise not_base64
        padded = last == 0x3D  # "="
        yield piece
    if carry:
        raise not_base64


def _check_magic(head: bytes, mime: str, bad) -> None:
    actual = sniff(head)
    if actual == mime:
        return
    if actual is None:
        raise bad(f"declared {mime} but the bytes are not a PNG, JPEG, WEBP or GIF image")
    raise bad(f"declared {mime} but the bytes are {FORMAT_NAMES[actual]}")
