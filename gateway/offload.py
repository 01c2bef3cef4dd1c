"""CPU work on big payloads (parsing, encoding, base64, hashing) goes to a thread, so the event
loop keeps serving every other stream; small payloads stay on the loop, where a thread hop would
cost more than the work."""
from __future__ import annotations

import asyncio
from typing import Any, Callable

OFFLOAD_BYTES = 1 << 20  # above this much input, the work leaves the event loop


async def run(fn: Callable[..., Any], *args: Any, size: int, threshold: int = OFFLOAD_BYTES) -> Any:
    """``fn(*args)``, in a thread when ``size`` (the bytes it works on) is over ``threshold``."""
    if size > threshold:
        return await asyncio.to_thread(fn, *args)
    return fn(*args)
