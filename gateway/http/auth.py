"""Bearer key -> Team, by the SHA-256 of the key: the config never holds a raw key."""
from __future__ import annotations

import hmac

from aiohttp import web

from gateway.config import Config, Team
from gateway.errors import AuthenticationFailed, Forbidden
from gateway.keytool import hash_key

FINGERPRINT_HEX = 8  # enough to tell a team's keys apart; far too few to find the key


def bearer_token(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def _digest(token: str) -> str | None:
    """The key's hash; None for a header that is not UTF-8 (aiohttp keeps such bytes as
    surrogates), which no key can be."""
    try:
        return hash_key(token)
    except UnicodeEncodeError:
        return None


class Authenticator:
    def __init__(self, config: Config) -> None:
        self._teams = {h: team for team in config.teams for h in team.key_hashes}
        self._admin = frozenset(config.admin.key_hashes)

    def team(self, request: web.Request) -> Team:
        return self.identify(request)[0]

    def identify(self, request: web.Request) -> tuple[Team, str]:
        """The key's team and the key's fingerprint: the first 8 hex of its sha256, as the config
        holds it (``sha256:<hex>``), so logs can say which key was used without holding it."""
        token = bearer_token(request)
        digest = _digest(token) if token else None
        team = self._teams.get(digest) if digest else None
        if team is None:
            raise AuthenticationFailed(
                "Invalid API key. Send your team's key as 'Authorization: Bearer <key>'."
                if token
                else "Missing API key. Send your team's key as 'Authorization: Bearer <key>'."
            )
        return team, digest[:FINGERPRINT_HEX]

    def admin(self, request: web.Request) -> None:
        token = bearer_token(request)
        if not token:
            raise AuthenticationFailed("Missing API key. Admin routes need 'Authorization: Bearer <admin key>'.")
        digest = _digest(token) or ""
        if not any(hmac.compare_digest(digest, h) for h in self._admin):
            raise Forbidden("This route needs an admin key.")
