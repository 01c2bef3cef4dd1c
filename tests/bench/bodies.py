"""The request bodies the bench sends, written once to files (wrk and the client read them).

Each body names the upstream's answer in its first field, ``"bench"`` (see upstream.py); the
gateway forwards unknown fields untouched, and the model is the upstream id, so the gateway
forwards the client's own bytes.
"""
from __future__ import annotations

import base64
import random
from pathlib import Path

import orjson

MODEL = "google/gemini-3-pro-image-preview"
PROMPT = "A red fox curled up in fresh snow at dawn, watercolor, soft light"
BIG_REQUEST_BYTES = 60 * 1000 * 1000  # the 60 MB request ...
BIG_REQUEST_IMAGES = 14  # ... carrying 14 images (~3.2 MB each decoded, under the 7 MB limit)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def text_to_image(mode: str, **extra) -> bytes:
    return orjson.dumps({"bench": mode, "model": MODEL, "messages": [{"role": "user", "content": PROMPT}], **extra})


def composition(total_bytes: int = BIG_REQUEST_BYTES, images: int = BIG_REQUEST_IMAGES) -> bytes:
    """A composition request of ``total_bytes`` with ``images`` distinct PNG data URLs."""
    rnd = random.Random(60)
    per_image_b64 = (total_bytes - 2000) // images // 4 * 4
    parts: list[dict] = [{"type": "text", "text": "Combine these photos into one group portrait."}]
    for i in range(images):
        raw = PNG_MAGIC + rnd.randbytes(per_image_b64 // 4 * 3 - len(PNG_MAGIC))
        url = "data:image/png;base64," + base64.b64encode(raw).decode()
        # both shapes the gateway accepts: the provider's and OpenAI's
        parts.append({"type": "image", "image": url} if i % 2 else {"type": "image_url", "image_url": {"url": url}})
    return orjson.dumps({"bench": "small", "model": MODEL, "messages": [{"role": "user", "content": parts}]})


def write_bodies(workdir: Path) -> dict[str, Path]:
    bodies = {
        "small": text_to_image("small"),
        "big_json": text_to_image("big_json"),
        "big_sse": text_to_image("big_sse", stream=True),
        "small_sse": text_to_image("small_sse", stream=True),
        "img2k": text_to_image("img2k", image_config={"image_size": "2K"}),
        "img4k": text_to_image("img4k", image_config={"image_size": "4K"}),
        "slow": text_to_image("slow"),
        "composition": composition(),
        "image5mb": composition(5 * 1000 * 1000, 1),  # one 2K photo to edit (issue 9: >= 0.6x)
    }
    paths = {}
    for name, body in bodies.items():
        paths[name] = workdir / f"{name}.json"
        paths[name].write_bytes(body)
    return paths
