"""Every Prometheus metric of CONTRACT.md, in one place, behind a few calls the request path makes.

Labels stay bounded: ``team`` is a configured team or ``none`` (the request never
authenticated), ``model`` a configured model id or ``other``; every other label takes values
from a fixed set. No key, prompt or request id ever becomes a label.

Tokens and cost count what the upstream charged: a cache hit adds none (its saving goes to
``gateway_cache_saved_tokens_total`` through ``cache_saved``); images count both ways, hits
included, since they crossed the gateway.

Several workers share their metrics through prometheus_client's multiprocess mode (see
``metrics_multiprocess``); use one ``Metrics`` per process in that mode: instances of one
process share its files. The request path's fast counting lives in ``observability.tally``.
"""
from __future__ import annotations

import os
from contextlib import nullcontext
from operator import attrgetter
from typing import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess
from prometheus_client import exposition as _exposition
from prometheus_client.openmetrics import exposition as openmetrics

# prepare_multiprocess and mark_worker_dead are re-exported: the CLI imports them from here.
from gateway.observability.multiprocess import MULTIPROC_ENV, mark_worker_dead, prepare_multiprocess  # noqa: F401
from gateway.observability.multiprocess import use_multiprocess_values
from gateway.observability.tally import HotPath, adder
from gateway.http.record import RequestRecord
from gateway.usage import TOKEN_TYPES

CONTENT_TYPE = getattr(_exposition, "CONTENT_TYPE_PLAIN_0_0_4", _exposition.CONTENT_TYPE_LATEST)
OPENMETRICS = "application/openmetrics-text"
NO_TEAM = "none"  # label of requests that never authenticated
OTHER_MODEL = "other"

# Image generation takes 15-150 s: finer steps there, 10 ms at the fast end (errors, cache hits).
DURATION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 15, 20, 30, 45, 60, 90, 120, 180, 240, 300)
OVERHEAD_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)

CACHE_STATES = frozenset(("hit", "miss", "bypass", "none"))
TEAM_LIMITS = ("requests_per_minute", "tokens_per_minute", "max_concurrent", "tokens_per_day", "usd_per_month")
ACCOUNT_LIMITS = ("account_requests_per_minute", "account_tokens_per_minute", "account_max_concurrent",
                  "account_tokens_per_day", "account_usd_per_day", "account_usd_per_month")  # the account refused
LIMITS = TEAM_LIMITS + ACCOUNT_LIMITS
UPSTREAM_ERROR_KINDS = ("connect", "timeout", "status_5xx", "status_429", "bad_response", "disconnect")
QUOTAS = ("tokens_per_day", "usd_per_month")
ACCOUNT_QUOTAS = ("tokens_per_day", "usd_per_day", "usd_per_month")


def _noop(*_args: object, **_kwargs: object) -> None:
    return None


_NULL_CONTEXT = nullcontext()


def _no_inflight(_team: object) -> nullcontext:
    return _NULL_CONTEXT


class _Inflight:
    """Reusable, stateless context manager: one per team, no allocation per request."""

    __slots__ = ("_add",)

    def __init__(self, add: Callable[[float], None]):
        self._add = add

    def __enter__(self) -> None:
        self._add(1)

    def __exit__(self, *_exc: object) -> None:
        self._add(-1)


_TOKENS = attrgetter(*TOKEN_TYPES)  # usage -> its token counts, in TOKEN_TYPES order


class _Spend:
    """A (team, model)'s spend children, made at its first usage: series start at 0, so the
    first increment shows in rate(), and teams that never spend (``none``) get no token series."""

    __slots__ = ("tokens", "cost", "images_in", "images_out")


