"""Signed image links: ``<base>/v1/images/files/<name>?expires=<unix s>&signature=<sig>``.

``name`` is a stored image's name (``<sha256 hex>.<ext>``, see ``storage``); ``signature`` is
HMAC-SHA256 with ``images.signing_key`` over ``name``, a newline and ``expires``, in unpadded
base64url. So a link cannot be moved to another image or made to live longer, and holding one
proves nothing about any other. A link is checked in constant time (``hmac.compare_digest``);
its signature first, so a forged link is told apart from an expired one without revealing
whether the image exists.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import re
import time
from typing import Callable
from urllib.parse import urlencode

FILES_PATH = "/v1/images/files/"
NAME = re.compile(r"[0-9a-f]{64}\.(png|jpg|webp|gif)")  # what storage names look like
_EXPIRES = re.compile(r"[0-9]{1,12}")


class LinkSigner:
    """Signs and checks links with one key; ``clock`` (epoch seconds) is injectable for tests."""

    def __init__(self, key: str, *, clock: Callable[[], float] = time.time) -> None:
        if not key:
            raise ValueError("image links need images.signing_key")
        self._key = key.encode()
        self.clock = clock

    def signature(self, name: str, expires: int) -> str:
        mac = hmac.new(self._key, f"{name}\n{expires}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac).rstrip(b"=").decode()

    def url(self, base: str, name: str, ttl_s: int) -> str:
        """A link to the image ``name`` under ``base`` (scheme and host, maybe a path), valid ``ttl_s``."""
        expires = int(self.clock()) + ttl_s
        query = urlencode({"expires": expires, "signature": self.signature(name, expires)})
        return f"{base.rstrip('/')}{FILES_PATH}{name}?{query}"

    def check(self, name: str, expires: str | None, signature: str | None) -> int | None:
        """The seconds the link has left (0 or less: expired), or None if it is not ours:
        a malformed name or expiry, a missing or wrong signature."""
        if not (NAME.fullmatch(name) and expires and _EXPIRES.fullmatch(expires) and signature):
            return None
        if not hmac.compare_digest(self.signature(name, int(expires)).encode(), signature.encode("utf-8", "replace")):
            return None
        return int(expires) - int(self.clock())
