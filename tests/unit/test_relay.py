"""Retry-After reading at the upstream boundary (headers and the key: tests/unit/test_secrets.py)."""
from __future__ import annotations

from multidict import CIMultiDict

from gateway.upstream.client import MAX_RETRY_AFTER_S, _retry_after


def test_retry_after_prefers_milliseconds_and_is_capped():
    assert _retry_after(CIMultiDict({"retry-after-ms": "1500", "retry-after": "9"})) == 1.5
    assert _retry_after(CIMultiDict({"retry-after": "2"})) == 2.0
    assert _retry_after(CIMultiDict({"retry-after": "3600"})) == MAX_RETRY_AFTER_S
    assert _retry_after(CIMultiDict({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"})) is None
    assert _retry_after(CIMultiDict()) is None
