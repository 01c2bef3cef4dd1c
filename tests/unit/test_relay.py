"""Retry-After and the provider's error code at the upstream boundary (headers and the key:
tests/unit/test_secrets.py)."""
from __future__ import annotations

import pytest
from multidict import CIMultiDict

from gateway.upstream.client import MAX_RETRY_AFTER_S, _retry_after
from gateway.upstream.relay import provider_code
from gateway.upstream.secrets import KeyGuard

KEY = "sk-provider-0123456789abcdef"


def test_retry_after_prefers_milliseconds_and_is_capped():
    assert _retry_after(CIMultiDict({"retry-after-ms": "1500", "retry-after": "9"})) == 1.5
    assert _retry_after(CIMultiDict({"retry-after": "2"})) == 2.0
    assert _retry_after(CIMultiDict({"retry-after": "3600"})) == MAX_RETRY_AFTER_S
    assert _retry_after(CIMultiDict({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"})) is None
    assert _retry_after(CIMultiDict()) is None


@pytest.mark.parametrize("code,logged", [
    ("rate_limit_exceeded", "rate_limit_exceeded"),
    ("model:not-found.v2", "model:not-found.v2"),
    ("x" * 65, "upstream_400"),  # unbounded
    ("bad code\nwith a newline", "upstream_400"),
    (f"key_{KEY}", "upstream_400"),  # the provider quoting our key
    (KEY[:12], "upstream_400"),  # or a piece of it
    (400, "upstream_400"),
    (None, "upstream_400"),
])
def test_only_a_short_plain_provider_code_without_the_key_is_logged(code, logged):
    assert provider_code(code, KeyGuard(KEY), "upstream_400") == logged
