"""The upstream key cannot leave through a provider's headers, error bodies or 200 bodies."""
from __future__ import annotations

import base64
import random

import orjson
import pytest
from multidict import CIMultiDict

from gateway.upstream.secrets import ALLOWED_RESPONSE_HEADERS, KeyGuard, allowed_headers

KEY = "sk-sim-0123456789abcdefXYZ/q"  # a '/' so the \/ short escape is exercised too
GUARD = KeyGuard(KEY)


def escaped(key: str, every: int = 1, upper: bool = False, start: int = 0) -> bytes:
    """``key`` with every ``every``-th character (from ``start``) as ``\\uXXXX``; '/' left raw."""
    out = []
    for i, char in enumerate(key):
        if i >= start and (i - start) % every == 0:
            code = f"{ord(char):04x}"
            out.append("\\u" + (code.upper() if upper else code))
        else:
            out.append(char)
    return "".join(out).encode()


SPELLINGS = {
    "raw": KEY.encode(),
    "all escaped": escaped(KEY),
    "all escaped, upper-case hex": escaped(KEY, upper=True),
    "every other escaped": escaped(KEY, every=2),
    "one in three escaped": escaped(KEY, every=3, start=1),
    "only the first escaped": escaped(KEY, every=len(KEY)),
    "only the last escaped": escaped(KEY, every=len(KEY), start=len(KEY) - 1),
    "slash as \\/": KEY.replace("/", "\\/").encode(),
    "escapes and \\/": escaped(KEY, every=2).replace(b"/", b"\\/"),
}


def document(spelling: bytes) -> bytes:
    return b'{"choices":[{"message":{"content":"before ' + spelling + b' after"}}],"n":"\\\\"}'


def cleaned(chunks: list[bytes]) -> bytes:
    checker = GUARD.stream()
    return b"".join(checker.clean(chunk) for chunk in chunks) + checker.flush()


def test_only_allow_listed_headers_reach_the_client():
    upstream = CIMultiDict(
        {
            "Set-Cookie": "session=1",
            "x-ratelimit-remaining-requests": "3",  # our account's, not the team's
            "X-Debug-Auth": "Bearer " + KEY,
            "Authorization": "Bearer x",
            "X-Brand-New": "anything a provider invents",
            "Content-Type": "application/json",
            "Retry-After": "2",
            "retry-after-ms": "2000",
            "openai-processing-ms": "1200",
        }
    )
    assert allowed_headers(upstream, KEY) == {"Retry-After": "2", "retry-after-ms": "2000", "openai-processing-ms": "1200"}
    assert all(name == name.lower() for name in ALLOWED_RESPONSE_HEADERS)


@pytest.mark.parametrize("value", [KEY, "m " + KEY, escaped(KEY, every=2).decode(), KEY[4:14]])
def test_an_allowed_header_that_holds_the_key_is_dropped(value):
    assert allowed_headers({"openai-model": value, "Retry-After": "1"}, KEY) == {"Retry-After": "1"}
    assert allowed_headers([("openai-model", "gemini")]) == {"openai-model": "gemini"}


@pytest.mark.parametrize("name", list(SPELLINGS))
def test_an_error_body_is_redacted_after_decoding(name):
    body = b'{"error":{"message":"Incorrect API key provided: ' + SPELLINGS[name] + b'","code":"invalid_api_key"}}'
    out = GUARD.redact_json(body)
    assert orjson.loads(out) == {"error": {"message": "Incorrect API key provided: [redacted]", "code": "invalid_api_key"}}


def test_pieces_of_the_key_and_keys_of_objects_are_redacted_in_error_bodies():
    head, tail = KEY[:12], KEY[12:]
    body = orjson.dumps({"error": {"message": f"key {head}... ends {tail}", KEY: "x", "n": [1, KEY[3:11]]}})
    out = GUARD.redact_json(body)
    assert orjson.loads(out) == {"error": {"message": "key [redacted]... ends [redacted]", "[redacted]": "x", "n": [1, "[redacted]"]}}
    assert GUARD.redact_json(b'{"error":{"message":"fine"}}') == b'{"error":{"message":"fine"}}'


def test_an_error_body_that_is_not_json_is_redacted_as_bytes():
    out = GUARD.redact_json(b"<html>bad key " + escaped(KEY, every=2) + b" or " + KEY[:10].encode() + b"</html>")
    assert out == b"<html>bad key [redacted] or [redacted]</html>"


