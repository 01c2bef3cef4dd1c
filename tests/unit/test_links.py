"""Signed image links: what a link looks like, and that no change to it keeps it valid."""
from __future__ import annotations

import base64
import hashlib
import hmac
from urllib.parse import parse_qs, urlsplit

import pytest

from gateway.images.links import FILES_PATH, LinkSigner

KEY = "k" * 40
NAME = "ab" * 32 + ".png"
NOW = 1_800_000_000


def signer(now: float = NOW, key: str = KEY) -> LinkSigner:
    return LinkSigner(key, clock=lambda: now)


def parts(url: str) -> tuple[str, str, str]:
    u = urlsplit(url)
    q = {k: v[0] for k, v in parse_qs(u.query).items()}
    return u.path.removeprefix(FILES_PATH), q["expires"], q["signature"]


def test_a_link_is_the_route_with_expiry_and_an_hmac_sha256_of_name_and_expiry():
    url = signer().url("https://img.example/", NAME, 3600)
    assert url.startswith(f"https://img.example{FILES_PATH}{NAME}?expires={NOW + 3600}&signature=")
    name, expires, sig = parts(url)
    mac = hmac.new(KEY.encode(), f"{NAME}\n{NOW + 3600}".encode(), hashlib.sha256).digest()
    assert base64.urlsafe_b64decode(sig + "=") == mac
    assert signer().check(name, expires, sig) == 3600


def test_time_left_counts_down_and_goes_negative_after_expiry():
    name, expires, sig = parts(signer().url("http://gw", NAME, 60))
    assert signer(NOW + 59).check(name, expires, sig) == 1
    assert signer(NOW + 60).check(name, expires, sig) == 0
    assert signer(NOW + 3600).check(name, expires, sig) < 0


@pytest.mark.parametrize("tamper", ["name", "expires", "signature", "key", "missing", "empty", "not a number",
                                    "not a name", "non-ascii"])
def test_any_change_makes_the_link_not_ours(tamper):
    name, expires, sig = parts(signer().url("http://gw", NAME, 60))
    check = signer().check
    if tamper == "name":
        name = "cd" * 32 + ".png"
    elif tamper == "expires":
        expires = str(int(expires) + 86400)
    elif tamper == "signature":
        sig = sig[:-1] + ("A" if sig[-1] != "A" else "B")
    elif tamper == "key":
        check = signer(key="other" * 8).check
    elif tamper == "missing":
        sig = None
    elif tamper == "empty":
        sig = ""
    elif tamper == "not a number":
        expires = "1e9"
    elif tamper == "not a name":
        name = "../../etc/passwd"
    elif tamper == "non-ascii":
        sig = "é" * len(sig)
    assert check(name, expires, sig) is None


def test_a_signer_needs_a_key():
    with pytest.raises(ValueError):
        LinkSigner("")
