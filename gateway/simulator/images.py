"""Output images: real, decodable JPEGs that are cheap to make and deterministic.

Every picture is a pure function of the request digest (prompt text, seed, image_config,
input bytes), so the same request gives byte-identical JPEG bytes and a different prompt a
different picture. Text-to-image paints a hash-coloured gradient with a few shapes on a small
canvas and scales it up (a 4K image costs ~0.1 s, not seconds); an edit is the input fitted to
the output size and tinted; a composition tiles the inputs over such a gradient. ``Renderer``
keeps the last few JPEGs in a small LRU, since tests and benchmarks repeat requests.

``pad_jpeg`` inflates a JPEG to a given size with comment segments of pseudo-random bytes
(still a valid JPEG), for the ``image_mb`` fault: 30 MB in a few tens of milliseconds.
"""
from __future__ import annotations

import base64
import hashlib
import io
import math
import threading
from collections import OrderedDict

from PIL import Image, ImageDraw, ImageOps

from .inputs import InputImage

# Gemini 3 Pro Image output sizes at 1K; 2K and 4K are these times 2 and 4.
_SIZES_1K = {
    "1:1": (1024, 1024),
    "2:3": (848, 1264),
    "3:2": (1264, 848),
    "3:4": (896, 1200),
    "4:3": (1200, 896),
    "4:5": (928, 1152),
    "5:4": (1152, 928),
    "9:16": (768, 1376),
    "16:9": (1376, 768),
    "21:9": (1584, 672),
}
_SCALE = {"1K": 1, "2K": 2, "4K": 4}
_CANVAS_DIVISOR = 8  # shapes are drawn at 1/8 of the output size, then scaled up
_TINT = 0.2  # how much of the prompt's colour an edit or composition takes on
_JPEG_QUALITY = 90
_COM_PAYLOAD = 65533  # the largest JPEG comment segment payload


def output_size(image_size: str, aspect_ratio: str | None, inputs: list[InputImage]) -> tuple[int, int]:
    """Pixel size of the answer. With no aspect ratio asked, edits keep the input's shape."""
    if aspect_ratio is None:
        aspect_ratio = _closest_aspect(inputs[0].width, inputs[0].height) if inputs else "1:1"
    width, height = _SIZES_1K[aspect_ratio]
    scale = _SCALE[image_size]
    return width * scale, height * scale


def _closest_aspect(width: int, height: int) -> str:
    target = math.log(width / height)
    return min(_SIZES_1K, key=lambda name: abs(math.log(_SIZES_1K[name][0] / _SIZES_1K[name][1]) - target))


class Renderer:
    """Makes answer images as data URLs, remembering the last ``cache_size`` JPEGs.

    Thread-safe: the app calls it from worker threads so encoding never blocks the loop.
    """

    def __init__(self, cache_size: int = 16) -> None:
        self._cache: OrderedDict[tuple, bytes] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def data_url(
        self, digest: bytes, size: tuple[int, int], inputs: list[InputImage], min_bytes: int = 0
    ) -> str:
        jpeg = pad_jpeg(self.jpeg(digest, size, inputs), min_bytes, digest)
        return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii")

    def jpeg(self, digest: bytes, size: tuple[int, int], inputs: list[InputImage]) -> bytes:
        key = (digest, size)  # the digest already covers the input bytes
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        out = io.BytesIO()
        paint(digest, size, inputs).save(out, "JPEG", quality=_JPEG_QUALITY)
        jpeg = out.getvalue()
        with self._lock:
            self._cache[key] = jpeg
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return jpeg


def paint(digest: bytes, size: tuple[int, int], inputs: list[InputImage]) -> Image.Image:
    """Text-to-image with no inputs, an edit with one, a composition with several."""
    if len(inputs) == 1:
        picture = ImageOps.fit(inputs[0].pixels, size, Image.Resampling.BILINEAR)
    else:
        picture = _synthesize(digest, size)
        if inputs:
            _tile(picture, inputs)
    if inputs:
        picture = Image.blend(picture, Image.new("RGB", size, _colour(digest, 0)), _TINT)
    return picture


def _synthesize(digest: bytes, size: tuple[int, int]) -> Image.Image:
    """A gradient between two hash colours at a hash angle, with three hash shapes on top."""
    canvas_size = (max(1, size[0] // _CANVAS_DIVISOR), max(1, size[1] // _CANVAS_DIVISOR))
    angle = digest[15] * 360 / 256
    mask = Image.linear_gradient("L").rotate(angle, Image.Resampling.BILINEAR).resize(canvas_size)
    canvas = Image.composite(
        Image.new("RGB", canvas_size, _colour(digest, 0)),
        Image.new("RGB", canvas_size, _colour(digest, 3)),
        mask,
    )
    draw = ImageDraw.Draw(canvas)
    width, height = canvas_size
    for i in range(3):
        x0, y0, x1, y1 = digest[16 + 4 * i : 20 + 4 * i]
        box = (
            min(x0, x1) * width // 256,
            min(y0, y1) * height // 256,
            max(x0, x1) * width // 256 + 1,
            max(y0, y1) * height // 256 + 1,
        )
        shape = draw.ellipse if digest[6 + 3 * i] & 1 else draw.rectangle
        shape(box, fill=_colour(digest, 6 + 3 * i))
    return canvas.resize(size, Image.Resampling.BILINEAR)


def _tile(picture: Image.Image, inputs: list[InputImage]) -> None:
    """Paste the inputs over ``picture`` in a near-square grid, in order, row by row."""
    columns = math.ceil(math.sqrt(len(inputs)))
    rows = math.ceil(len(inputs) / columns)
    tile = (picture.width // columns, picture.height // rows)
    for i, image in enumerate(inputs):
        fitted = ImageOps.fit(image.pixels, tile, Image.Resampling.BILINEAR)
        picture.paste(fitted, ((i % columns) * tile[0], (i // columns) * tile[1]))


def _colour(digest: bytes, offset: int) -> tuple[int, int, int]:
    return digest[offset], digest[offset + 1], digest[offset + 2]


def pad_jpeg(jpeg: bytes, min_bytes: int, digest: bytes) -> bytes:
    """``jpeg`` grown to at least ``min_bytes`` by comment segments placed before its image data.

    The padding is pseudo-random (incompressible) but deterministic; decoders skip comments,
    so the picture is unchanged. Inserted after the JFIF APP0 header when there is one.
    """
    missing = min_bytes - len(jpeg)
    if missing <= 0:
        return jpeg
    count = math.ceil(missing / (_COM_PAYLOAD + 4))
    noise = hashlib.shake_128(digest).digest(count * _COM_PAYLOAD)
    header = (0xFFFE).to_bytes(2, "big") + (_COM_PAYLOAD + 2).to_bytes(2, "big")
    padding = b"".join(
        header + noise[i * _COM_PAYLOAD : (i + 1) * _COM_PAYLOAD] for i in range(count)
    )
    at = 2  # after SOI
    if jpeg[2:4] == b"\xff\xe0":  # keep APP0 (JFIF) first, as the JFIF spec asks
        at = 4 + int.from_bytes(jpeg[4:6], "big")
    return jpeg[:at] + padding + jpeg[at:]
