"""The scenarios: each starts its contestants, alternates them round by round, returns Rows.

Contestants of one scenario are measured A B C, A B C, ... so drift (thermal, page cache,
other load on the machine) spreads evenly over them; the table shows each one's median.
Every contestant is probed once before it is measured: a wrong status stops the bench with
that process's log, so a fast error path is never reported as throughput.
"""
from __future__ import annotations

import collections
import statistics
import timeit
from typing import Callable

from gateway.http.record import RequestRecord

from .contestants import UNLIMITED, Bench, Contestant
from .loadgen import client, probe, wrk
from .report import Row

VS_REFS = {"vs direct": "direct", "vs minimal": "minimal proxy"}
MIB = 1024 * 1024


def expect_ok(c: Contestant, body: bytes) -> tuple[dict[str, str], bytes]:
    status, headers, data = probe(c.url, body)
    if status != 200:
        raise RuntimeError(f"{c.name} answered HTTP {status}: {data[:300]!r}\n{c.proc.tail()}")
    return headers, data


def alternate(b: Bench, scenario: str, contestants: list[Contestant], measure: Callable, show: Callable) -> dict:
    results: dict[str, list] = {c.name: [] for c in contestants}
    for r in range(b.settings.rounds):
        for c in contestants:
            value = measure(c)
            results[c.name].append(value)
            b.log(f"  [{scenario}] round {r + 1}/{b.settings.rounds} {c.name}: {show(value)}")
    return results


def warm(b: Bench, contestants: list[Contestant], script: str, connections: int) -> None:
    for c in contestants:
        if b.settings.warmup_s > 0:
            wrk(b.procs, c.url, b.scripts[script], connections=connections, duration_s=b.settings.warmup_s)


def wrk_notes(runs) -> list[str]:
    errors = sum(w.errors for w in runs)
    return [f"{errors} errors in wrk runs"] if errors else []


# ---- small text-to-image JSON ---------------------------------------------------------------


def small_json(b: Bench) -> list[Row]:
    """Throughput at saturation (wrk -c32) and latency unloaded (wrk -c1); latency added vs direct."""
    sc, s = "small JSON", b.settings
    cs = [b.direct(), b.minimal(), b.gateway()]
    try:
        for c in cs:
            expect_ok(c, b.bodies["small"].read_bytes())
        warm(b, cs, "small", s.connections)

        def measure(c: Contestant):
            loaded = wrk(b.procs, c.url, b.scripts["small"], connections=s.connections, duration_s=s.duration_s,
                         server=c.proc)
            single = wrk(b.procs, c.url, b.scripts["small"], connections=1, duration_s=s.latency_s)
            return loaded, single

        res = alternate(b, sc, cs, measure,
                        lambda v: f"{v[0].rps:,.0f} req/s, p50 {v[1].p50_ms:.2f} ms at c=1")
    finally:
        b.stop(*cs)
    rows, n = [], s.connections
    for c in cs:
        runs = res[c.name]
        notes = wrk_notes([w for pair in runs for w in pair])
        rows += [
            Row(sc, c.name, f"req/s @c{n}", [w.rps for w, _ in runs], VS_REFS, notes=notes),
            Row(sc, c.name, f"CPU us/req @c{n}", [w.cpu_us for w, _ in runs], VS_REFS),
            Row(sc, c.name, f"p50 ms @c{n}", [w.p50_ms for w, _ in runs], VS_REFS),
            Row(sc, c.name, f"p99 ms @c{n}", [w.p99_ms for w, _ in runs], VS_REFS),
            Row(sc, c.name, "p50 ms @c1", [w.p50_ms for _, w in runs], VS_REFS),
            Row(sc, c.name, "p99 ms @c1", [w.p99_ms for _, w in runs], VS_REFS),
        ]
    direct = res["direct"]
    for c in cs[1:]:
        for pct in ("p50", "p99"):
            added = [getattr(w, f"{pct}_ms") - getattr(d, f"{pct}_ms") for (_, w), (_, d) in zip(res[c.name], direct)]
            rows.append(Row(sc, c.name, f"{pct} ms added @c1 vs direct", added))
    return rows


