"""``GET /v1/images/files/{id}.{ext}``: a stored image served by its signed link, without a key,
over real HTTP from a gateway on a real port (images put through the app's own storage)."""
from __future__ import annotations

from dataclasses import replace
from urllib.parse import urlsplit

import aiohttp
import pytest
from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict

from gateway.errors import InvalidRequest
from gateway.http.files import image_links
from gateway.http.state import IMAGE_STORAGE, RUNTIME, STORE
from gateway.images.deliver import Links
from gateway.images.links import LinkSigner
from tests.images import image_bytes
from tests.support.clock import Clock

KEY = "a-signing-key-of-forty-characters-000000"
TTL = 600
PNG = image_bytes("PNG", size=(900, 700), noise=True)  # ~1.9 MB: read from the store in pieces



@pytest.fixture
async def served(start_gateway):
    clock = Clock()
    gw = await start_gateway(clock=clock, images={"delivery": "url", "signing_key": KEY, "url_ttl_s": TTL})
    links = Links(gw.app[IMAGE_STORAGE], LinkSigner(KEY, clock=clock), base_url=gw.url, ttl_s=TTL)
    async with aiohttp.ClientSession() as http:
        yield gw, clock, links, http


async def get(http: aiohttp.ClientSession, url: str, **headers: str) -> tuple[int, CIMultiDict, bytes]:
    async with http.get(url, headers=headers) as resp:
        return resp.status, resp.headers.copy(), await resp.read()  # case-insensitive


async def test_a_link_serves_the_image_without_a_key(served):
    gw, clock, links, http = served
    url = await links.link(PNG, "image/png")
    assert url.startswith(f"{gw.url}/v1/images/files/")
    status, headers, body = await get(http, url)
    assert (status, body) == (200, PNG)
    assert headers["Content-Type"] == "image/png"
    assert headers["Content-Length"] == str(len(PNG))
    assert headers["ETag"] == f'"{urlsplit(url).path.rsplit("/", 1)[1][:64]}"'
    assert headers["Cache-Control"] == f"private, max-age={TTL}"
    assert headers["Accept-Ranges"] == "bytes"
    clock.advance(100)
    assert (await get(http, url))[1]["Cache-Control"] == f"private, max-age={TTL - 100}"
    status, headers, body = await get(http, url, **{"If-None-Match": headers["ETag"]})
    assert (status, body) == (304, b"")
    async with http.head(url) as resp:
        assert resp.status == 200 and resp.headers["Content-Length"] == str(len(PNG))


@pytest.mark.parametrize("rng, start, stop", [("bytes=10-99", 10, 100), ("bytes=-100", len(PNG) - 100, len(PNG)),
                                              ("bytes=1000000-", 1_000_000, len(PNG)),
                                              ("bytes=5-99999999", 5, len(PNG))],
                         ids=["closed", "suffix", "open", "past-the-end"])
async def test_a_range_is_206_with_content_range(served, rng, start, stop):
    _, _, links, http = served
    status, headers, body = await get(http, await links.link(PNG, "image/png"), Range=rng)
    assert status == 206
    assert headers["Content-Range"] == f"bytes {start}-{stop - 1}/{len(PNG)}"
    assert headers["Content-Length"] == str(stop - start)
    assert body == PNG[start:stop]


async def test_a_range_past_the_end_is_416(served):
    _, _, links, http = served
    status, headers, _ = await get(http, await links.link(PNG, "image/png"), Range=f"bytes={len(PNG)}-")
    assert status == 416 and headers["Content-Range"] == f"bytes */{len(PNG)}"


def tamper(url: str, how: str) -> str:
    if how == "signature":
        return url[:-2] + ("AA" if not url.endswith("AA") else "BB")
    if how == "no signature":
        return url.split("&signature=")[0]
    if how == "no query":
        return url.split("?")[0]
    if how == "expires":
        head, _, rest = url.partition("expires=")
        expires, _, tail = rest.partition("&")
        return f"{head}expires={int(expires) + 86400}&{tail}"
    assert how == "other image"
    path = urlsplit(url).path
    name = path.rsplit("/", 1)[1]
    return url.replace(name, "0" * 64 + ".png")


@pytest.mark.parametrize("how", ["signature", "no signature", "no query", "expires", "other image"])
async def test_a_tampered_or_missing_signature_is_403_invalid_signature(served, how):
    _, _, links, http = served
    async with http.get(tamper(await links.link(PNG, "image/png"), how)) as resp:
        assert resp.status == 403
        assert await resp.json() == {"error": {"message": "This image link's signature is missing or wrong.",
                                               "type": "permission_error", "code": "invalid_signature",
                                               "param": None}}


async def test_an_expired_link_or_a_gone_image_is_404_image_not_found(served):
    gw, clock, links, http = served
    url = await links.link(PNG, "image/png")
    clock.advance(TTL)
    async with http.get(url) as resp:
        assert resp.status == 404
        assert (await resp.json())["error"]["code"] == "image_not_found"
    clock.advance(-TTL)
    await gw.app[STORE].delete(f"gw:img:{urlsplit(url).path.rsplit('/', 1)[1]}")
    async with http.get(url) as resp:
        assert resp.status == 404
        assert (await resp.json())["error"]["code"] == "image_not_found"


async def test_the_route_is_counted_with_its_status_and_no_team(served):
    gw, _, links, http = served
    url = await links.link(PNG, "image/png")
    await get(http, url)
    await get(http, url, Range="bytes=0-9")
    await get(http, tamper(url, "signature"))
    await gw.idle()  # counted after the answer
    _, _, text = await get(http, f"{gw.url}/metrics")
    lines = [line for line in text.decode().splitlines()
             if line.startswith("gateway_requests_total{") and 'team="none"' in line]
    for status in ("200", "206", "403"):
        assert any(f'status="{status}"' in line and line.endswith(" 1.0") for line in lines), (status, lines)


async def test_a_gateway_without_a_signing_key_honours_no_link(start_gateway):
    gw = await start_gateway()
    name = await gw.app[IMAGE_STORAGE].put(PNG, "image/png", ttl_s=TTL)
    url = LinkSigner(KEY).url(gw.url, name, TTL)
    async with aiohttp.ClientSession() as http:
        async with http.get(url) as resp:
            assert resp.status == 403
            assert (await resp.json())["error"]["code"] == "invalid_signature"


async def test_image_links_follow_the_header_then_the_config(served, start_gateway):
    gw = served[0]

    def links_for(app, config, **headers):
        request = make_mocked_request("POST", "/v1/chat/completions", headers={"Host": "gw.example", **headers}, app=app)
        return image_links(request, config)

    config = gw.app[RUNTIME].snapshot.config.images
    links = links_for(gw.app, config)
    assert links.storage is gw.app[IMAGE_STORAGE] and links.ttl_s == TTL and links.base_url == "http://gw.example"
    assert links_for(gw.app, replace(config, public_base_url="https://img.example")).base_url == "https://img.example"
    assert links_for(gw.app, config, **{"X-Image-Delivery": "inline"}) is None
    plain = (await start_gateway()).app
    plain_config = plain[RUNTIME].snapshot.config.images
    assert links_for(plain, plain_config) is None
    with pytest.raises(InvalidRequest, match="images.signing_key"):
        links_for(plain, plain_config, **{"X-Image-Delivery": "url"})
    with pytest.raises(InvalidRequest, match="inline or url"):
        links_for(gw.app, config, **{"X-Image-Delivery": "base64"})
