"""gateway.validate: what a client sees for bad bodies, and what the gateway keeps from good ones."""
from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import io
import itertools
import os

import orjson
import pytest
from PIL import Image

from gateway.images import inputs as images_module
from gateway import validate as validate_module
from gateway.config import Config, Limits, ModelConfig
from gateway.errors import InvalidRequest
from gateway.validate import ChatRequest, validate, validate_async

MODEL_ID = "google/gemini-3-pro-image-preview"
ALIAS = "gemini-3-pro-image-preview"
CONFIG = Config(models=(ModelConfig(id=MODEL_ID, upstream_id=MODEL_ID, aliases=(ALIAS,)),))
LIMITS = Limits()


def picture(fmt: str, size: tuple[int, int] = (16, 12), noise: bool = False) -> bytes:
    """A real image file made by Pillow."""
    if noise:
        img = Image.frombytes("RGB", size, os.urandom(size[0] * size[1] * 3))
    else:
        img = Image.new("RGB", size, (200, 30, 90))
    out = io.BytesIO()
    img.save(out, format=fmt)
    return out.getvalue()


PNG = picture("PNG")
JPEG = picture("JPEG")
GIF = picture("GIF")
WEBP = picture("WEBP")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{b64(data)}"


def wrapped(text: str, width: int = 76, newline: str = "\r\n") -> str:
    return newline.join(text[i:i + width] for i in range(0, len(text), width))


def image_part(url: str) -> dict:
    return {"type": "image", "image": url}


def image_url_part(url: str, detail: str | None = "auto") -> dict:
    inner = {"url": url} if detail is None else {"url": url, "detail": detail}
    return {"type": "image_url", "image_url": inner}


def text_part(text: str) -> dict:
    return {"type": "text", "text": text}


def chat(*parts: dict, model: str = MODEL_ID, **fields) -> dict:
    """A body with one user message holding ``parts``."""
    return {"model": model, "messages": [{"role": "user", "content": [text_part("edit this"), *parts]}], **fields}


def encode(body) -> bytes:
    return body if isinstance(body, bytes) else orjson.dumps(body)


PROMPT = {"model": MODEL_ID, "messages": [{"role": "user", "content": "a red fox"}]}


def prompt(**fields) -> dict:
    body = {**PROMPT, **fields}
    return {k: v for k, v in body.items() if v is not ...}


def fifteen_images() -> dict:
    first = [image_part(data_url(PNG)) for _ in range(10)]
    second = [image_url_part(data_url(JPEG, "image/jpeg")) for _ in range(5)]
    return {"model": MODEL_ID, "messages": [
        {"role": "user", "content": first},
        {"role": "user", "content": second},
    ]}


TINY = Limits(max_image_mb=0.001)  # 1048 bytes
BIG_PNG = picture("PNG", (64, 64), noise=True)
assert len(BIG_PNG) > TINY.max_image_bytes