# ---- 60 MB request with 14 images ------------------------------------------------------------


def big_request(b: Bench) -> list[Row]:
    """Seconds per 60 MB request (14 images), one at a time: upload, validation, forwarding."""
    sc, s = "60 MB request, 14 images", b.settings
    cs = [b.direct(), b.minimal(), b.gateway()]
    body = b.bodies["composition"]
    try:
        for c in cs:  # also the warm-up
            first = client(b.procs, "sequential", c.url, body, count=1, timeout_s=120)
            if first["statuses"] != [200]:
                raise RuntimeError(f"{c.name} refused the 60 MB request: {first}\n{c.proc.tail()}")

        def measure(c: Contestant):
            cpu = c.proc.cpu_s() if c.owned else 0.0
            out = client(b.procs, "sequential", c.url, body, count=s.big_requests, timeout_s=300)
            out["cpu_ms"] = (c.proc.cpu_s() - cpu) * 1000 / s.big_requests if c.owned else None
            return out

        res = alternate(b, sc, cs, measure, lambda v: f"{statistics.median(v['seconds']):.3f} s/request")
    finally:
        b.stop(*cs)
    size_mb = body.stat().st_size / 1e6
    rows = []
    for c in cs:
        runs = res[c.name]
        bad = sum(status != 200 for r in runs for status in r["statuses"])
        notes = [f"{bad} non-200"] if bad else []
        seconds = [statistics.median(r["seconds"]) for r in runs]
        rows.append(Row(sc, c.name, "s/request", seconds, VS_REFS, notes=notes))
        rows.append(Row(sc, c.name, "MB/s uploaded", [size_mb / x for x in seconds], VS_REFS,
                        target=("vs minimal", ">=", 0.6) if c.name == "gateway" else None))
        if c.owned:  # one request at a time: CPU, not wall time, is what load would pay
            rows.append(Row(sc, c.name, "CPU ms/request", [r["cpu_ms"] for r in runs], VS_REFS,
                            target=("vs minimal", "<=", 1 / 0.6) if c.name == "gateway" else None))
    return rows


# ---- 10 MB image response: JSON and one SSE event --------------------------------------------


def big_responses(b: Bench) -> list[Row]:
    """MB/s of 10 MB-image answers relayed as JSON and as a single SSE event (wrk -c4). Target:
    >= 0.8x the minimal proxy's (issue 9)."""
    s = b.settings
    cs = [b.direct(), b.minimal(), b.gateway()]
    rows = []
    try:
        for mode, sc in (("big_json", "10 MB image, JSON"), ("big_sse", "10 MB image, 1 SSE event")):
            sizes = {c.name: len(expect_ok(c, b.bodies[mode].read_bytes())[1]) for c in cs}
            warm(b, cs, mode, s.big_connections)

            def measure(c: Contestant):
                return wrk(b.procs, c.url, b.scripts[mode], connections=s.big_connections, duration_s=s.duration_s,
                           server=c.proc)

            res = alternate(b, sc, cs, measure, lambda w: f"{w.rps:.1f} responses/s")
            for c in cs:
                notes = wrk_notes(res[c.name])
                if sizes[c.name] != sizes["direct"]:
                    notes.append(f"body {sizes[c.name]} B vs direct {sizes['direct']} B")
                mb_s = [w.rps * sizes[c.name] / 1e6 for w in res[c.name]]
                rows.append(Row(sc, c.name, f"MB/s @c{s.big_connections}", mb_s, VS_REFS, notes=notes,
                                target=("vs minimal", ">=", 0.8) if c.name == "gateway" else None))  # issue 9
                rows.append(Row(sc, c.name, "CPU ms/response", [w.cpu_us / 1000 for w in res[c.name]], VS_REFS))
    finally:
        b.stop(*cs)
    return rows


# ---- 2,000 concurrent slow requests ----------------------------------------------------------


