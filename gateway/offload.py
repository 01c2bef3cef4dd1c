"""CPU work on big payloads (parsing, encoding, base64, hashing) goes to a thread, so the event
loop keeps serving every other stream; small payloads stay on the loop, where a thread hop would
cost more than the work.

A thread runs beside the loop only while it does not hold the GIL: hashing, ``bytes.join`` and
I/O drop it, while orjson, pybase64 and ``bytes.find`` hold it for their whole call, so a long
call of theirs stalls the loop as much in a thread (plus the wait for the GIL to come back):
those are kept short instead (sliced, or cut down to what must be parsed)."""
from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

OFFLOAD_BYTES = 1 << 20  # above this much input, the work leaves the event loop

# One thread for the big joins: each thread allocates from its own malloc arena, and with the
# default pool's several threads every 10 MB answer faulted in fresh pages (the gateway's CPU per
# answer 1.64x the minimal proxy's, against 1.16x with one thread, which gets back the buffers it
# handed out with their pages still mapped).
_JOINER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="offload-join")


async def run(fn: Callable[..., Any], *args: Any, size: int, threshold: int = OFFLOAD_BYTES) -> Any:
    """``fn(*args)``, in a thread when ``size`` (the bytes it works on) is over ``threshold``."""
    if size > threshold:
        return await asyncio.to_thread(fn, *args)
    return fn(*args)


async def join(pieces: list[bytes], size: int) -> bytes:
    """``b"".join(pieces)`` (``size`` bytes in all), in a thread when big: ``bytes.join`` drops the
    GIL past 1 MiB, so the copy and the page faults of its fresh buffer (~0.7 ms a MB on a VM;
    a 10 MB body's held the loop 5-8 ms) run beside the loop instead of stalling it."""
    if size > OFFLOAD_BYTES:
        return await asyncio.get_running_loop().run_in_executor(_JOINER, b"".join, pieces)
    return b"".join(pieces)