# (id, body, limits, code, param, words the message must contain)
BAD = [
    ("png-declared-as-jpeg", chat(image_part(data_url(PNG, "image/jpeg"))), LIMITS,
     "invalid_image", "messages[0].content[1]", "declared image/jpeg but the bytes are PNG"),
    ("truncated-base64", chat(image_part(data_url(PNG)[:-3])), LIMITS,
     "invalid_image", "messages[0].content[1]", "base64 is not valid"),
    ("truncated-base64-image_url", chat(text_part("x"), image_url_part(data_url(JPEG, "image/jpeg")[:-1])), LIMITS,
     "invalid_image", "messages[0].content[2]", "base64 is not valid"),
    ("gif-with-webp-header", chat(image_part(data_url(WEBP, "image/gif"))), LIMITS,
     "invalid_image", "messages[0].content[1]", "declared image/gif but the bytes are WEBP"),
    ("bytes-of-no-image-format", chat(image_part(data_url(b"hello, world, not an image", "image/webp"))), LIMITS,
     "invalid_image", "messages[0].content[1]", "not a PNG, JPEG, WEBP or GIF"),
    ("15-images", fifteen_images(), LIMITS, "too_many_images", "messages[1].content[4]", "15"),
    ("http-image_url", chat(image_url_part("http://example.com/cat.png")), LIMITS,
     "invalid_image", "messages[0].content[1]", "not fetched"),
    ("https-provider-image", chat(image_part("https://example.com/cat.png")), LIMITS,
     "invalid_image", "messages[0].content[1]", "not fetched"),
    ("bare-string-image_url-remote", chat({"type": "image_url", "image_url": "https://x.test/a.png"}), LIMITS,
     "invalid_image", "messages[0].content[1]", "not fetched"),
    ("ftp-url", chat(image_part("ftp://example.com/cat.png")), LIMITS,
     "invalid_image", "messages[0].content[1]", "data URL"),
    ("data-url-not-base64", chat(image_part("data:image/png,abcd")), LIMITS,
     "invalid_image", "messages[0].content[1]", "data:<mime>;base64,<data>"),
    ("data-url-without-comma", chat(image_part("data:image/png;base64")), LIMITS,
     "invalid_image", "messages[0].content[1]", "data:<mime>;base64,<data>"),
    ("unsupported-mime", chat(image_part(data_url(PNG, "image/bmp"))), LIMITS,
     "invalid_image", "messages[0].content[1]", '"image/bmp"'),
    ("empty-image", chat(image_part("data:image/png;base64,")), LIMITS,
     "invalid_image", "messages[0].content[1]", "empty"),
    ("base64-bad-characters", chat(image_part("data:image/png;base64,iVBO@@@@")), LIMITS,
     "invalid_image", "messages[0].content[1]", "base64 is not valid"),
    ("base64-non-ascii", chat(image_part("data:image/png;base64,iVBOé===")), LIMITS,
     "invalid_image", "messages[0].content[1]", "base64 is not valid"),
    ("base64-data-after-padding", chat(image_part(data_url(PNG) + "=AAAA")), LIMITS,
     "invalid_image", "messages[0].content[1]", "base64 is not valid"),
    ("image-over-max_image_mb", chat(image_part(data_url(BIG_PNG))), TINY,
     "invalid_image", "messages[0].content[1]", "MB"),
    ("n-2", prompt(n=2), LIMITS, "invalid_request", "n", "must be 1"),
    ("n-true", prompt(n=True), LIMITS, "invalid_request", "n", "must be 1"),
    ("temperature-3", prompt(temperature=3), LIMITS, "invalid_request", "temperature", "0 to 2"),
    ("temperature-negative", prompt(temperature=-0.5), LIMITS, "invalid_request", "temperature", "0 to 2"),
    ("temperature-string", prompt(temperature="1"), LIMITS, "invalid_request", "temperature", "a string"),
    ("top_p-1.5", prompt(top_p=1.5), LIMITS, "invalid_request", "top_p", "0 to 1"),
    ("unknown-model", prompt(model="dall-e-3"), LIMITS, "unknown_model", "model", MODEL_ID),
    ("model-not-string", prompt(model=42), LIMITS, "invalid_request", "model", "string"),
    ("missing-model", prompt(model=...), LIMITS, "invalid_request", "model", "required"),
    ("empty-messages", prompt(messages=[]), LIMITS, "invalid_request", "messages", "empty"),
    ("missing-messages", prompt(messages=...), LIMITS, "invalid_request", "messages", "required"),
    ("messages-not-array", prompt(messages={"role": "user"}), LIMITS, "invalid_request", "messages", "array"),
    ("message-not-object", prompt(messages=["hi"]), LIMITS, "invalid_request", "messages[0]", "object"),
    ("bad-role", prompt(messages=[{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}]), LIMITS,
     "invalid_request", "messages[1].role", '"tool"'),
    ("missing-role", prompt(messages=[{"content": "b"}]), LIMITS, "invalid_request", "messages[0].role", "required"),
    ("user-content-null", prompt(messages=[{"role": "user", "content": None}]), LIMITS,
     "invalid_request", "messages[0].content", "required"),
    ("content-number", prompt(messages=[{"role": "user", "content": 7}]), LIMITS,
     "invalid_request", "messages[0].content", "a number"),
    ("content-empty-array", prompt(messages=[{"role": "user", "content": []}]), LIMITS,
     "invalid_request", "messages[0].content", "empty"),
    ("non-json", b'{"model": "x", ', LIMITS, "invalid_json", None, "line 1 column 16"),
    ("not-utf8", b'{"model": "\xff"}', LIMITS, "invalid_json", None, "not valid JSON"),
    ("empty-body", b"", LIMITS, "invalid_json", None, "not valid JSON"),
    ("top-level-array", b"[]", LIMITS, "invalid_request", None, "JSON object"),
    ("top-level-string", b'"hi"', LIMITS, "invalid_request", None, "JSON object"),
    ("bool-max_tokens", prompt(max_tokens=True), LIMITS, "invalid_request", "max_tokens", "positive integer"),
    ("zero-max_completion_tokens", prompt(max_completion_tokens=0), LIMITS,
     "invalid_request", "max_completion_tokens", "positive integer"),
    ("float-max_completion_tokens", prompt(max_completion_tokens=10.5), LIMITS,
     "invalid_request", "max_completion_tokens", "positive integer"),
    ("huge-max_tokens", prompt(max_tokens=10**17), LIMITS, "invalid_request", "max_tokens", "at most 32768"),
    ("over-cap-max_completion_tokens", prompt(max_completion_tokens=32769), LIMITS,
     "invalid_request", "max_completion_tokens", "at most 32768"),
    ("over-cap-max_tokens-beside-a-valid-max_completion_tokens", prompt(max_completion_tokens=10, max_tokens=40000),
     LIMITS, "invalid_request", "max_tokens", "at most 32768"),
    ("stream-string", prompt(stream="yes"), LIMITS, "invalid_request", "stream", "boolean"),
    ("stream_options-string", prompt(stream_options="usage"), LIMITS, "invalid_request", "stream_options", "object"),
    ("unknown-part-type", chat({"type": "input_audio", "input_audio": {}}), LIMITS,
     "invalid_request", "messages[0].content[1]", '"input_audio"'),
    ("part-without-type", chat({"text": "hi"}), LIMITS, "invalid_request", "messages[0].content[1].type", "required"),
    ("part-not-object", chat("hi"), LIMITS, "invalid_request", "messages[0].content[1]", "object"),
    ("text-part-without-text", chat({"type": "text"}), LIMITS,
     "invalid_request", "messages[0].content[1].text", "string"),
    ("image-part-not-string", chat({"type": "image", "image": {"url": "data:..."}}), LIMITS,
     "invalid_request", "messages[0].content[1].image", "string"),
    ("image_url-without-url", chat({"type": "image_url", "image_url": {"detail": "low"}}), LIMITS,
     "invalid_request", "messages[0].content[1].image_url.url", "string"),
    ("image_url-bad-detail", chat(image_url_part(data_url(PNG), detail="ultra")), LIMITS,
     "invalid_request", "messages[0].content[1].image_url.detail", "auto, low or high"),
]


