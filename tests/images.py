"""Real images for tests, made with Pillow."""
from __future__ import annotations

import base64
import io
import os

from PIL import Image


def image_bytes(fmt: str = "PNG", size: tuple[int, int] = (64, 48), color=(200, 30, 30), noise: bool = False) -> bytes:
    if noise:
        img = Image.frombytes("RGB", size, os.urandom(size[0] * size[1] * 3))
    else:
        img = Image.new("RGB", size, color)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def png_url(color=(200, 30, 30), size=(64, 48)) -> str:
    return data_url(image_bytes("PNG", size, color))


def decode_data_url(url: str) -> bytes:
    head, _, payload = url.partition(",")
    assert head.endswith(";base64"), head
    return base64.b64decode(payload)


def open_image(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img