def slow_requests(b: Bench) -> list[Row]:
    """2,000 requests at once, each held 5 s by the upstream: how many succeed, peak RSS.

    The minimal proxy and the gateway start fresh each round, so "RSS growth" is what holding
    the 2,000 requests cost, not what an earlier round left allocated.
    """
    s = b.settings
    sc, n = f"{s.slow_concurrency:,} concurrent, 5 s each", s.slow_concurrency
    makers: list[tuple[str, Callable[[], Contestant]]] = [("direct", b.direct), ("minimal proxy", b.minimal),
                                                           ("gateway", b.gateway)]
    res: dict[str, list] = {name: [] for name, _ in makers}
    for r in range(s.rounds):
        for name, make in makers:
            c = make()
            try:
                expect_ok(c, b.bodies["small"].read_bytes())
                before = c.proc.reset_peak()
                result = client(b.procs, "burst", c.url, b.bodies["slow"], concurrency=n, timeout_s=180)
                peak = c.proc.peak_mb()
            finally:
                b.stop(c)
            res[name].append((result, before, peak))
            b.log(f"  [{sc}] round {r + 1}/{s.rounds} {name}: {result['ok']} ok in {result['wall_s']:.1f} s, "
                  f"peak RSS {peak:.0f} MB")
    rows = []
    for name, _ in makers:
        runs = res[name]
        failed: collections.Counter = collections.Counter()
        for result, _, _ in runs:
            failed.update(result["errors"])
            failed.update({f"HTTP {k}": v for k, v in result["statuses"].items() if k != "200"})
        notes = [f"failures: {dict(failed)}"] if failed else []
        if name == "direct":
            notes.append("the shared upstream process")
        rows += [
            Row(sc, name, f"succeeded of {n:,}", [r["ok"] for r, _, _ in runs], target=("median", ">=", n), notes=notes),
            Row(sc, name, "wall s", [r["wall_s"] for r, _, _ in runs]),
            Row(sc, name, "peak RSS MB", [peak for _, _, peak in runs], {"vs minimal": "minimal proxy"},
                target=("vs minimal", "<=", 1.5) if name == "gateway" else None),  # issue 9
            Row(sc, name, "RSS growth MB", [peak - before for _, before, peak in runs], {"vs minimal": "minimal proxy"}),
        ]
    return rows


# ---- paired gateway variants -----------------------------------------------------------------


def _paired_throughput(b: Bench, sc: str, off: Contestant, on: Contestant, target: float) -> list[Row]:
    s = b.settings
    cs = [off, on]
    try:
        for c in cs:
            expect_ok(c, b.bodies["small"].read_bytes())
        warm(b, cs, "small", s.connections)

        def measure(c: Contestant):
            return wrk(b.procs, c.url, b.scripts["small"], connections=s.connections, duration_s=s.duration_s,
                       server=c.proc)

        res = alternate(b, sc, cs, measure, lambda w: f"{w.rps:,.0f} req/s")
    finally:
        b.stop(*cs)
    n = s.connections
    paired = {"vs paired": off.name}
    return [
        Row(sc, off.name, f"req/s @c{n}", [w.rps for w in res[off.name]], notes=wrk_notes(res[off.name])),
        Row(sc, on.name, f"req/s @c{n}", [w.rps for w in res[on.name]], paired, target=("vs paired", ">=", target),
            notes=wrk_notes(res[on.name])),
        Row(sc, off.name, f"p50 ms @c{n}", [w.p50_ms for w in res[off.name]]),
        Row(sc, on.name, f"p50 ms @c{n}", [w.p50_ms for w in res[on.name]], paired),
        # The gateway is one CPU-bound process: its CPU per request is the throughput it can
        # reach, free of what else runs on the machine. Same target, as CPU: off/on >= target.
        Row(sc, off.name, f"CPU us/req @c{n}", [w.cpu_us for w in res[off.name]]),
        Row(sc, on.name, f"CPU us/req @c{n}", [w.cpu_us for w in res[on.name]], paired,
            target=("vs paired", "<=", round(1 / target, 3))),
    ]