@pytest.mark.parametrize(("body", "limits", "code", "param", "words"),
                         [case[1:] for case in BAD], ids=[case[0] for case in BAD])
def test_bad_body(body, limits, code, param, words):
    with pytest.raises(InvalidRequest) as caught:
        validate(encode(body), CONFIG, limits)
    err = caught.value
    assert err.status == 400
    assert err.type == "invalid_request_error"
    assert (err.code, err.param) == (code, param)
    assert words in err.message
    if param is not None:
        assert err.message.startswith(param)
    assert err.body()["error"]["param"] == param


def test_image_count_is_checked_before_any_image_is_decoded(monkeypatch):
    def must_not_decode(*args, **kwargs):
        raise AssertionError("decoded an image of a request that has too many")

    monkeypatch.setattr(validate_module, "check_data_url", must_not_decode)
    with pytest.raises(InvalidRequest) as caught:
        validate(encode(fifteen_images()), CONFIG, LIMITS)
    assert caught.value.code == "too_many_images"


def test_fourteen_images_pass():
    body = fifteen_images()
    body["messages"][1]["content"].pop()
    req = validate(encode(body), CONFIG, LIMITS)
    assert len(req.images) == 14
    assert req.images[-1].param == "messages[1].content[3]"


def test_image_exactly_at_the_size_limit_passes():
    limits = Limits(max_image_mb=len(BIG_PNG) / (1024 * 1024))
    assert limits.max_image_bytes == len(BIG_PNG)
    req = validate(encode(chat(image_part(data_url(BIG_PNG)))), CONFIG, limits)
    assert req.images[0].size == len(BIG_PNG)


