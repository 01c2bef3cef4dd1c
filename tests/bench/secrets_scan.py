"""How fast the upstream-key checker scans 200 bodies: ``python -m tests.bench.secrets_scan``.

Feeds 10, 30 and 60 MB base64 bodies (JSON, then the same with every ``/`` escaped as ``\\/``)
through ``KeyGuard.stream()`` in 64 KiB chunks, as aiohttp hands them over, and prints MB/s. The
rate should not fall as the body grows (the scan is linear) and should stay far above what a
gateway relays per second.
"""
from __future__ import annotations

import base64
import random
import time

from gateway.upstream.secrets import KeyGuard

CHUNK = 64 * 1024


def body(megabytes: int, escaped_slashes: bool) -> bytes:
    image = base64.b64encode(random.Random(megabytes).randbytes(megabytes * 3 << 18))
    data = b'{"choices":[{"message":{"images":[{"image_url":{"url":"data:image/png;base64,' + image + b'"}}]}}]}'
    return data.replace(b"/", b"\\/") if escaped_slashes else data


def scan(guard: KeyGuard, data: bytes) -> float:
    started = time.perf_counter()
    checker = guard.stream()
    size = sum(len(checker.clean(data[i : i + CHUNK])) for i in range(0, len(data), CHUNK))
    size += len(checker.flush())
    elapsed = time.perf_counter() - started
    assert size == len(data)
    return elapsed


def main() -> None:
    guard = KeyGuard("sk-or-v1-" + "0123456789abcdef" * 4)
    print(f"{'body':<24}{'MB':>6}{'seconds':>10}{'MB/s':>10}")
    for escaped_slashes in (False, True):
        for megabytes in (10, 30, 60):
            data = body(megabytes, escaped_slashes)
            elapsed = min(scan(guard, data) for _ in range(3))
            name = "base64, \\/ escaped" if escaped_slashes else "base64"
            print(f"{name:<24}{len(data) / 1e6:>6.0f}{elapsed:>10.3f}{len(data) / 1e6 / elapsed:>10.0f}")


if __name__ == "__main__":
    main()