def limits(b: Bench) -> list[Row]:
    """Limits on (rpm, tpm, max_concurrent set so high nothing is refused) vs off, both on Redis."""
    store = {"url": b.redis_url}
    off = b.gateway("limits off", store=store)
    on = b.gateway("limits on", store=store, limits=UNLIMITED)
    headers, _ = expect_ok(on, b.bodies["small"].read_bytes())
    rows = _paired_throughput(b, "limits on vs off (Redis)", off, on, 0.85)
    if not any(h.startswith("x-ratelimit-") for h in headers):
        rows[1].notes.append("no x-ratelimit headers: limits not active?")
    return rows


def embedded_limits(b: Bench) -> list[Row]:
    """The embedded default with limits on (memory://, rpm, tpm and max_concurrent set so high
    nothing is refused) against the minimal proxy: the first thing a user runs (issue 9)."""
    sc, s = "embedded store, limits on", b.settings
    cs = [b.minimal(), b.gateway("gateway, limits off"), b.gateway("gateway (memory://, limits)", limits=UNLIMITED)]
    try:
        for c in cs:
            headers, _ = expect_ok(c, b.bodies["small"].read_bytes())
        warm(b, cs, "small", s.connections)

        def measure(c: Contestant):
            return wrk(b.procs, c.url, b.scripts["small"], connections=s.connections, duration_s=s.duration_s,
                       server=c.proc)

        res = alternate(b, sc, cs, measure, lambda w: f"{w.rps:,.0f} req/s, {w.cpu_us:,.0f} us/req")
    finally:
        b.stop(*cs)
    n, off, gw = s.connections, cs[1].name, cs[2].name
    refs = {"vs minimal": "minimal proxy", "vs paired": off}  # paired: what the store itself costs
    notes = [] if any(h.startswith("x-ratelimit-") for h in headers) else ["no x-ratelimit headers: limits not active?"]
    return [
        Row(sc, "minimal proxy", f"req/s @c{n}", [w.rps for w in res["minimal proxy"]]),
        Row(sc, off, f"req/s @c{n}", [w.rps for w in res[off]], refs, notes=wrk_notes(res[off])),
        Row(sc, gw, f"req/s @c{n}", [w.rps for w in res[gw]], refs, target=("vs minimal", ">=", 0.7),
            notes=notes + wrk_notes(res[gw])),
        Row(sc, "minimal proxy", f"CPU us/req @c{n}", [w.cpu_us for w in res["minimal proxy"]]),
        Row(sc, off, f"CPU us/req @c{n}", [w.cpu_us for w in res[off]], refs),
        # one CPU-bound process: the same target as CPU, which other load does not move
        Row(sc, gw, f"CPU us/req @c{n}", [w.cpu_us for w in res[gw]], refs, target=("vs minimal", "<=", 1.43)),
        Row(sc, gw, f"p50 ms @c{n}", [w.p50_ms for w in res[gw]]),
    ]


def metrics_logging(b: Bench, store: str = "memory") -> list[Row]:
    """Metrics + access log on vs off (same gateway, level info; the log goes to a file)."""
    extra = {"store": {"url": b.redis_url}} if store == "redis" else {}
    off = b.gateway("metrics+log off", server={"metrics": False}, logging={"level": "info", "access_log": False}, **extra)
    on = b.gateway("metrics+log on", server={"metrics": True}, logging={"level": "info", "access_log": True}, **extra)
    label = "metrics + access log" + (" (Redis)" if store == "redis" else "")
    return _paired_throughput(b, label, off, on, 0.90)


def metrics_logging_redis(b: Bench) -> list[Row]:
    """The same pair on Redis: without the embedded store's cost the overhead shows undiluted."""
    return metrics_logging(b, "redis")


