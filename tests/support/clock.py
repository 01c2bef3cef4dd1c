"""An injected clock for tests: UNIX time frozen at ``t`` (default: now, whole seconds), moved
only by ``advance``; the app, the limiter and link signing all take it in place of time.time."""
from __future__ import annotations

import time
from datetime import datetime


class Clock:
    def __init__(self, t: float | datetime | None = None):
        if t is None:
            t = float(int(time.time()))
        self.t = t.timestamp() if isinstance(t, datetime) else t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds
