"""The provider's error bodies, exactly as upstream/API.md shows them.

The simulator answers every refusal with ``{"error": {"message", "type", "code"}}`` (no
``param``: the provider sends none, and the gateway must cope with that). Injected ``status=``
faults reuse the same table so a faked 429 or 503 looks like the real thing.
"""
from __future__ import annotations

from typing import Mapping

import orjson
from aiohttp import web

from .faults import number_text

# status -> (message, type, code). The 400/401/429 rows are the provider's own words.
_BY_STATUS: dict[int, tuple[str, str, str]] = {
    400: ("Invalid request.", "invalid_request_error", "invalid_request"),
    401: ("Invalid API key.", "authentication_error", "invalid_api_key"),
    403: ("Permission denied.", "permission_error", "forbidden"),
    404: ("Not found.", "invalid_request_error", "not_found"),
    408: ("Request timed out.", "timeout_error", "request_timeout"),
    413: ("Request too large.", "invalid_request_error", "request_too_large"),
    429: ("Rate limit exceeded.", "rate_limit_error", "rate_limit_exceeded"),
    500: ("Internal server error.", "api_error", "internal_error"),
    502: ("Bad gateway.", "api_error", "bad_gateway"),
    503: ("Service temporarily unavailable.", "api_error", "service_unavailable"),
    504: ("Gateway timeout.", "api_error", "gateway_timeout"),
}


class SimError(Exception):
    """A refusal the simulator sends as a provider-shaped JSON error."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str,
        code: str,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.headers = dict(headers or {})

    def response(self) -> web.Response:
        body = {"error": {"message": self.message, "type": self.type, "code": self.code}}
        return web.Response(
            status=self.status,
            body=orjson.dumps(body),
            content_type="application/json",
            headers=self.headers,
        )


def for_status(status: int, retry_after: float | None = None) -> SimError:
    """The error the provider would send with this HTTP status (used by ``status=`` faults)."""
    default = ("Invalid request.", "invalid_request_error", "invalid_request")
    if status >= 500:
        default = ("Upstream server error.", "api_error", "server_error")
    message, type_, code = _BY_STATUS.get(status, default)
    headers = {}
    if retry_after is not None:
        headers["Retry-After"] = number_text(retry_after)
    return SimError(status, message, type_, code, headers)


def invalid_api_key() -> SimError:
    return for_status(401)


def invalid_image() -> SimError:
    return SimError(400, "Invalid image format.", "invalid_request_error", "invalid_image")


def invalid_request(message: str, code: str = "invalid_request") -> SimError:
    return SimError(400, message, "invalid_request_error", code)