def tracing(b: Bench) -> list[Row]:
    """Tracing off (no ``tracing`` key: nothing of OpenTelemetry loaded) vs on, every request
    sampled and exported (to the bench upstream, which answers any POST with 200; a loose bound:
    Python's OpenTelemetry SDK is not cheap). Off is what matters: its hooks, timed in this
    process, as a share of the off gateway's CPU per request. Target: under 0.5 %."""
    sc = "tracing on vs off"
    off = b.gateway("tracing off")
    on = b.gateway("tracing on", tracing={"otlp_endpoint": b.upstream.url, "sample_ratio": 1.0})
    rows = _paired_throughput(b, sc, off, on, 0.5)
    off_cpu_us = next(r for r in rows if r.contestant == off.name and r.metric.startswith("CPU")).values
    share = [_tracing_hooks_off_ns() / (cpu_us * 1000) * 100 for cpu_us in off_cpu_us]
    rows.append(Row(sc, off.name, "hooks % of CPU/req", share, target=("median", "<=", 0.5)))
    return rows


def _tracing_hooks_off_ns(n: int = 200_000) -> float:
    """ns per request in tracing's hooks when it is off, at most: the request path's ``with
    rec.span(...)`` blocks (admission, cache, relay) and its ``trace is None`` checks (first
    byte, the upstream call, the metrics), the call around them included."""
    rec = RequestRecord("bench", "POST", "/v1/chat/completions")

    def hooks() -> None:
        for name in ("admission", "cache", "relay"):
            with rec.span(name):
                pass
        rec.first_byte()
        assert rec.trace is None and rec.trace is None

    return timeit.timeit(hooks, number=n) / n * 1e9


# ---- cache hit from Redis vs relay from a zero-latency upstream ------------------------------


def cache_hit(b: Bench) -> list[Row]:
    """A 2K image (~5 MB base64): served from Redis vs relayed, one request at a time.

    Each round starts each contestant fresh, warms it with one small request, resets its peak
    RSS, then measures; so "RSS growth" is what answering the 2K requests added. For the hit,
    growth / entry size is the number of copies of the entry held at once.
    """
    sc, s = "cache hit vs relay, 2K image", b.settings
    store = {"url": b.redis_url}
    variants = [("relay (cache off)", {"store": store, "cache": {"mode": "off"}}),
                ("cache hit (Redis)", {"store": store, "cache": {"mode": "always"}})]
    img2k = b.bodies["img2k"].read_bytes()
    warmer = b.gateway("cache warmer", **variants[1][1])
    try:
        expect_ok(warmer, img2k)
        for _ in range(50):  # the entry is stored just after the answer goes out: ask until it is
            headers, _ = expect_ok(warmer, img2k)
            if headers.get("x-cache") == "HIT":
                break
        else:
            raise RuntimeError(f"the 2K answer was not cached (x-cache: {headers.get('x-cache')})\n{warmer.proc.tail()}")
    finally:
        b.stop(warmer)
    entry_bytes = _largest_cache_entry(b.redis_url)

    def measure(name: str, sections: dict):
        c = b.gateway(name, **sections)
        try:
            expect_ok(c, b.bodies["small"].read_bytes())
            before = c.proc.reset_peak()
            w = wrk(b.procs, c.url, b.scripts["img2k"], connections=1, duration_s=s.duration_s, server=c.proc)
            peak = c.proc.peak_mb()
            headers, data = expect_ok(c, img2k)
        finally:
            b.stop(c)
        return w, peak - before, headers.get("x-cache"), len(data)

    res: dict[str, list] = {name: [] for name, _ in variants}
    for r in range(s.rounds):
        for name, sections in variants:
            v = measure(name, sections)
            res[name].append(v)
            b.log(f"  [{sc}] round {r + 1}/{s.rounds} {name}: {1000 / v[0].rps:.1f} ms/request, "
                  f"RSS +{v[1]:.1f} MB, x-cache {v[2]}")
    rows = []
    relay, hit = (name for name, _ in variants)
    for name in (relay, hit):
        runs = res[name]
        notes = wrk_notes([w for w, *_ in runs])
        if name == hit and any(x != "HIT" for _, _, x, _ in runs):
            notes.append("not served as hits")
        sizes = {n for *_, n in runs}
        if name == hit:
            notes.append(f"entry {entry_bytes / 1e6:.2f} MB, answer {max(sizes) / 1e6:.2f} MB")
        refs = {"vs paired": relay} if name == hit else {}
        rows += [
            Row(sc, name, "ms/request @c1", [1000 / w.rps for w, *_ in runs], refs,
                target=("vs paired", "<=", 1.0) if name == hit else None, notes=notes),
            Row(sc, name, "CPU ms/request", [w.cpu_us / 1000 for w, *_ in runs], refs),
            Row(sc, name, "RSS growth MB", [g for _, g, _, _ in runs], refs),
        ]
        if name == hit:
            rows.append(Row(sc, name, "RSS growth / entry size", [g * MIB / entry_bytes for _, g, _, _ in runs],
                            target=("median", "<=", 2.0)))
    return rows