def test_oversized_image_message_gives_both_sizes_in_mb():
    big = os.urandom(3 * 1024 * 1024)
    with pytest.raises(InvalidRequest) as caught:
        validate(encode(chat(image_part(data_url(b"\x89PNG\r\n\x1a\n" + big)))), CONFIG, Limits(max_image_mb=2))
    assert "about 3 MB" in caught.value.message
    assert "limit is 2 MB" in caught.value.message


def test_string_content():
    raw = encode(prompt(messages=[{"role": "system", "content": "be brief"},
                                  {"role": "user", "content": "a red fox"}]))
    req = validate(raw, CONFIG, LIMITS)
    assert isinstance(req, ChatRequest)
    assert req.raw is raw
    assert req.model.id == MODEL_ID
    assert req.body["messages"][1]["content"] == "a red fox"
    assert req.images == ()
    assert req.text_chars == len("be brief") + len("a red fox")
    assert req.stream is False
    assert req.max_completion_tokens is None


@pytest.mark.parametrize(("data", "mime", "declared"), [
    (PNG, "image/png", "image/png"),
    (JPEG, "image/jpeg", "image/jpeg"),
    (JPEG, "image/jpeg", "image/jpg"),
    (JPEG, "image/jpeg", "IMAGE/JPEG"),
    (GIF, "image/gif", "image/gif"),
    (WEBP, "image/webp", "image/webp"),
])
def test_provider_image_part(data, mime, declared):
    raw = encode(chat(image_part(data_url(data, declared))))
    req = validate(raw, CONFIG, LIMITS)
    assert req.raw is raw
    (fact,) = req.images
    assert fact.param == "messages[0].content[1]"
    assert fact.mime == mime
    assert fact.size == len(data)
    assert fact.sha256 == hashlib.sha256(data).hexdigest()


def test_openai_image_url_part_object_and_bare_string():
    body = chat(image_url_part(data_url(PNG), detail="high"),
                image_url_part(data_url(GIF, "image/gif"), detail=None),
                {"type": "image_url", "image_url": data_url(WEBP, "image/webp")})
    req = validate(encode(body), CONFIG, LIMITS)
    assert [(f.param, f.mime) for f in req.images] == [
        ("messages[0].content[1]", "image/png"),
        ("messages[0].content[2]", "image/gif"),
        ("messages[0].content[3]", "image/webp"),
    ]


def test_same_image_gives_same_facts_in_every_shape_and_wrapping():
    encoded = b64(PNG)
    urls = [
        f"data:image/png;base64,{encoded}",
        f"data:image/png;base64,{wrapped(encoded)}",
        f"data:image/png;base64,{wrapped(encoded, 64, chr(10))}\n",
        f"data:image/png;base64, {wrapped(encoded, 3, chr(9))}",
    ]
    body = chat(*[image_part(u) for u in urls], *[image_url_part(u) for u in urls])
    req = validate(encode(body), CONFIG, LIMITS)
    assert len(req.images) == 8
    assert {(f.mime, f.size, f.sha256) for f in req.images} == {
        ("image/png", len(PNG), hashlib.sha256(PNG).hexdigest())}


