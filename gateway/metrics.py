"""Every Prometheus metric of CONTRACT.md, in one place, behind a few calls the request path makes.

Labels stay bounded: ``team`` is a configured team or ``none`` (the request never
authenticated), ``model`` a configured model id or ``other``; every other label takes values
from a fixed set. No key, prompt or request id ever becomes a label.

Tokens and cost count what the upstream charged: a cache hit adds none (its saving goes to
``gateway_cache_saved_tokens_total`` through ``cache_saved``); images count both ways, hits
included, since they crossed the gateway.

Several workers (``gateway serve --workers N``) use prometheus_client's multiprocess mode: the
parent calls ``prepare_multiprocess(dir)`` before forking, every worker builds its own
``Metrics`` (it sees ``PROMETHEUS_MULTIPROC_DIR``) and any worker's ``exposition()`` is the sum
over all workers, dead ones included, so counters never go backwards when a worker restarts.
Use one ``Metrics`` per process in that mode: instances of one process share its files.
"""
from __future__ import annotations

import os
from contextlib import nullcontext
from typing import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess, values
from prometheus_client import exposition as _exposition

from .record import RequestRecord
from .usage import TOKEN_TYPES

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
CONTENT_TYPE = getattr(_exposition, "CONTENT_TYPE_PLAIN_0_0_4", _exposition.CONTENT_TYPE_LATEST)
NO_TEAM = "none"  # label of requests that never authenticated
OTHER_MODEL = "other"

# Image generation takes 15-150 s: finer steps there, 10 ms at the fast end (errors, cache hits).
DURATION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 15, 20, 30, 45, 60, 90, 120, 180, 240, 300)
OVERHEAD_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)

CACHE_STATES = frozenset(("hit", "miss", "bypass", "none"))
LIMITS = ("requests_per_minute", "tokens_per_minute", "max_concurrent", "tokens_per_day", "usd_per_month")
UPSTREAM_ERROR_KINDS = ("connect", "timeout", "status_5xx", "status_429", "bad_response", "disconnect")
QUOTAS = ("tokens_per_day", "usd_per_month")


def prepare_multiprocess(directory: str) -> None:
    """Parent only, once, before any worker starts and before any metric exists.

    Empties ``directory`` of metric files (only ``*.db``: the path may be shared), exports it as
    ``PROMETHEUS_MULTIPROC_DIR`` so forked and spawned workers inherit it, and switches
    prometheus_client's value class, which it otherwise picks once, when first imported.
    Never call it on a worker restart: the dead worker's files keep the counters monotonic.
    """
    directory = os.path.abspath(directory)
    os.makedirs(directory, exist_ok=True)
    for entry in os.scandir(directory):
        if entry.name.endswith(".db") and entry.is_file():
            os.remove(entry.path)
    os.environ[MULTIPROC_ENV] = directory
    _use_multiprocess_values(True)


def mark_worker_dead(pid: int) -> None:
    """Parent, when a worker exits: drop its share of the live gauges (in-flight requests)."""
    directory = os.environ.get(MULTIPROC_ENV)
    if directory:
        multiprocess.mark_process_dead(pid, directory)


def _use_multiprocess_values(on: bool) -> None:
    if getattr(values.ValueClass, "_multiprocess", False) != on:
        values.ValueClass = values.MultiProcessValue() if on else values.MutexValue


def _noop(*_args: object, **_kwargs: object) -> None:
    return None


_NULL_CONTEXT = nullcontext()


def _no_inflight(_team: object) -> nullcontext:
    return _NULL_CONTEXT


class _Inflight:
    """Reusable, stateless context manager: one per team, no allocation per request."""

    __slots__ = ("_gauge",)

    def __init__(self, gauge: Gauge):
        self._gauge = gauge

    def __enter__(self) -> None:
        self._gauge.inc()

    def __exit__(self, *_exc: object) -> None:
        self._gauge.dec()


class _Spend:
    """A (team, model)'s spend children, made at its first usage: series start at 0, so the
    first increment shows in rate(), and teams that never spend (``none``) get no token series."""

    __slots__ = ("tokens", "cost", "images_in", "images_out")


