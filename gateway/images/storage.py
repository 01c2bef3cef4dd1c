"""Where generated images live while their links work: one small interface, two backends.

An image is stored under its name, ``<sha256 hex of its bytes>.<ext>``: content-addressed, so
the same image (a repeat, a cache hit answering again) is stored once, and its name is also its
ETag. ``put`` keeps it at least ``ttl_s`` from now (a later put of the same bytes only
lengthens its life, never shortens it); ``stat`` says whether and how big; ``read`` yields a
byte range in pieces of at most ``READ_BYTES``, so serving a 20 MB image never holds it whole.

Backends (``images.storage``): ``store`` keeps each image as one key of the gateway's own store
(``memory://`` or Redis, single node or Cluster) with a TTL; ``s3://bucket/prefix`` keeps
objects in S3 (gateway/images/s3.py), removed by the bucket's lifecycle rule. Failures are
``gateway.store.StoreError``, as for the store itself.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import AsyncIterator, Protocol

from gateway import offload
from gateway.config import ImagesConfig
from gateway.store import Store, StoreError

EXTENSIONS = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp", "image/gif": "gif"}
CONTENT_TYPES = {ext: mime for mime, ext in EXTENSIONS.items()}
READ_BYTES = 768 * 1024  # one store read, one write to the client


@dataclass(frozen=True, slots=True)
class ImageFile:
    """A stored image: its name, its length in bytes, its MIME type."""

    name: str
    size: int

    @property
    def content_type(self) -> str:
        return CONTENT_TYPES[self.name.rsplit(".", 1)[1]]

    @property
    def etag(self) -> str:
        return f'"{self.name.split(".", 1)[0]}"'


class ImageGone(StoreError):
    """The image expired or went away while it was being read."""

    def __init__(self, name: str) -> None:
        super().__init__(f"image {name} is gone", op="image_read", down=False)


class ImageStorage(Protocol):
    async def put(self, data: bytes | memoryview, content_type: str, *, ttl_s: int) -> str:
        """Store ``data`` (a type of ``EXTENSIONS``) for at least ``ttl_s``; return its name."""

    async def stat(self, name: str) -> ImageFile | None: ...

    def read(self, image: ImageFile, start: int, stop: int) -> AsyncIterator[bytes]:
        """Bytes ``[start, stop)`` in pieces; ImageGone if the image vanishes meanwhile."""

    async def presigned_url(self, name: str, ttl_s: int) -> str | None:
        """The object store's own link to ``name``, or None: links go to the gateway's route."""

    async def close(self) -> None: ...


async def image_name(data: bytes | memoryview, content_type: str) -> str:
    """``<sha256 hex>.<ext>``; a big image is hashed off the event loop. ValueError for a type
    that has no extension here."""
    ext = EXTENSIONS.get(content_type)
    if ext is None:
        raise ValueError(f"no image type {content_type!r}")
    digest = await offload.run(lambda: hashlib.sha256(data).hexdigest(), size=len(data))
    return f"{digest}.{ext}"


class StoreImages:
    """Images as keys of the gateway's store: ``gw:img:<name>``, TTL = the longest link's life."""

    def __init__(self, store: Store) -> None:
        self.store = store

    @staticmethod
    def _key(name: str) -> str:
        return f"gw:img:{name}"

    async def put(self, data: bytes | memoryview, content_type: str, *, ttl_s: int) -> str:
        name = await image_name(data, content_type)
        key = self._key(name)
        if not await self.store.run_script("image_keep", [key], [ttl_s * 1000]):  # not there yet
            await self.store.set(key, bytes(data), ttl_s=ttl_s)
        return name

    async def stat(self, name: str) -> ImageFile | None:
        size = int(await self.store.run_script("image_keep", [self._key(name)], [0]))
        return ImageFile(name, size) if size else None

    async def read(self, image: ImageFile, start: int, stop: int) -> AsyncIterator[bytes]:
        key = self._key(image.name)
        for pos in range(start, stop, READ_BYTES):
            end = min(stop, pos + READ_BYTES)
            data = await self.store.get_range(key, pos, end - 1)
            if len(data) != end - pos:
                raise ImageGone(image.name)
            yield data

    async def presigned_url(self, name: str, ttl_s: int) -> str | None:
        return None

    async def close(self) -> None:
        """The store is the app's: it closes it."""


async def open_storage(config: ImagesConfig, store: Store) -> ImageStorage:
    """The storage ``images.storage`` names; an S3 one is connected (no request made yet)."""
    if config.storage == "store":
        return StoreImages(store)
    from gateway.images.s3 import S3Images  # only with the s3 extra installed

    return await S3Images.open(config.storage, config.s3)