def test_large_wrapped_image_across_decode_slices():
    big = picture("PNG", (800, 800), noise=True)  # ~1.9 MB: base64 spans several slices
    encoded = b64(big)
    assert len(encoded) > 2 * images_module.SLICE
    plain = validate(encode(chat(image_part(f"data:image/png;base64,{encoded}"))), CONFIG, LIMITS)
    lines = validate(encode(chat(image_part(f"data:image/png;base64,{wrapped(encoded)}"))), CONFIG, LIMITS)
    expected = ("image/png", len(big), hashlib.sha256(big).hexdigest())
    for req in (plain, lines):
        (fact,) = req.images
        assert (fact.mime, fact.size, fact.sha256) == expected


def test_padding_in_the_middle_of_a_long_image_is_refused():
    encoded = b64(picture("PNG", (800, 800), noise=True))
    cut = images_module.SLICE  # "==" ends exactly at a slice boundary, more data follows
    bad = encoded[:cut - 2] + "==" + encoded[cut:]
    with pytest.raises(InvalidRequest) as caught:
        validate(encode(chat(image_part(f"data:image/png;base64,{bad}"))), CONFIG, LIMITS)
    assert caught.value.code == "invalid_image"


def test_alias_is_rewritten_to_upstream_id_and_body_reencoded():
    original = prompt(model=ALIAS, seed=7)
    raw = encode(original)
    req = validate(raw, CONFIG, LIMITS)
    assert req.model.id == MODEL_ID
    assert req.body["model"] == MODEL_ID
    assert req.raw != raw
    assert orjson.loads(req.raw) == {**original, "model": MODEL_ID}


def test_configured_id_with_different_upstream_id_is_rewritten():
    config = Config(models=(ModelConfig(id="house-model", upstream_id=MODEL_ID),))
    req = validate(encode(prompt(model="house-model")), config, LIMITS)
    assert orjson.loads(req.raw)["model"] == MODEL_ID


def test_id_unchanged_keeps_the_clients_bytes():
    raw = b'{ "model" : "google/gemini-3-pro-image-preview",\n  "messages": [{"role":"user","content":"x"}] }'
    req = validate(raw, CONFIG, LIMITS)
    assert req.raw is raw


def test_text_chars_counts_strings_and_text_parts():
    body = {"model": MODEL_ID, "messages": [
        {"role": "developer", "content": "héllo"},
        {"role": "user", "content": [text_part("abc"), image_part(data_url(PNG)), text_part("ünïcode ✓")]},
        {"role": "assistant", "content": None},
        {"role": "assistant", "content": [text_part("ok")]},
    ]}
    req = validate(encode(body), CONFIG, LIMITS)
    assert req.text_chars == len("héllo") + len("abc") + len("ünïcode ✓") + len("ok")
    assert len(req.images) == 1


def test_passthrough_fields_are_untouched():
    extra = {
        "seed": 42,
        "modalities": ["image", "text"],
        "image_config": {"aspect_ratio": "16:9", "image_size": "2K"},
        "stream_options": {"include_usage": True},
        "user": "alice",
        "response_format": {"type": "text"},
        "stop": ["\n\n"],
        "sim_fault": {"latency_ms": 5},
        "some_future_field": [1, {"a": None}],
    }
    raw = encode(prompt(**extra))
    req = validate(raw, CONFIG, LIMITS)
    assert req.raw is raw
    for key, value in extra.items():
        assert req.body[key] == value
    # and after a rewrite too
    req = validate(encode(prompt(model=ALIAS, **extra)), CONFIG, LIMITS)
    reencoded = orjson.loads(req.raw)
    for key, value in extra.items():
        assert reencoded[key] == value