def test_an_empty_key_redacts_nothing():
    guard = KeyGuard("")
    assert guard.redact_json(b"{}") == b"{}"
    checker = guard.stream()
    assert checker.clean(b"anything") + checker.flush() == b"anything"


@pytest.mark.parametrize("name", list(SPELLINGS))
def test_a_200_body_split_at_every_position_has_the_key_replaced(name):
    body = document(SPELLINGS[name])
    for cut in range(len(body) + 1):
        out = cleaned([body[:cut], body[cut:]])
        assert orjson.loads(out)["choices"][0]["message"]["content"] == "before [redacted] after", (cut, out)


@pytest.mark.parametrize("name", ["raw", "every other escaped", "escapes and \\/"])
def test_a_200_body_fed_byte_by_byte_has_the_key_replaced(name):
    body = document(SPELLINGS[name]) * 3
    out = cleaned([body[i : i + 1] for i in range(len(body))])
    assert out == document(b"[redacted]") * 3


def test_only_a_tail_that_could_begin_the_key_is_held_back():
    checker = GUARD.stream()
    assert checker.clean(b"data: abc") == b"data: abc"
    assert checker.clean(b'"x sk-si') == b'"x '  # could be the key: held
    assert checker.clean(b"mple") == b"sk-simple"  # was not
    assert checker.clean(b"\\u007") == b""
    assert checker.flush() == b"\\u007"


def test_an_escaped_backslash_before_the_key_keeps_the_json_valid():
    # "\\u0073k..." is a backslash then the text "u0073k...": replacing from the second
    # backslash would leave an invalid escape; the escape stays and the key's text goes.
    body = b'{"t":"\\' + escaped(KEY, every=len(KEY)) + b'"}'
    assert orjson.loads(body)["t"] == "\\u0073" + KEY[1:]
    for cut in range(len(body) + 1):
        assert orjson.loads(cleaned([body[:cut], body[cut:]])) == {"t": "\\[redacted]"}
    # while a backslash character right before the key leaves the key a key
    body = b'{"t":"\\\\' + escaped(KEY, every=len(KEY)) + b'"}'
    assert orjson.loads(cleaned([body])) == {"t": "\\[redacted]"}


def test_base64_is_relayed_unchanged():
    rng = random.Random(8)
    image = base64.b64encode(rng.randbytes(3 << 20))
    body = b'{"choices":[{"message":{"images":[{"image_url":{"url":"data:image/png;base64,' + image + b'"}}]}}]}'
    chunks = [body[i : i + 65536] for i in range(0, len(body), 65536)]
    assert cleaned(chunks) == body
    # and with a JSON encoder that escapes every '/'
    slashed = body.replace(b"/", b"\\/")
    assert cleaned([slashed[i : i + 65536] for i in range(0, len(slashed), 65536)]) == slashed


def test_several_keys_in_one_sse_stream_are_all_replaced():
    events = b"".join(
        b'data: {"choices":[{"delta":{"content":"' + spelling + b'"}}]}\n\n' for spelling in SPELLINGS.values()
    )
    out = cleaned([events[i : i + 7] for i in range(0, len(events), 7)])
    assert out.count(b"[redacted]") == len(SPELLINGS) and KEY[:8].encode() not in out


@pytest.mark.parametrize("anchors", [0, 10, 5000], ids=["sparse", "a few", "dense"])
def test_the_raw_key_is_found_however_often_its_rare_byte_appears(anchors):
    # The raw key is searched by its first byte that base64 never holds ('-' here): a body full
    # of that byte falls back to searching for the whole key, and finds every copy all the same.
    rng = random.Random(anchors)
    filler = bytearray(base64.b64encode(rng.randbytes(30_000)))
    for i in rng.sample(range(len(filler)), anchors):
        filler[i] = ord("-")
    body = bytes(filler[:10_000]) + KEY.encode() + bytes(filler[10_000:20_000]) + KEY.encode() + b"sk-" + bytes(filler[20_000:])
    out = cleaned([body])
    assert out.count(b"[redacted]") == 2 and KEY.encode() not in out
    assert out.replace(b"[redacted]", b"") == body.replace(KEY.encode(), b"")
