"""Input images: decode them with Pillow (refusing what the provider would) and describe them.

Runs in a worker thread: a 7 MB PNG takes tens of milliseconds to decode. JPEGs are decoded
at reduced scale (``draft``) because the simulator only ever needs them at output size.
"""
from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image

from . import errors

ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF")
# Never need more pixels than a 4K output has along its long side.
_MAX_SIDE = 5504


@dataclass(frozen=True)
class InputImage:
    """A decoded input: its original format and size, and its pixels as RGB."""

    format: str
    width: int
    height: int
    pixels: Image.Image


def load(data: bytes) -> InputImage:
    """Decode one image fully (a truncated file fails here, not later); else invalid_image."""
    try:
        image = Image.open(io.BytesIO(data))
        if image.format not in ACCEPTED_FORMATS:
            raise errors.invalid_image()
        width, height = image.size
        if image.format == "JPEG":
            image.draft("RGB", (_MAX_SIDE, _MAX_SIDE))
        pixels = image.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        raise errors.invalid_image() from None
    return InputImage(image.format, width, height, pixels)


def load_all(blobs: tuple[bytes, ...]) -> list[InputImage]:
    return [load(blob) for blob in blobs]


def describe(images: list[InputImage]) -> str:
    """The vision answer: what a test can check (count, formats, sizes) in plain words."""
    if not images:
        return "I see no images in this conversation."
    noun = "image" if len(images) == 1 else "images"
    details = "; ".join(
        f"image {i} is a {image.format} of {image.width}x{image.height} pixels"
        for i, image in enumerate(images, 1)
    )
    return f"I see {len(images)} {noun}: {details}."