@pytest.mark.parametrize(("fields", "expected"), [
    ({}, None),
    ({"max_tokens": 100}, 100),
    ({"max_completion_tokens": 300}, 300),
    ({"max_completion_tokens": 300, "max_tokens": 100}, 300),
    ({"max_completion_tokens": None, "max_tokens": 100}, 100),
])
def test_max_completion_tokens(fields, expected):
    assert validate(encode(prompt(**fields)), CONFIG, LIMITS).max_completion_tokens == expected


@pytest.mark.parametrize(("fields", "stream"), [
    ({}, False), ({"stream": True}, True), ({"stream": False}, False), ({"stream": None}, False),
])
def test_stream_flag(fields, stream):
    assert validate(encode(prompt(**fields)), CONFIG, LIMITS).stream is stream


@pytest.mark.parametrize("fields", [
    {"n": 1}, {"n": None}, {"temperature": 0}, {"temperature": 2}, {"temperature": 0.7},
    {"top_p": 0}, {"top_p": 1}, {"temperature": None}, {"stream_options": None},
])
def test_parameters_at_their_bounds_pass(fields):
    validate(encode(prompt(**fields)), CONFIG, LIMITS)


def test_assistant_content_may_be_null_or_absent():
    body = prompt(messages=[{"role": "user", "content": "a"}, {"role": "assistant", "content": None},
                            {"role": "assistant", "tool_calls": []}, {"role": "user", "content": "b"}])
    assert validate(encode(body), CONFIG, LIMITS).text_chars == 2


def test_validate_async_offloads_large_bodies(monkeypatch):
    calls = []
    real_to_thread = asyncio.to_thread

    async def spy(fn, *args):
        calls.append(fn)
        return await real_to_thread(fn, *args)

    monkeypatch.setattr(asyncio, "to_thread", spy)
    big = picture("PNG", (400, 400), noise=True)
    large = encode(chat(*[image_part(data_url(big)) for _ in range(3)], model=ALIAS))
    assert len(large) > validate_module.INLINE_MAX_BYTES
    small = encode(PROMPT)

    req = asyncio.run(validate_async(large, CONFIG, LIMITS))
    assert calls == [validate]
    assert [f.sha256 for f in req.images] == [hashlib.sha256(big).hexdigest()] * 3
    assert orjson.loads(req.raw)["model"] == MODEL_ID

    assert asyncio.run(validate_async(small, CONFIG, LIMITS)).raw is small
    assert calls == [validate]  # small bodies inline


def test_validate_async_raises_the_same_errors():
    big = picture("PNG", (400, 400), noise=True)
    large = encode(chat(*[image_part(data_url(big)) for _ in range(2)], image_part(data_url(big, "image/gif"))))
    with pytest.raises(InvalidRequest) as caught:
        asyncio.run(validate_async(large, CONFIG, LIMITS))
    assert (caught.value.code, caught.value.param) == ("invalid_image", "messages[0].content[3]")


def _outcome(decode, text):
    try:
        return decode(text)
    except ValueError:  # binascii.Error included
        return "refused"


def test_fast_base64_decoding_judges_exactly_as_binascii_strict_mode():
    """pybase64 decodes, binascii judges what pybase64 refuses: every short string over an
    alphabet of valid, padding, whitespace, URL-safe and non-ASCII characters gets the same
    bytes or the same refusal as ``a2b_base64(strict_mode=True)``."""
    strict = lambda t: binascii.a2b_base64(t, strict_mode=True)  # noqa: E731
    alphabet = ["A", "Q", "/", "+", "=", "\n", " ", "-", "é"]
    texts = ["".join(p) for n in range(6) for p in itertools.product(alphabet, repeat=n)]
    texts += ["QUJD=", "QUJDRA==QQ==", "QQ==QUJD", "QUJD\r\nRA==", "\tQUJD", "QUJDRA=" + "=" * 3]
    for text in texts:
        expected = _outcome(strict, text)
        assert _outcome(images_module._strict_b64decode, text) == expected, text
        if text.isascii():
            assert _outcome(images_module._strict_b64decode, memoryview(text.encode())) == expected, text


# ---- big bodies: image data URLs cut out of the raw bytes, only the skeleton parsed -------------