class _WithoutCreated:
    """Drops the ``*_created`` series: not in the contract, and multiprocess mode has none."""

    def __init__(self, source: CollectorRegistry):
        self._source = source

    def collect(self):
        for family in self._source.collect():
            family.samples = [s for s in family.samples if not s.name.endswith("_created")]
            yield family


class Metrics:
    """The gateway's metrics; ``enabled=False`` turns every call into a no-op."""

    def __init__(self, *, registry: CollectorRegistry | None = None, enabled: bool = True,
                 model_ids: Iterable[str] = (), teams: Iterable[str] = ()):
        self.enabled = enabled
        self.multiprocess = enabled and bool(os.environ.get(MULTIPROC_ENV))
        self.registry = registry if registry is not None else CollectorRegistry()
        self._models = frozenset(model_ids)
        if not enabled:
            for name in ("observe_request", "upstream_done", "upstream_error", "store_error",
                         "rejection", "cache_saved", "quota_remaining"):
                setattr(self, name, _noop)
            self.inflight = _no_inflight
            return
        _use_multiprocess_values(self.multiprocess)
        if self.multiprocess:
            # Metrics write to the shared files; the registry only reads them back, summed.
            own: CollectorRegistry | None = None
            multiprocess.MultiProcessCollector(self.registry)
            self._source = self.registry
        else:
            own = self.registry
            self._source = _WithoutCreated(self.registry)
        def counter(name, doc, labels):
            return Counter(name, doc, labels, registry=own)

        def histogram(name, doc, labels, buckets=DURATION_BUCKETS):
            return Histogram(name, doc, labels, buckets=buckets, registry=own)

        tm = ("team", "model")
        self.requests = counter("gateway_requests", "Finished requests.", (*tm, "status", "cache", "stream"))
        self.request_duration = histogram("gateway_request_duration_seconds", "From arrival to the last byte.",
                                          (*tm, "stream"))
        self.upstream_duration = histogram("gateway_upstream_duration_seconds", "One upstream attempt.",
                                           ("model", "status"))
        self.ttfb = histogram("gateway_time_to_first_byte_seconds", "From arrival to the first body byte.", tm)
        self.overhead = histogram("gateway_overhead_seconds", "The gateway's own time per request, upstream "
                                  "and client waits excluded.", (), OVERHEAD_BUCKETS)
        self.tokens = counter("gateway_tokens", "Tokens charged; image, reasoning and audio are parts of "
                              "completion.", (*tm, "type"))
        self.cost = counter("gateway_cost_usd", "Cost in US dollars at the configured prices.", tm)
        self.images = counter("gateway_images", "Images sent by clients (in) and returned (out).", (*tm, "direction"))
        self.rejections = counter("gateway_ratelimit_rejections", "Requests refused by a limit or quota.",
                                  ("team", "limit"))
        self.cache_saved_tokens = counter("gateway_cache_saved_tokens", "Tokens not spent thanks to cache hits.",
                                          ("team",))
        self.upstream_errors = counter("gateway_upstream_errors", "Failed upstream attempts by kind.", ("kind",))
        self.store_errors = counter("gateway_store_errors", "Failed store operations.", ("op",))
        self.inflight_requests = Gauge("gateway_inflight_requests", "Requests being handled.", ("team",),
                                       multiprocess_mode="livesum", registry=own)
        # The store holds the truth; the latest report from any worker is the best view of it.
        self.quota = Gauge("gateway_quota_remaining", "What a team may still spend of a quota.",
                           ("team", "quota"), multiprocess_mode="mostrecent", registry=own)
        self._timing: dict[tuple, tuple[Histogram, Histogram]] = {}
        self._spend: dict[tuple, _Spend] = {}
        self._requests: dict[tuple, Counter] = {}
        self._inflight: dict[str, _Inflight] = {}
        # Series born at 0: Prometheus' rate() and increase() cannot see a series' first event.
        for team in teams:
            self.cache_saved_tokens.labels(team)
            for limit in LIMITS:
                self.rejections.labels(team, limit)
        self._upstream: dict[tuple, Histogram] = {}
        self._upstream_errors = {k: self.upstream_errors.labels(k) for k in UPSTREAM_ERROR_KINDS}

    # -- the request path ---------------------------------------------------------------------

    def observe_request(self, rec: RequestRecord) -> None:
        """Once per finished request, whatever its outcome."""
        team = rec.team or NO_TEAM
        model = rec.model if rec.model in self._models else OTHER_MODEL
        rkey = (team, model, rec.status, rec.cache, rec.stream)
        (self._requests.get(rkey) or self._new_request_child(rkey)).inc()
        key = (team, model, rec.stream)
        duration, ttfb = self._timing.get(key) or self._new_timing(key)
        duration.observe(rec.duration_s)
        if rec.ttfb_s is not None:
            ttfb.observe(rec.ttfb_s)
        self.overhead.observe(rec.overhead_s)
        usage = rec.usage
        if usage is None:
            return
        spend = self._spend.get(key[:2]) or self._new_spend(key[:2])
        if usage.images_in:
            spend.images_in.inc(usage.images_in)
        if usage.images_out:
            spend.images_out.inc(usage.images_out)
        if rec.cache == "hit":
            return  # nothing was charged
        for kind, child in spend.tokens:
            n = getattr(usage, kind)
            if n > 0:
                child.inc(n)
        if usage.cost_usd > 0:
            spend.cost.inc(usage.cost_usd)

    def inflight(self, team: str | None):
        """``with metrics.inflight(team):`` around the handling of one request."""
        team = team or NO_TEAM
        tracker = self._inflight.get(team)
        if tracker is None:
            tracker = self._inflight[team] = _Inflight(self.inflight_requests.labels(team))
        return tracker

    def upstream_done(self, model: str, status: int | str, seconds: float) -> None:
        """One upstream attempt; ``status`` its HTTP code, or the error kind (connect, timeout)."""
        key = (model, status)
        child = self._upstream.get(key)
        if child is None:
            folded = model if model in self._models else OTHER_MODEL
            child = self._upstream[key] = self.upstream_duration.labels(folded, str(status))
        child.observe(seconds)

    def upstream_error(self, kind: str) -> None:
        """``kind`` is one of UPSTREAM_ERROR_KINDS (KeyError otherwise: a bug at the call site)."""
        self._upstream_errors[kind].inc()

    def store_error(self, op: str) -> None:
        """``op`` is a fixed name from the code (get, set, script, ping...), never data."""
        self.store_errors.labels(op).inc()

    def rejection(self, team: str, limit: str) -> None:
        if limit not in LIMITS:
            raise ValueError(f"unknown limit {limit!r}")
        self.rejections.labels(team or NO_TEAM, limit).inc()

    def cache_saved(self, team: str, tokens: int) -> None:
        if tokens > 0:
            self.cache_saved_tokens.labels(team or NO_TEAM).inc(tokens)

    def quota_remaining(self, team: str, quota: str, value: float) -> None:
        if quota not in QUOTAS:
            raise ValueError(f"unknown quota {quota!r}")
        self.quota.labels(team, quota).set(value)

    # -- the /metrics route ---------------------------------------------------------------------

    def exposition(self) -> tuple[bytes, str]:
        """(body, content type) in the Prometheus text format; empty when disabled."""
        if not self.enabled:
            return b"", CONTENT_TYPE
        return generate_latest(self._source), CONTENT_TYPE

    # -- children, created once per label set ---------------------------------------------------

    def _new_timing(self, key: tuple) -> tuple[Histogram, Histogram]:
        team, model, stream = key
        pair = self.request_duration.labels(team, model, "true" if stream else "false"), self.ttfb.labels(team, model)
        self._timing[key] = pair
        return pair

    def _new_spend(self, key: tuple) -> _Spend:
        team, model = key
        s = _Spend()
        s.tokens = tuple((t, self.tokens.labels(team, model, t)) for t in TOKEN_TYPES)
        s.cost = self.cost.labels(team, model)
        s.images_in = self.images.labels(team, model, "in")
        s.images_out = self.images.labels(team, model, "out")
        self._spend[key] = s
        return s

    def _new_request_child(self, key: tuple) -> Counter:
        team, model, status, cache, stream = key
        child = self.requests.labels(team, model, str(int(status)), cache if cache in CACHE_STATES else "none",
                                     "true" if stream else "false")
        self._requests[key] = child
        return child
