"""admit(team, request) -> Admission: per-team rate limits, concurrency leases and quotas.

STUB: interface only; being implemented.
"""
from __future__ import annotations

from typing import Protocol

from .config import Team
from .usage import Usage
from .validate import ChatRequest


class Admission(Protocol):
    headers: dict[str, str]  # x-ratelimit-* for the response

    async def settle(self, usage: Usage, *, cached: bool = False) -> None:
        """Exactly once per admitted request: release the lease, settle tokens/dollars, write the ledger."""


class Limiter(Protocol):
    async def admit(self, team: Team, request: ChatRequest) -> Admission:
        """Raise RateLimited, QuotaExceeded, or StoreUnavailable (on_error: closed)."""
