"""Stored images behind links, on every backend: the gateway's store (embedded, redis-server,
a 3-node Cluster) and S3 (a real moto server process, reached over HTTP by aiobotocore)."""
from __future__ import annotations

import hashlib

import aiohttp
import pytest

from gateway.config import S3Config
from gateway.images import s3 as s3_mod
from gateway.images.storage import READ_BYTES, ImageGone, StoreImages
from gateway.images.s3 import S3Images
from gateway.store import connect
from tests.images import image_bytes

PNG = image_bytes("PNG", size=(96, 64), noise=True)
BIG = image_bytes("PNG", size=(900, 700), noise=True)  # ~1.9 MB: several reads


async def read_all(storage, image, start=0, stop=None) -> list[bytes]:
    return [piece async for piece in storage.read(image, start, image.size if stop is None else stop)]


@pytest.fixture
async def store(store_url):
    s = await connect(store_url)
    yield s
    await s.close()


async def test_store_backend_keeps_an_image_once_under_its_hash_for_the_ttl(store):
    storage = StoreImages(store)
    name = await storage.put(PNG, "image/png", ttl_s=600)
    assert name == hashlib.sha256(PNG).hexdigest() + ".png"
    assert await storage.put(PNG, "image/png", ttl_s=600) == name  # a repeat: the same key
    image = await storage.stat(name)
    assert (image.size, image.content_type, image.etag) == (len(PNG), "image/png", f'"{name[:64]}"')
    assert b"".join(await read_all(storage, image)) == PNG
    assert b"".join(await read_all(storage, image, 10, 20)) == PNG[10:20]
    assert 590_000 < await store.client.pttl(f"gw:img:{name}") <= 600_000


async def test_store_backend_lengthens_an_images_life_for_a_new_link_never_shortens_it(store):
    storage, key = StoreImages(store), f"gw:img:{hashlib.sha256(PNG).hexdigest()}.png"
    await storage.put(PNG, "image/png", ttl_s=60)
    await storage.put(PNG, "image/png", ttl_s=3600)  # a cache hit hands out a longer-lived link
    assert 3_590_000 < await store.client.pttl(key) <= 3_600_000
    await storage.put(PNG, "image/png", ttl_s=60)  # a team with shorter links: the old link still works
    assert await store.client.pttl(key) > 3_590_000


async def test_store_backend_reads_a_big_image_in_pieces(store):
    storage = StoreImages(store)
    image = await storage.stat(await storage.put(BIG, "image/png", ttl_s=600))
    pieces = await read_all(storage, image)
    assert len(pieces) > 2 and max(map(len, pieces)) <= READ_BYTES
    assert b"".join(pieces) == BIG


async def test_store_backend_an_image_gone_is_none_or_ImageGone_midway(store):
    storage = StoreImages(store)
    name = await storage.put(BIG, "image/jpeg", ttl_s=600)
    image = await storage.stat(name)
    reader = storage.read(image, 0, image.size)
    await reader.__anext__()
    await store.delete(f"gw:img:{name}")
    with pytest.raises(ImageGone):
        await reader.__anext__()
    assert await storage.stat(name) is None


@pytest.fixture
async def s3(s3_bucket):
    endpoint, bucket = s3_bucket
    storage = await S3Images.open(f"s3://{bucket}/generated/", S3Config(endpoint_url=endpoint, region="us-east-1"))
    yield storage
    await storage.close()


async def objects(storage: S3Images) -> list[dict]:
    listed = await storage._client.list_objects_v2(Bucket=storage.bucket)
    return listed.get("Contents", [])


async def test_s3_keeps_an_image_once_and_reads_ranges(s3):
    name = await s3.put(BIG, "image/png", ttl_s=600)
    assert await s3.put(BIG, "image/png", ttl_s=600) == name
    assert [o["Key"] for o in await objects(s3)] == [f"generated/{name}"]
    image = await s3.stat(name)
    assert (image.size, image.content_type) == (len(BIG), "image/png")
    pieces = await read_all(s3, image)
    assert max(map(len, pieces)) <= READ_BYTES and b"".join(pieces) == BIG
    assert b"".join(await read_all(s3, image, 1000, 1_500_000)) == BIG[1000:1_500_000]


async def test_s3_presigned_links_are_fetched_by_plain_http(s3):
    name = await s3.put(PNG, "image/png", ttl_s=600)
    url = await s3.presigned_url(name, 600)
    assert "X-Amz-Signature=" in url and "X-Amz-Expires=600" in url
    async with aiohttp.ClientSession() as http:
        async with http.get(url) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"] == "image/png"
            assert await resp.read() == PNG


async def test_s3_without_presign_links_go_to_the_gateway(s3_bucket):
    endpoint, bucket = s3_bucket
    storage = await S3Images.open(f"s3://{bucket}", S3Config(endpoint_url=endpoint, region="us-east-1", presign=False))
    try:
        name = await storage.put(PNG, "image/png", ttl_s=600)
        assert await storage.presigned_url(name, 600) is None
        assert [o["Key"] for o in await objects(storage)] == [name]  # no prefix: at the bucket's root
    finally:
        await storage.close()


async def test_s3_an_old_object_is_rewritten_in_place_so_its_lifecycle_restarts(s3, monkeypatch):
    name = await s3.put(PNG, "image/png", ttl_s=600)
    (before,) = await objects(s3)
    monkeypatch.setattr(s3_mod, "REFRESH_AFTER_S", -1)  # every object counts as old
    await s3.put(PNG, "image/png", ttl_s=600)
    (after,) = await objects(s3)
    assert after["LastModified"] >= before["LastModified"] and after["ETag"] == before["ETag"]
    image = await s3.stat(name)
    assert b"".join(await read_all(s3, image)) == PNG and image.content_type == "image/png"


async def test_s3_an_image_gone_is_none_or_ImageGone(s3):
    name = await s3.put(PNG, "image/png", ttl_s=600)
    image = await s3.stat(name)
    await s3._client.delete_object(Bucket=s3.bucket, Key=f"generated/{name}")
    assert await s3.stat(name) is None
    with pytest.raises(ImageGone):
        await read_all(s3, image)