class _Row:
    """Everything one kind of finished request moves, keyed by (team, model, status, cache, stream)."""

    __slots__ = ("count", "duration", "traced", "ttfb", "spend_key", "spend")


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
                 model_ids: Iterable[str] = (), teams: Iterable[str] = (), account: bool = False):
        self.enabled = enabled
        self.multiprocess = enabled and bool(os.environ.get(MULTIPROC_ENV))
        self.registry = registry if registry is not None else CollectorRegistry()
        if not enabled:
            for name in ("observe_request", "upstream_done", "upstream_error", "store_error",
                         "rejection", "cache_saved", "quota_remaining", "account_quota_remaining", "draining", "config_loaded",
                         "config_reloaded", "configure"):
                setattr(self, name, _noop)
            self.inflight = _no_inflight
            return
        use_multiprocess_values(self.multiprocess)
        self._hot = HotPath(self.multiprocess)
        self._counting, self._observing = self._hot.counting, self._hot.observing
        if self.multiprocess:
            # Metrics write to the shared files; the registry only reads them back, summed.
            own: CollectorRegistry | None = None
            multiprocess.MultiProcessCollector(self.registry)
            self._source = self.registry
        else:
            own = self.registry
            self._source = _WithoutCreated(self.registry)
            own.register(self._hot)  # ahead of the metrics: collecting publishes the tallies first
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
        self.account_quota = Gauge("gateway_account_quota_remaining", "What the account shared by all teams "
                                   "may still spend of a quota.", ("quota",), multiprocess_mode="mostrecent",
                                   registry=own)
        # Lifecycle: a draining replica, and whether its config file took (alert on a stale one).
        self.draining_gauge = Gauge("gateway_draining", "1 from the first SIGTERM on.", (),
                                    multiprocess_mode="livemax", registry=own)
        self.config_reloads = counter("gateway_config_reloads", "Config reloads by result.", ("result",))
        self.config_reload_time = Gauge("gateway_config_last_reload_success_timestamp_seconds",
                                        "When the config last loaded (start-up or reload), UNIX time.", (),
                                        multiprocess_mode="livemin", registry=own)
        self.draining_gauge.set(0)
        for result in ("success", "failure"):
            self.config_reloads.labels(result)
        self._observe_overhead = self._observing(self.overhead)
        self._rows: dict[tuple, _Row] = {}
        self._timing: dict[tuple, tuple[Callable, Callable]] = {}
        self._spend: dict[tuple, _Spend] = {}
        self._inflight: dict[str, _Inflight] = {}
        self._labelled: dict[tuple, Counter | Gauge] = {}  # children of the rarer calls
        self._upstream: dict[tuple, Callable[[float], None]] = {}
        self._upstream_errors = {k: adder(self.upstream_errors.labels(k)) for k in UPSTREAM_ERROR_KINDS}
        self.configure(model_ids, teams, account=account)

    def configure(self, model_ids: Iterable[str], teams: Iterable[str], *, account: bool = False) -> None:
        """The configured models (labels; others fold into ``other``) and teams, at start and on
        each reload. A new team's series are born at 0: Prometheus' rate() and increase() cannot
        see a series' first event. The account's refusals are born only where an account is set."""
        self._models = frozenset(model_ids)
        for team in teams:
            self.cache_saved_tokens.labels(team)
            for limit in LIMITS if account else TEAM_LIMITS:
                self.rejections.labels(team, limit)

    # -- the request path ---------------------------------------------------------------------

    def observe_request(self, rec: RequestRecord) -> None:
        """Once per finished request, whatever its outcome."""
        model = rec.model
        key = (rec.team or NO_TEAM, model if model in self._models else OTHER_MODEL, rec.status, rec.cache,
               rec.stream)
        row = self._rows.get(key) or self._new_row(key)
        row.count(1)
        trace = rec.trace
        if trace is not None and trace.sampled:  # an exemplar: the bucket links to the trace
            row.traced(rec.duration_s, {"trace_id": trace.trace_id})
        else:
            row.duration(rec.duration_s)
        if rec.ttfb_s is not None:
            row.ttfb(rec.ttfb_s)
        self._observe_overhead(rec.overhead_s)
        usage = rec.usage
        if usage is None:
            return
        spend = row.spend or self._new_spend(row)
        if usage.images_in:
            spend.images_in(usage.images_in)
        if usage.images_out:
            spend.images_out(usage.images_out)
        if rec.cache == "hit":
            return  # nothing was charged
        for n, add in zip(_TOKENS(usage), spend.tokens):
            if n > 0:
                add(n)
        if usage.cost_usd > 0:
            spend.cost(usage.cost_usd)

    def inflight(self, team: str | None):
        """``with metrics.inflight(team):`` around the handling of one request."""
        team = team or NO_TEAM
        tracker = self._inflight.get(team)
        if tracker is None:
            tracker = self._inflight[team] = _Inflight(self._counting(self.inflight_requests.labels(team)))
        return tracker

    def upstream_done(self, model: str, status: int | str, seconds: float) -> None:
        """One upstream attempt; ``status`` its HTTP code, or the error kind (connect, timeout)."""
        key = (model, status)
        child = self._upstream.get(key)
        if child is None:
            folded = model if model in self._models else OTHER_MODEL
            child = self._upstream[key] = self._observing(self.upstream_duration.labels(folded, str(status)))
        child(seconds)

    def upstream_error(self, kind: str) -> None:
        """``kind`` is one of UPSTREAM_ERROR_KINDS (KeyError otherwise: a bug at the call site)."""
        self._upstream_errors[kind](1)

    def store_error(self, op: str) -> None:
        """``op`` is a fixed name from the code (get, set, script, ping...), never data."""
        self._child(self.store_errors, op).inc()

    def rejection(self, team: str, limit: str) -> None:
        if limit not in LIMITS:
            raise ValueError(f"unknown limit {limit!r}")
        self._child(self.rejections, team or NO_TEAM, limit).inc()

    def cache_saved(self, team: str, tokens: int) -> None:
        if tokens > 0:
            self._child(self.cache_saved_tokens, team or NO_TEAM).inc(tokens)

    def quota_remaining(self, team: str, quota: str, value: float) -> None:
        if quota not in QUOTAS:
            raise ValueError(f"unknown quota {quota!r}")
        self._child(self.quota, team, quota).set(value)

    def account_quota_remaining(self, quota: str, value: float) -> None:
        if quota not in ACCOUNT_QUOTAS:
            raise ValueError(f"unknown account quota {quota!r}")
        self._child(self.account_quota, quota).set(value)

    def draining(self) -> None:
        self.draining_gauge.set(1)

    def config_loaded(self, at: float) -> None:
        """The config in use was read at ``at`` (UNIX time): at start-up, and by each reload that took."""
        self.config_reload_time.set(at)

    def config_reloaded(self, ok: bool, at: float) -> None:
        self.config_reloads.labels("success" if ok else "failure").inc()
        if ok:
            self.config_loaded(at)

    # -- the /metrics route ---------------------------------------------------------------------

    def exposition(self, accept: str = "") -> tuple[bytes, str]:
        """(body, content type) in the Prometheus text format, or OpenMetrics when the scrape's
        ``Accept`` asks for it: only that format carries the request-duration histogram's trace
        id exemplars (kept in one process only: prometheus_client's multiprocess mode drops
        exemplars). Empty when disabled."""
        if not self.enabled:
            return b"", CONTENT_TYPE
        if OPENMETRICS in accept:
            return openmetrics.generate_latest(self._source), openmetrics.CONTENT_TYPE_LATEST
        return generate_latest(self._source), CONTENT_TYPE

    # -- children, created once per label set ---------------------------------------------------

    def _new_row(self, key: tuple) -> _Row:
        team, model, status, cache, stream = key
        flag = "true" if stream else "false"
        row = _Row()
        row.count = self._counting(self.requests.labels(team, model, str(int(status)),
                                                        cache if cache in CACHE_STATES else "none", flag))
        timing = self._timing.get((team, model, stream))
        if timing is None:
            timing = self._timing[(team, model, stream)] = (
                self._observing(self.request_duration.labels(team, model, flag)),
                self._observing(self.ttfb.labels(team, model)))
        row.duration, row.ttfb = timing
        row.traced = self.request_duration.labels(team, model, flag).observe  # takes an exemplar
        row.spend_key, row.spend = (team, model), self._spend.get((team, model))
        self._rows[key] = row
        return row

    def _new_spend(self, row: _Row) -> _Spend:
        key = row.spend_key
        s = self._spend.get(key)
        if s is None:
            team, model = key
            s = self._spend[key] = _Spend()
            s.tokens = tuple(self._counting(self.tokens.labels(team, model, t)) for t in TOKEN_TYPES)
            s.cost = self._counting(self.cost.labels(team, model))
            s.images_in = self._counting(self.images.labels(team, model, "in"))
            s.images_out = self._counting(self.images.labels(team, model, "out"))
        row.spend = s
        return s

    def _child(self, metric: Counter | Gauge, *labels: str) -> Counter | Gauge:
        """``metric.labels(*labels)``, made once; the label values come from fixed sets."""
        key = (metric, *labels)
        child = self._labelled.get(key)
        if child is None:
            child = self._labelled[key] = metric.labels(*labels)
        return child