def _largest_cache_entry(url: str) -> int:
    import redis

    r = redis.Redis.from_url(url)
    try:
        sizes = [r.strlen(k) for k in r.scan_iter(match="gw:cache:*:entry", count=1000)]
    finally:
        r.close()
    if not sizes:
        raise RuntimeError("no cache entry found in Redis")
    return max(sizes)


# ---- a 4K image delivered as a link vs inline -------------------------------------------------

LINK_SIGNING_KEY = "bench-image-link-signing-key-0123456789"


def image_links(b: Bench) -> list[Row]:
    """A chat answer carrying a 4K image (20 MB of base64), one request at a time: inline (the
    provider's base64 relayed) vs ``images.delivery: url`` (the image stored once in the
    gateway's memory:// store, the answer a signed link), and that link then fetched, which is
    what a client that wants the bytes pays. Bytes and time to last byte, vs inline.

    The upstream sends the same image every time and storage is content-addressed, so after a
    gateway's first answer the link path only hashes the image and renews it: the store write
    (one bytes copy into memory://) is not in the figures."""
    sc, s = "4K image: link vs inline", b.settings
    inline = b.gateway("inline (base64)")
    link = b.gateway("link", images={"delivery": "url", "signing_key": LINK_SIGNING_KEY, "url_ttl_s": 600})
    fetch = Contestant("link + image GET", link.proc, owned=False)
    cs, body = [inline, link, fetch], b.bodies["img4k"]
    try:
        for c in (inline, link):  # also the warm-up; the link gateway stores the image here
            _, data = expect_ok(c, body.read_bytes())
            if (b"data:image/" in data) == (c is link):
                raise RuntimeError(f"{c.name}: the answer is not what its delivery says: {data[:300]!r}")

        def measure(c: Contestant):
            return client(b.procs, "sequential", c.url, body, count=s.big_requests, timeout_s=120,
                          **{"fetch-links": int(c is fetch)})

        res = alternate(b, sc, cs, measure, lambda v: f"{statistics.median(v['seconds']) * 1000:.1f} ms to last byte, "
                                                      f"{statistics.median(v['bytes']):,.0f} B")
    finally:
        b.stop(*cs)
    rows, paired = [], {"vs paired": inline.name}
    for c in cs:
        runs = res[c.name]
        bad = sum(status != 200 for r in runs for status in r["statuses"])
        refs = paired if c is not inline else {}
        rows += [
            Row(sc, c.name, "ms to last byte @c1", [statistics.median(r["seconds"]) * 1000 for r in runs], refs,
                notes=[f"{bad} non-200"] if bad else []),
            Row(sc, c.name, "answer bytes", [statistics.median(r["bytes"]) for r in runs], refs),
        ]
        if c is fetch:
            rows.append(Row(sc, c.name, "bytes fetched by link", [statistics.median(r["fetched"]) for r in runs]))
    return rows


from .wire import full_features, workers  # noqa: E402  (wire.py builds on the helpers above)
from .bytes_path import image_request, loop_lag  # noqa: E402  (the same)

SCENARIOS: dict[str, Callable[[Bench], list[Row]]] = {
    "small": small_json,
    "full": full_features,
    "workers": workers,
    "limits": limits,
    "memory": embedded_limits,
    "metrics": metrics_logging,
    "metrics-redis": metrics_logging_redis,
    "tracing": tracing,
    "big-response": big_responses,
    "big-request": big_request,
    "image-request": image_request,
    "loop-lag": loop_lag,
    "cache": cache_hit,
    "links": image_links,
    "slow": slow_requests,
}
