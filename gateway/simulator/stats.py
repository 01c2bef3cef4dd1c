"""What the simulator saw, for tests to assert on through ``GET /_sim/stats``.

Tests of the gateway cannot see the upstream directly; these counters are how they check that
a retry really reached the upstream twice, that a client disconnect cancelled the upstream
request, or that a concurrency limit held (``peak_inflight`` per ``user`` group).

A call ends with one outcome: ``completed`` (a whole 200 answer), ``error`` (a JSON error,
injected or real), ``reset`` / ``not_http`` / ``garbage`` / ``cut`` (the fault of that name),
``stream_error`` (the ``echo_key_stream_error`` fault's final error event), or
``cancelled`` (the client went away: the handler got ``CancelledError``, or, on a runner
without ``handler_cancellation``, its next write found the connection gone).
"""
from __future__ import annotations

import asyncio
from collections import Counter, deque
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Iterator

_KEEP_RECENT = 200


@dataclass
class CallRecord:
    """One chat request's summary; the handler fills in fault, status and outcome as it goes."""

    model: str
    stream: bool
    user: str  # the body's ``user``, or "-": the group inflight counts are kept by
    n_images: int
    fault: str = ""
    traceparent: str | None = None  # the W3C trace context the caller sent, if any
    status: int | None = None  # None when no HTTP response was sent
    outcome: str = "unfinished"

    def finish(self, status: int | None, outcome: str) -> None:
        self.status = status
        self.outcome = outcome


class Stats:
    def __init__(self) -> None:
        self.inflight: Counter[str] = Counter()
        self.reset()

    def reset(self) -> None:
        """Forget the history. Calls still in flight stay counted (they will end later)."""
        self.calls = 0
        self.outcomes: Counter[str] = Counter()
        self.peak_inflight: Counter[str] = +self.inflight
        self.recent: deque[CallRecord] = deque(maxlen=_KEEP_RECENT)

    @contextmanager
    def track(self, record: CallRecord) -> Iterator[CallRecord]:
        """Count a call from its start to its end, however it ends."""
        group = record.user
        self.calls += 1
        self.inflight[group] += 1
        self.peak_inflight[group] = max(self.peak_inflight[group], self.inflight[group])
        try:
            yield record
        except asyncio.CancelledError:
            record.finish(None, "cancelled")
            raise
        finally:
            self.inflight[group] -= 1
            self.outcomes[record.outcome] += 1
            self.recent.append(record)

    def snapshot(self, script_pending: int) -> dict[str, Any]:
        return {
            "calls": self.calls,
            "completed": self.outcomes["completed"],
            "cancelled": self.outcomes["cancelled"],
            "outcomes": dict(self.outcomes),
            "inflight": {group: n for group, n in self.inflight.items() if n},
            "peak_inflight": dict(self.peak_inflight),
            "script_pending": script_pending,
            "requests": [asdict(record) for record in self.recent],
        }
