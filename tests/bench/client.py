"""The bench's Python load client, a separate process (for what wrk does not fit).

    python -m tests.bench.client sequential --url U --body FILE --count K [--fetch-links 1]
        K requests one after the other; prints JSON {"seconds": [...], "statuses": [...], "bytes": [...],
        "fetched": [...]}; with --fetch-links 1 each answer's image links are then fetched (GET, no
        key), their time counted in "seconds" and their bytes in "fetched"
    python -m tests.bench.client burst --url U --body FILE --concurrency N
        N requests at once; prints JSON {"ok": n, "statuses": {...}, "errors": {...}, "wall_s": s}
    python -m tests.bench.client load --url U --body FILE --body2 FILE2 --seconds S
        for S seconds, FILE (the 60 MB upload) and FILE2 (a 10 MB answer) one after the other,
        each on its own connection, concurrently; prints JSON {"done": [n, n2], "statuses": {...}}
    python -m tests.bench.client probe --url U --body FILE --seconds S
        small requests one after the other for S seconds; prints JSON {"ms": [...]}: each one's
        latency. Run next to ``load``, its worst latency is the event-loop stall the big transfers cause

Both send ``Authorization: Bearer <--key>`` and read every response to its end.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import json
import time
from pathlib import Path

import aiohttp

from .upstream import raise_nofile, use_uvloop


async def _one(session: aiohttp.ClientSession, url: str, body: bytes, headers: dict) -> tuple[int, int]:
    async with session.post(url, data=body, headers=headers) as resp:
        size = 0
        async for chunk in resp.content.iter_any():
            size += len(chunk)
        return resp.status, size


async def _answer_and_links(session: aiohttp.ClientSession, url: str, body: bytes, headers: dict) -> tuple[int, int, int]:
    """A chat answer, then every image link in it (a browser's ``<img src>``): status, answer bytes, image bytes."""
    async with session.post(url, data=body, headers=headers) as resp:
        answer = await resp.read()
        status = resp.status
    fetched = 0
    for choice in json.loads(answer).get("choices", []) if status == 200 else []:
        for image in choice["message"].get("images") or []:
            link = image["image_url"]["url"]
            if link.startswith("http"):
                async with session.get(link) as got:
                    got.raise_for_status()
                    async for chunk in got.content.iter_any():
                        fetched += len(chunk)
    return status, len(answer), fetched


def _session(limit: int) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=limit),
        timeout=aiohttp.ClientTimeout(total=120),
        auto_decompress=False,
    )


async def sequential(url: str, body: bytes, headers: dict, count: int, fetch_links: bool = False) -> dict:
    out = {"seconds": [], "statuses": [], "bytes": [], "fetched": []}
    async with _session(1) as session:
        for _ in range(count):
            started = time.perf_counter()
            if fetch_links:
                status, size, fetched = await _answer_and_links(session, url, body, headers)
            else:
                (status, size), fetched = await _one(session, url, body, headers), 0
            out["seconds"].append(time.perf_counter() - started)
            out["statuses"].append(status)
            out["bytes"].append(size)
            out["fetched"].append(fetched)
    return out


async def load(url: str, bodies: list[bytes], headers: dict, seconds: float) -> dict:
    statuses: collections.Counter = collections.Counter()
    done = [0] * len(bodies)
    end = time.perf_counter() + seconds
    async with _session(len(bodies)) as session:

        async def repeat(i: int) -> None:
            while time.perf_counter() < end:
                status, _ = await _one(session, url, bodies[i], headers)
                statuses[str(status)] += 1
                done[i] += 1

        await asyncio.gather(*(repeat(i) for i in range(len(bodies))))
    return {"done": done, "statuses": dict(statuses)}


async def probe(url: str, body: bytes, headers: dict, seconds: float) -> dict:
    latencies = []
    end = time.perf_counter() + seconds
    async with _session(1) as session:
        while time.perf_counter() < end:
            started = time.perf_counter()
            status, _ = await _one(session, url, body, headers)
            if status != 200:
                raise RuntimeError(f"probe answered HTTP {status}")
            latencies.append((time.perf_counter() - started) * 1000)
    return {"ms": latencies}


async def burst(url: str, body: bytes, headers: dict, concurrency: int) -> dict:
    statuses: collections.Counter = collections.Counter()
    errors: collections.Counter = collections.Counter()
    async with _session(0) as session:  # no pool limit: every request on its own connection

        async def one() -> None:
            try:
                status, _ = await _one(session, url, body, headers)
                statuses[str(status)] += 1
            except Exception as e:  # noqa: BLE001 - counted and reported, never raised
                errors[type(e).__name__] += 1

        started = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(concurrency)))
        wall = time.perf_counter() - started
    return {"ok": statuses.get("200", 0), "statuses": dict(statuses), "errors": dict(errors), "wall_s": wall}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="bench load client")
    p.add_argument("mode", choices=("sequential", "burst", "load", "probe"))
    p.add_argument("--url", required=True)
    p.add_argument("--body", required=True, type=Path)
    p.add_argument("--body2", type=Path, help="load: the second body, sent concurrently with --body")
    p.add_argument("--seconds", type=float, default=3.0, help="load, probe: how long")
    p.add_argument("--key", default="key-bench")
    p.add_argument("--count", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=2000)
    p.add_argument("--fetch-links", type=int, default=0, help="sequential: 1 = then GET each answer's image links")
    args = p.parse_args(argv)
    raise_nofile()
    use_uvloop()
    body = args.body.read_bytes()
    headers = {"Authorization": f"Bearer {args.key}", "Content-Type": "application/json"}
    if args.mode == "sequential":
        result = asyncio.run(sequential(args.url, body, headers, args.count, bool(args.fetch_links)))
    elif args.mode == "load":
        result = asyncio.run(load(args.url, [body, args.body2.read_bytes()], headers, args.seconds))
    elif args.mode == "probe":
        result = asyncio.run(probe(args.url, body, headers, args.seconds))
    else:
        result = asyncio.run(burst(args.url, body, headers, args.concurrency))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
