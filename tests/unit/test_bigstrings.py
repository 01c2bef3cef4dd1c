"""gateway.bigstrings, and what it buys: a big body's skeleton parsed, its images hashed only for the cache."""
from __future__ import annotations

import base64
import hashlib
import os

import orjson
import pytest

from gateway import bigstrings
from gateway.cache import decide, decide_async
from gateway.config import CacheConfig, Config, Limits, ModelConfig, Team
from gateway.validate import validate

MODEL = "google/gemini-3-pro-image-preview"
PNG = b"\x89PNG\r\n\x1a\n" + os.urandom(400_000)
URL = "data:image/png;base64," + base64.b64encode(PNG).decode()


def body(**fields) -> bytes:
    parts = [{"type": "text", "text": "edit"}, {"type": "image_url", "image_url": {"url": URL}}]
    return orjson.dumps({"model": MODEL, "messages": [{"role": "user", "content": parts}], **fields})


@pytest.mark.parametrize(("doc", "cuts"), [
    ({"image": URL, "text": "x"}, 1),
    ({"a": [{"url": URL}, {"url": URL, "detail": "high"}], "b": "\"url\": \"data:" + "A" * 5000}, 2),
    ({"url": "data:,short"}, 0),  # under MIN_BYTES: stays
    ({"note": URL}, 0),  # not a url or image key: stays
])
def test_the_skeleton_with_its_strings_put_back_is_the_document(doc, cuts):
    raw = orjson.dumps(doc)
    cut = bigstrings.cut(raw)
    if cut is None:
        assert cuts == 0
        return
    assert len(cut.spans) == cuts
    assert len(cut.skeleton) < 10_000
    parsed = orjson.loads(cut.skeleton)
    spans = dict(enumerate(cut.spans))
    assert orjson.loads(bigstrings.splice(orjson.dumps(parsed), raw, spans)) == doc


def test_nothing_is_cut_where_the_document_spells_a_placeholder():
    assert bigstrings.cut(orjson.dumps({"image": URL, "text": "\x000"})) is None


async def test_a_cacheable_request_has_its_images_hashed_off_the_loop_and_keyed_by_their_bytes():
    config = Config(models=(ModelConfig(id=MODEL, upstream_id=MODEL),))
    cacheable = validate(body(seed=1), config, Limits())
    assert cacheable.images[0].digest == ""  # validation does not hash
    team = Team(name="t", cache=CacheConfig(mode="deterministic"))
    decision = await decide_async(team, cacheable, None)
    assert cacheable.images[0].digest == hashlib.sha256(PNG).hexdigest()
    assert decision.key == decide(team, validate(body(seed=1), config, Limits()), None).key

    not_cacheable = validate(body(), config, Limits())
    assert (await decide_async(team, not_cacheable, None)).label == "bypass"
    assert not_cacheable.images[0].digest == ""  # never hashed