BIG = picture("PNG", (120, 120), noise=True)  # ~43 KB: its data URL is cut (over bigstrings.MIN_BYTES)


def test_big_images_are_read_from_the_raw_bytes_and_the_bytes_forwarded_unchanged(monkeypatch):
    loaded = []
    real_loads = orjson.loads
    monkeypatch.setattr(validate_module.orjson, "loads", lambda data: loaded.append(len(data)) or real_loads(data))
    raw = encode(chat(image_part(data_url(BIG)), image_url_part(data_url(JPEG, "image/jpeg")), seed=1))
    req = validate(raw, CONFIG, LIMITS)
    assert req.raw is raw
    assert loaded and loaded[0] < 2000 and len(raw) > 40_000  # the skeleton, not the whole body
    assert [(f.param, f.mime, f.size) for f in req.images] == [
        ("messages[0].content[1]", "image/png", len(BIG)), ("messages[0].content[2]", "image/jpeg", len(JPEG))]
    assert [f.sha256 for f in req.images] == [hashlib.sha256(BIG).hexdigest(), hashlib.sha256(JPEG).hexdigest()]


def test_images_are_hashed_only_when_the_hash_is_read():
    req = validate(encode(chat(image_part(data_url(BIG)))), CONFIG, LIMITS)
    (fact,) = req.images
    assert fact.digest == ""
    assert fact.sha256 == hashlib.sha256(BIG).hexdigest() == fact.digest


def test_alias_rewrite_keeps_big_images_byte_for_byte():
    original = chat(image_part(data_url(BIG)), image_url_part(data_url(BIG, "image/png")), model=ALIAS)
    req = validate(encode(original), CONFIG, LIMITS)
    assert orjson.loads(req.raw) == {**original, "model": MODEL_ID}


def test_a_big_data_string_that_is_no_image_stays_in_the_body():
    note = "data:text/plain," + "x" * 10_000
    body = chat(image_part(data_url(BIG)), {"type": "text", "text": note}, metadata={"url": note}, model=ALIAS)
    req = validate(encode(body), CONFIG, LIMITS)
    assert req.body["metadata"] == {"url": note}
    assert req.text_chars == len("edit this") + len(note)
    assert orjson.loads(req.raw) == {**body, "model": MODEL_ID}


def test_escaped_quotes_and_placeholder_lookalikes_are_not_cut():
    # A text that spells a data URL part inside escaped quotes, and a string that spells \u0000:
    # neither may be taken for a cut image.
    trick = '"image": "data:image/png;base64,' + "A" * 8000 + '"'
    body = chat(text_part(trick), image_part(data_url(BIG)), text_part("\x000"))
    req = validate(encode(body), CONFIG, LIMITS)
    assert [f.size for f in req.images] == [len(BIG)]
    assert req.body["messages"][0]["content"][1]["text"] == trick
    assert req.body["messages"][0]["content"][3]["text"] == "\x000"


@pytest.mark.parametrize("bad", [b"\n", b"\t", b"\x01", b"\xff"])
def test_a_raw_control_byte_in_a_big_image_is_invalid_json(bad):
    raw = encode(chat(image_part(data_url(BIG))))
    at = raw.index(b"base64,") + 5000
    with pytest.raises(InvalidRequest) as caught:
        validate(raw[:at] + bad + raw[at:], CONFIG, LIMITS)
    assert caught.value.code == "invalid_json"
    with pytest.raises(orjson.JSONDecodeError):  # what a JSON parser says of the same bytes
        orjson.loads(raw[:at] + bad + raw[at:])


def test_a_space_in_a_big_image_is_ignored_as_before():
    raw = encode(chat(image_part(data_url(BIG))))
    at = raw.index(b"base64,") + 5000
    (fact,) = validate(raw[:at] + b" " + raw[at:], CONFIG, LIMITS).images
    assert (fact.size, fact.sha256) == (len(BIG), hashlib.sha256(BIG).hexdigest())
