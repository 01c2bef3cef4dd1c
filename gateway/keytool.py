"""Team keys: made here, stored in the config only as ``sha256:`` hashes, looked up by hash."""
from __future__ import annotations

import hashlib
import secrets

from gateway.config.schema import TEAM_NAME


def hash_key(key: str) -> str:
    """Lowercase sha256 hex of the key's UTF-8 bytes, without the ``sha256:`` prefix."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def new_team_key(team: str) -> tuple[str, str]:
    """A fresh key ``gw-<team>-<43 url-safe chars>`` (256 random bits) and its config line
    ``sha256:<hex>``. Show the key once; only the hash goes into the config."""
    if not TEAM_NAME.fullmatch(team):
        raise ValueError(f"team name {team!r} must be letters, digits, '_', '.' or '-'")
    key = f"gw-{team}-{secrets.token_urlsafe(32)}"
    return key, "sha256:" + hash_key(key)
