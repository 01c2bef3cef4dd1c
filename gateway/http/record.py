"""One request's facts, filled in as it moves down the pipeline.

The handler writes what it learns here; the metrics and the access log read it once, when the
response is done. Nothing here may hold a key, a prompt or base64.
"""
from __future__ import annotations

import enum
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gateway.usage import Usage

if TYPE_CHECKING:  # OpenTelemetry is imported only when tracing is configured
    from gateway.observability.tracing import RequestTrace

_NO_SPAN = nullcontext()


def new_request_id() -> str:
    """32 random hex digits, as uuid4().hex spells them, without building a UUID per request."""
    return os.urandom(16).hex()


class Phase(enum.IntEnum):
    """How far a request got. What may still be written to the client, which status is logged
    and what is charged follow from the phase it reached, on every exit (error, timeout,
    cancellation, client gone)."""

    RECEIVED = 0  # not admitted: nothing reserved, nothing to charge
    ADMITTED = 1  # limits taken: settle must run
    SENT_UPSTREAM = 2  # bytes of the request may have reached the provider: it may bill us
    ANSWER_STARTED = 3  # the client has the status line: only the body (or an error event) may follow
    ANSWER_FINISHED = 4  # the client has every byte: a later disconnect changes nothing


@dataclass(slots=True)
class RequestRecord:
    request_id: str
    method: str
    path: str
    started: float = field(default_factory=time.perf_counter)
    team: str | None = None
    model: str = "other"  # the configured model id (aliases folded), else "other"
    stream: bool = False
    cache: str = "none"  # hit | miss | bypass | none
    status: int = 0
    phase: Phase = Phase.RECEIVED
    error_code: str | None = None
    finish_reason: str | None = None  # the provider's: native if sent (IMAGE_SAFETY shows a safety block)
    upstream_s: float = 0.0  # time spent waiting on the upstream (excluded from overhead)
    client_wait_s: float = 0.0  # time spent waiting for the client to take bytes (likewise)
    ttfb_s: float | None = None  # from arrival to the first byte of the response body
    bytes_in: int = 0
    bytes_out: int = 0
    usage: Usage | None = None
    duration_s: float = 0.0  # set when the response is finished
    key_fingerprint: str | None = None  # the first 8 hex of the team key's sha256 (as in the config)
    response_model: str | None = None  # the model the provider says answered
    trace: RequestTrace | None = None  # set only when tracing is configured
    trace_id: str | None = None  # the trace's id, for log lines (likewise)

    def finish(self) -> None:
        self.duration_s = time.perf_counter() - self.started

    def reach(self, phase: Phase) -> None:
        """Phases only move forward."""
        if phase > self.phase:
            self.phase = phase

    def first_byte(self) -> None:
        if self.ttfb_s is None:
            self.ttfb_s = time.perf_counter() - self.started
            if self.trace is not None:
                self.trace.event("first_byte")

    def span(self, name: str) -> Any:
        """``with rec.span("cache"):`` a child span of the request's; nothing when tracing is off."""
        return _NO_SPAN if self.trace is None else self.trace.child(name)

    @property
    def overhead_s(self) -> float:
        return max(0.0, self.duration_s - self.upstream_s - self.client_wait_s)
