"""Images in S3 (or any S3-compatible store), through aiobotocore: ``images.storage: s3://bucket/prefix``.

Objects are ``<prefix>/<name>`` (see ``storage``), uploaded once. S3 itself removes them: the
bucket's lifecycle rule expires objects ``ceil(url_ttl_s / 86400) + 1`` days after they were
last written (README). So that a link handed out for an old object never outlives it, an
object older than ``REFRESH_AFTER_S`` is copied onto itself (no bytes sent) before a new link
to it goes out, which restarts its lifecycle clock. Credentials come from the usual AWS_*
environment (or the instance's role), as botocore finds them. Every botocore error becomes
``StoreError`` here.
"""
from __future__ import annotations

import contextlib
import datetime as dt
from typing import Any, AsyncIterator

from aiohttp import ClientError as HTTPClientError
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import BotoCoreError, ClientError

from gateway.config import S3Config
from gateway.images.storage import READ_BYTES, ImageFile, ImageGone, image_name
from gateway.store import StoreError

REFRESH_AFTER_S = 86400  # the lifecycle rule leaves a day more than url_ttl_s (README)
_MISSING = {"404", "NoSuchKey", "NotFound"}


class S3Images:
    def __init__(self, client: Any, stack: contextlib.AsyncExitStack, bucket: str, prefix: str,
                 presign: bool) -> None:
        self._client, self._stack = client, stack
        self.bucket, self.prefix, self.presign = bucket, prefix, presign

    @classmethod
    async def open(cls, url: str, config: S3Config) -> "S3Images":
        """Connect to ``s3://bucket/prefix`` (no request is made until the first use)."""
        bucket, _, prefix = url.removeprefix("s3://").partition("/")
        stack = contextlib.AsyncExitStack()
        client = await stack.enter_async_context(get_session().create_client(
            "s3", endpoint_url=config.endpoint_url, region_name=config.region,
            config=AioConfig(signature_version="s3v4", retries={"max_attempts": 3, "mode": "standard"})))
        return cls(client, stack, bucket, prefix.strip("/"), config.presign)

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    async def _head(self, name: str) -> dict | None:
        try:
            return await self._client.head_object(Bucket=self.bucket, Key=self._key(name))
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in _MISSING:
                return None
            raise

    async def put(self, data: bytes | memoryview, content_type: str, *, ttl_s: int) -> str:
        name = await image_name(data, content_type)
        key = self._key(name)
        with _errors("s3_put"):
            head = await self._head(name)
            if head is None:
                await self._client.put_object(Bucket=self.bucket, Key=key, Body=bytes(data),
                                              ContentType=content_type)
            elif (dt.datetime.now(dt.timezone.utc) - head["LastModified"]).total_seconds() > REFRESH_AFTER_S:
                await self._client.copy_object(Bucket=self.bucket, Key=key, ContentType=content_type,
                                               CopySource={"Bucket": self.bucket, "Key": key},
                                               MetadataDirective="REPLACE")
        return name

    async def stat(self, name: str) -> ImageFile | None:
        with _errors("s3_head"):
            head = await self._head(name)
        return None if head is None else ImageFile(name, int(head["ContentLength"]))

    async def read(self, image: ImageFile, start: int, stop: int) -> AsyncIterator[bytes]:
        got = 0
        with _errors("s3_get"):
            try:
                resp = await self._client.get_object(Bucket=self.bucket, Key=self._key(image.name),
                                                     Range=f"bytes={start}-{stop - 1}")
            except ClientError as e:
                if e.response.get("Error", {}).get("Code") in _MISSING:
                    raise ImageGone(image.name) from None
                raise
            async with resp["Body"] as body:
                async for chunk in body.iter_chunks(READ_BYTES):
                    got += len(chunk)
                    yield chunk
        if got != stop - start:
            raise ImageGone(image.name)

    async def presigned_url(self, name: str, ttl_s: int) -> str | None:
        if not self.presign:
            return None
        return await self._client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": self._key(name)}, ExpiresIn=ttl_s)

    async def close(self) -> None:
        await self._stack.aclose()


@contextlib.contextmanager
def _errors(op: str):
    """botocore's errors as StoreError, once, here (ImageGone is one already)."""
    try:
        yield
    except (BotoCoreError, ClientError, HTTPClientError, OSError) as e:
        raise StoreError(f"object store {op} failed: {type(e).__name__}: {e}", op=op) from None
