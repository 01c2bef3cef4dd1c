"""The gateway's error tree and its one renderer.

Every failure a client can see is a ``GatewayError``; lower-level exceptions (aiohttp client
errors, redis errors, JSON errors) are translated into one of these at the boundary where they
happen (``upstream/client.py``, ``store/``, ``validate.py``, ``answer.py``), never further in.
An upstream error's ``kind`` is its label in ``gateway_upstream_errors_total``.

    GatewayError
    ├── InvalidRequest          400 invalid_request_error / invalid_request|invalid_json|invalid_image|
    │                                                       unknown_model|too_many_images
    ├── AuthenticationFailed    401 authentication_error / invalid_api_key
    ├── Forbidden               403 permission_error / forbidden
    ├── NotFound                404 invalid_request_error / not_found
    ├── MethodNotAllowed        405 invalid_request_error / method_not_allowed
    ├── RequestTooLarge         413 invalid_request_error / request_too_large
    ├── UnsupportedMediaType    415 invalid_request_error / unsupported_media_type
    ├── LimitRefused            429
    │   ├── RateLimited             rate_limit_error / rate_limit_exceeded
    │   └── QuotaExceeded           insufficient_quota / insufficient_quota
    ├── UpstreamUnavailable     502 upstream_error / upstream_unavailable
    ├── UpstreamBadResponse     502 upstream_error / upstream_bad_response
    ├── StoreUnavailable        503 api_error / store_unavailable
    ├── ShuttingDown            503 api_error / shutting_down
    └── UpstreamTimeout         504 upstream_error / upstream_timeout
"""
from __future__ import annotations

import math
from typing import Mapping

import orjson
from aiohttp import web


class GatewayError(Exception):
    """An error with everything needed to answer the client in the provider's JSON shape."""

    status = 500
    type = "api_error"
    code = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        # Messages may quote header text, which aiohttp keeps as surrogates when it is not
        # UTF-8: escape them here, once, so no answer fails to encode.
        message = message.encode("utf-8", "backslashreplace").decode()
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.param = param
        self.headers: dict[str, str] = dict(headers or {})

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "code": self.code, "param": self.param}}

    def sse_event(self) -> bytes:
        """The final event of a stream that failed after its first byte."""
        return b"data: " + orjson.dumps(self.body()) + b"\n\n"


class InvalidRequest(GatewayError):
    status, type, code = 400, "invalid_request_error", "invalid_request"


class RequestTimeout(GatewayError):
    status, type, code = 408, "invalid_request_error", "request_timeout"


class AuthenticationFailed(GatewayError):
    status, type, code = 401, "authentication_error", "invalid_api_key"


class Forbidden(GatewayError):
    status, type, code = 403, "permission_error", "forbidden"


class NotFound(GatewayError):
    status, type, code = 404, "invalid_request_error", "not_found"


class MethodNotAllowed(GatewayError):
    status, type, code = 405, "invalid_request_error", "method_not_allowed"


class RequestTooLarge(GatewayError):
    status, type, code = 413, "invalid_request_error", "request_too_large"

    @classmethod
    def over(cls, limit_bytes: int) -> RequestTooLarge:
        """A body over ``server.max_body_mb``: the connection closes (the rest is not read)."""
        return cls(f"The request body is over the gateway's limit of {limit_bytes // (1024 * 1024)} MB.",
                   headers={"Connection": "close"})


class UnsupportedMediaType(GatewayError):
    status, type, code = 415, "invalid_request_error", "unsupported_media_type"


def retry_headers(retry_after_s: float) -> dict[str, str]:
    """``retry-after`` (whole seconds, rounded up) and ``retry-after-ms`` for 429 and 503."""
    retry_after_s = max(0.0, retry_after_s)
    return {
        "retry-after": str(max(1, math.ceil(retry_after_s))),
        "retry-after-ms": str(max(1, math.ceil(retry_after_s * 1000))),
    }


class LimitRefused(GatewayError):
    """A 429: a limit or quota said no; ``limit`` names it, ``retry_after_s`` says when it passes."""

    status = 429

    def __init__(self, message: str, *, limit: str, retry_after_s: float, headers: Mapping[str, str] | None = None):
        super().__init__(message, headers={**(headers or {}), **retry_headers(retry_after_s)})
        self.limit = limit
        self.retry_after_s = retry_after_s


class RateLimited(LimitRefused):
    type, code = "rate_limit_error", "rate_limit_exceeded"


class QuotaExceeded(LimitRefused):
    type, code = "insufficient_quota", "insufficient_quota"


class UpstreamUnavailable(GatewayError):
    status, type, code = 502, "upstream_error", "upstream_unavailable"
    kind = "disconnect"  # the seam counts a connection never made as "connect" itself


class UpstreamBadResponse(GatewayError):
    status, type, code = 502, "upstream_error", "upstream_bad_response"
    kind = "bad_response"


class StoreUnavailable(GatewayError):
    status, type, code = 503, "api_error", "store_unavailable"

    def __init__(self, message: str = "The gateway's store is unavailable; try again shortly.", **kw):
        super().__init__(message, **kw)
        self.headers.update(retry_headers(1.0))


class ShuttingDown(GatewayError):
    """A request that reached a replica after it stopped taking work, or still running when its
    shutdown timeout ran out; another replica can take it (the connection is closed)."""

    status, type, code = 503, "api_error", "shutting_down"

    def __init__(self, message: str = "This gateway replica is shutting down; retry the request.", **kw):
        super().__init__(message, **kw)
        self.headers.update({**retry_headers(1.0), "Connection": "close"})


class UpstreamTimeout(GatewayError):
    status, type, code = 504, "upstream_error", "upstream_timeout"
    kind = "timeout"


def error_response(err: GatewayError, headers: Mapping[str, str] | None = None) -> web.Response:
    """The one place an error becomes an HTTP response."""
    return web.Response(
        status=err.status,
        body=orjson.dumps(err.body()),
        content_type="application/json",
        headers={**err.headers, **(headers or {})},
    )
