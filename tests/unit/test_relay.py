"""Header filtering, key redaction and Retry-After reading at the upstream boundary."""
from __future__ import annotations

from multidict import CIMultiDict

from gateway.upstream.relay import passthrough_headers, redact
from gateway.upstream.client import MAX_RETRY_AFTER_S, _retry_after


def test_hop_by_hop_framing_and_gateway_owned_headers_are_dropped():
    upstream = CIMultiDict(
        {
            "Connection": "keep-alive",
            "Keep-Alive": "timeout=5",
            "Transfer-Encoding": "chunked",
            "Content-Length": "12",
            "Content-Encoding": "gzip",
            "Set-Cookie": "s=1",
            "X-Request-ID": "upstream-id",
            "x-ratelimit-remaining-requests": "3",  # the shared account's, not the team's
            "Content-Type": "application/json",
            "Retry-After": "2",
            "X-Provider-Trace": "abc",
        }
    )
    assert passthrough_headers(upstream) == {"Content-Type": "application/json", "Retry-After": "2", "X-Provider-Trace": "abc"}


def test_the_key_and_any_long_piece_of_it_are_redacted():
    key = "sk-live-0123456789abcdef"
    body = f'{{"error":{{"message":"bad key {key} (ends ...89abcdef)"}}}}'.encode()
    out = redact(body, key)
    assert b"sk-live" not in out and b"89abcdef" not in out and b"[redacted]" in out
    assert redact(b'{"error":{"message":"fine"}}', key) == b'{"error":{"message":"fine"}}'
    assert redact(b"anything", "") == b"anything"


def test_retry_after_prefers_milliseconds_and_is_capped():
    assert _retry_after(CIMultiDict({"retry-after-ms": "1500", "retry-after": "9"})) == 1.5
    assert _retry_after(CIMultiDict({"retry-after": "2"})) == 2.0
    assert _retry_after(CIMultiDict({"retry-after": "3600"})) == MAX_RETRY_AFTER_S
    assert _retry_after(CIMultiDict({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"})) is None
    assert _retry_after(CIMultiDict()) is None
