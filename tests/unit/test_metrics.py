"""gateway.observability.metrics: what a scrape shows after known requests, read back with the client's parser."""
from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from gateway.observability.metrics import Metrics
from gateway.http.record import RequestRecord
from gateway.usage import Usage

MODEL = "google/gemini-3-pro-image-preview"

# CONTRACT.md, "Prometheus metrics": name -> (type, labels). Exactly these, no others.
CONTRACT = {
    "gateway_requests_total": ("counter", {"team", "model", "status", "cache", "stream"}),
    "gateway_request_duration_seconds": ("histogram", {"team", "model", "stream"}),
    "gateway_upstream_duration_seconds": ("histogram", {"model", "status"}),
    "gateway_time_to_first_byte_seconds": ("histogram", {"team", "model"}),
    "gateway_overhead_seconds": ("histogram", set()),
    "gateway_tokens_total": ("counter", {"team", "model", "type"}),
    "gateway_cost_usd_total": ("counter", {"team", "model"}),
    "gateway_images_total": ("counter", {"team", "model", "direction"}),
    "gateway_ratelimit_rejections_total": ("counter", {"team", "limit"}),
    "gateway_cache_saved_tokens_total": ("counter", {"team"}),
    "gateway_inflight_requests": ("gauge", {"team"}),
    "gateway_upstream_errors_total": ("counter", {"kind"}),
    "gateway_store_errors_total": ("counter", {"op"}),
    "gateway_quota_remaining": ("gauge", {"team", "quota"}),
    "gateway_account_quota_remaining": ("gauge", {"quota"}),
    "gateway_config_reloads_total": ("counter", {"result"}),
    "gateway_config_last_reload_success_timestamp_seconds": ("gauge", set()),
    "gateway_draining": ("gauge", set()),
}


def record(team="design", *, model=MODEL, status=200, cache="miss", stream=False, usage=None,
           duration=2.0, upstream=1.5, ttfb=None) -> RequestRecord:
    rec = RequestRecord("req-1", "POST", "/v1/chat/completions", team=team, model=model, status=status,
                        cache=cache, stream=stream, usage=usage)
    rec.duration_s, rec.upstream_s, rec.ttfb_s = duration, upstream, ttfb
    return rec


def families(m: Metrics) -> dict:
    body, content_type = m.exposition()
    assert content_type.startswith("text/plain; version=0.0.4")
    return {f.name: f for f in text_string_to_metric_families(body.decode())}


def samples(m: Metrics, name: str, **match: str) -> dict[tuple, float]:
    """Samples named ``name`` whose labels include ``match``, keyed by their other label values."""
    out = {}
    for family in families(m).values():
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in match.items()):
                rest = tuple(sorted((k, v) for k, v in s.labels.items() if k not in match))
                out[rest] = s.value
    return out


def value(m: Metrics, name: str, **labels: str) -> float:
    found = samples(m, name, **labels)
    assert len(found) == 1, found
    return next(iter(found.values()))


def test_names_types_and_labels_are_exactly_the_contract():
    m = Metrics(model_ids=[MODEL])
    m.observe_request(record(usage=Usage(prompt=1, completion=2, image=1, images_in=1, images_out=1, cost_usd=0.1),
                             ttfb=0.5))
    with m.inflight("design"):
        m.upstream_done(MODEL, 200, 1.0)
        m.upstream_error("timeout")
        m.store_error("script")
        m.rejection("design", "requests_per_minute")
        m.cache_saved("design", 10)
        m.quota_remaining("design", "tokens_per_day", 100)
        m.account_quota_remaining("usd_per_day", 10)
        found = families(m)
    shown = {}
    for f in found.values():
        name = f.name + "_total" if f.type == "counter" else f.name
        labels = set().union(*(s.labels.keys() for s in f.samples)) - {"le"}
        shown[name] = (f.type, labels)
    assert shown == CONTRACT


def test_tokens_cost_images_per_team_and_type():
    m = Metrics(model_ids=[MODEL])
    image_call = Usage(prompt=100, completion=1300, image=1120, reasoning=180, images_in=2, images_out=1, cost_usd=0.15)
    m.observe_request(record("design", usage=image_call))
    m.observe_request(record("design", usage=image_call, stream=True, ttfb=0.8))
    cut_off = Usage(prompt=100, completion=40, reasoning=40, estimated=True, cost_usd=0.0007)  # what a cut stream used
    m.observe_request(record("design", usage=cut_off, stream=True, status=200, ttfb=0.5))
    m.observe_request(record("research", usage=Usage(prompt=7, completion=3, audio=2, cost_usd=0.01)))

    assert samples(m, "gateway_tokens_total", team="design", model=MODEL) == {
        (("type", "prompt"),): 300, (("type", "completion"),): 2640, (("type", "image"),): 2240,
        (("type", "reasoning"),): 400, (("type", "audio"),): 0}
    assert samples(m, "gateway_tokens_total", team="research", model=MODEL) == {
        (("type", "prompt"),): 7, (("type", "completion"),): 3, (("type", "image"),): 0,
        (("type", "reasoning"),): 0, (("type", "audio"),): 2}
    assert value(m, "gateway_cost_usd_total", team="design") == pytest.approx(0.3007)
    assert value(m, "gateway_cost_usd_total", team="research") == pytest.approx(0.01)
    assert samples(m, "gateway_images_total", team="design") == {
        (("direction", "in"), ("model", MODEL)): 4, (("direction", "out"), ("model", MODEL)): 2}
    assert samples(m, "gateway_requests_total", team="design") == {
        (("cache", "miss"), ("model", MODEL), ("status", "200"), ("stream", "false")): 1,
        (("cache", "miss"), ("model", MODEL), ("status", "200"), ("stream", "true")): 2}


def test_a_cache_hit_charges_no_tokens_but_counts_the_request_its_images_and_the_saving():
    m = Metrics(model_ids=[MODEL])
    cached = Usage(prompt=100, completion=1120, image=1120, images_out=1, cost_usd=0.14)
    m.observe_request(record(cache="hit", usage=cached, upstream=0.0))
    m.cache_saved("design", cached.total)
    assert set(samples(m, "gateway_tokens_total", team="design").values()) == {0}
    assert value(m, "gateway_cost_usd_total", team="design") == 0
    assert value(m, "gateway_images_total", team="design", direction="out") == 1
    assert value(m, "gateway_cache_saved_tokens_total", team="design") == 1220
    assert value(m, "gateway_requests_total", team="design", cache="hit") == 1


def test_unauthenticated_requests_are_team_none_and_unknown_models_other():
    m = Metrics(model_ids=[MODEL])
    m.observe_request(record(None, model="other", status=401, cache="none", usage=None))
    m.observe_request(record("design", model="sk-not-a-model", status=400, usage=None))
    m.upstream_done("someone/else", 200, 3.0)
    assert value(m, "gateway_requests_total", team="none", status="401") == 1
    assert value(m, "gateway_requests_total", team="design", status="400", model="other") == 1
    assert value(m, "gateway_upstream_duration_seconds_count", model="other", status="200") == 1
    body = m.exposition()[0].decode()
    assert "sk-not-a-model" not in body and "someone/else" not in body


def test_without_model_ids_every_model_is_other():
    m = Metrics()
    m.observe_request(record(usage=None))
    assert value(m, "gateway_requests_total", model="other") == 1


def test_histograms_duration_ttfb_and_overhead():
    m = Metrics(model_ids=[MODEL])
    m.observe_request(record(duration=20.0, upstream=19.998, ttfb=12.0, stream=True))
    m.observe_request(record(duration=0.004, upstream=0.0, status=429, usage=None))  # refused at once
    dur = samples(m, "gateway_request_duration_seconds_bucket", team="design", stream="true")
    assert dur[(("le", "15.0"), ("model", MODEL))] == 0 and dur[(("le", "20.0"), ("model", MODEL))] == 1
    assert value(m, "gateway_request_duration_seconds_bucket", stream="false", le="0.01") == 1
    assert value(m, "gateway_time_to_first_byte_seconds_count", team="design") == 1  # only when set
    assert value(m, "gateway_time_to_first_byte_seconds_sum", team="design") == 12.0
    overhead = samples(m, "gateway_overhead_seconds_bucket")
    assert overhead[(("le", "5e-05"),)] == 0
    assert overhead[(("le", "0.0025"),)] == 1  # 2 ms of gateway time in a 20 s request
    assert overhead[(("le", "0.005"),)] == 2
    assert value(m, "gateway_overhead_seconds_count") == 2
    assert value(m, "gateway_overhead_seconds_bucket", le="0.1") == 2
    assert "gateway_request_duration_seconds_created" not in m.exposition()[0].decode()


def test_inflight_rejections_quota_upstream_and_store_errors():
    m = Metrics(model_ids=[MODEL])
    with m.inflight("design"):
        with m.inflight("design"):
            assert value(m, "gateway_inflight_requests", team="design") == 2
    assert value(m, "gateway_inflight_requests", team="design") == 0
    for limit in ("requests_per_minute", "requests_per_minute", "tokens_per_day"):
        m.rejection("design", limit)
    assert samples(m, "gateway_ratelimit_rejections_total", team="design") == {
        (("limit", "requests_per_minute"),): 2, (("limit", "tokens_per_day"),): 1}
    m.quota_remaining("design", "usd_per_month", 12.5)
    m.quota_remaining("design", "usd_per_month", 11.0)
    assert value(m, "gateway_quota_remaining", team="design", quota="usd_per_month") == 11.0
    m.upstream_error("status_5xx")
    m.upstream_error("status_5xx")
    errors = samples(m, "gateway_upstream_errors_total")
    assert errors[(("kind", "status_5xx"),)] == 2 and errors[(("kind", "connect"),)] == 0  # all kinds exist
    m.store_error("script")
    assert value(m, "gateway_store_errors_total", op="script") == 1
    with pytest.raises(ValueError):
        m.rejection("design", "bogus")
    with pytest.raises(ValueError):
        m.quota_remaining("design", "bogus", 1)
    with pytest.raises(KeyError):
        m.upstream_error("bogus")


def test_disabled_metrics_do_nothing_and_emit_nothing():
    m = Metrics(enabled=False, model_ids=[MODEL])
    m.observe_request(record(usage=Usage(prompt=1)))
    with m.inflight("design"):
        m.upstream_done(MODEL, 200, 1.0)
    m.upstream_error("timeout")
    m.store_error("get")
    m.rejection("design", "max_concurrent")
    m.cache_saved("design", 5)
    m.quota_remaining("design", "tokens_per_day", 1)
    body, content_type = m.exposition()
    assert body == b"" and content_type.startswith("text/plain")


def test_instances_and_given_registries_are_separate():
    registry = CollectorRegistry()
    a, b = Metrics(registry=registry), Metrics()
    a.observe_request(record(usage=None))
    assert a.registry is registry
    assert value(a, "gateway_requests_total") == 1
    assert samples(b, "gateway_requests_total") == {}


# -- the request path's cached children, against the client's own methods ------------------------


def test_the_request_path_counts_like_the_clients_own_methods():
    """Same records into the gateway's metrics and, by hand, into twin metrics through the
    client's public inc/observe: every sample equal, bucket bounds themselves included."""
    from prometheus_client import Counter, Histogram
    from gateway.observability.metrics import DURATION_BUCKETS, OVERHEAD_BUCKETS

    values = [0.0, 0.00005, 0.000051, 0.0001, 0.01, 0.0100001, 1, 2.5, 20.0, 299.9, 300, 300.5, 1e9]
    m = Metrics(model_ids=[MODEL])
    twin = CollectorRegistry()
    requests = Counter("gateway_requests", "", ("team", "model", "status", "cache", "stream"), registry=twin)
    duration = Histogram("gateway_request_duration_seconds", "", ("team", "model", "stream"),
                         buckets=DURATION_BUCKETS, registry=twin)
    ttfb = Histogram("gateway_time_to_first_byte_seconds", "", ("team", "model"), buckets=DURATION_BUCKETS,
                     registry=twin)
    overhead = Histogram("gateway_overhead_seconds", "", (), buckets=OVERHEAD_BUCKETS, registry=twin)
    tokens = Counter("gateway_tokens", "", ("team", "model", "type"), registry=twin)
    for i, v in enumerate(values):
        for status, cache, stream in ((200, "miss", False), (200, "hit", True), (429, "none", False)):
            usage = Usage(prompt=i, completion=2 * i, reasoning=i % 2) if status == 200 else None
            m.observe_request(record(status=status, cache=cache, stream=stream, usage=usage, duration=v, upstream=0,
                                     ttfb=v / 2))
            flag = "true" if stream else "false"
            requests.labels("design", MODEL, str(status), cache, flag).inc()
            duration.labels("design", MODEL, flag).observe(v)
            ttfb.labels("design", MODEL).observe(v / 2)
            overhead.observe(v)
            if usage is not None and cache != "hit":
                for kind in ("prompt", "completion", "reasoning"):
                    if getattr(usage, kind):
                        tokens.labels("design", MODEL, kind).inc(getattr(usage, kind))
    ours = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families(m).values() for s in f.samples}
    for f in twin.collect():
        for s in f.samples:
            if not s.name.endswith("_created"):
                assert ours[(s.name, tuple(sorted(s.labels.items())))] == s.value, s


def test_children_without_the_expected_internals_fall_back_to_their_public_methods():
    from gateway.observability.tally import adder as _adder, observer as _observer

    class Child:
        def __init__(self):
            self.seen = []

        def inc(self, amount=1):
            self.seen.append(("inc", amount))

        def observe(self, amount):
            self.seen.append(("observe", amount))

    child = Child()
    _adder(child)(2)
    _observer(child)(0.5)
    assert child.seen == [("inc", 2), ("observe", 0.5)]


def test_every_collect_sees_every_request_so_far():
    """The request path adds to tallies; any collect of the registry (the scrape, or another
    reader of the same registry) hands them over first, and only what is new since."""
    from prometheus_client import generate_latest

    registry = CollectorRegistry()
    m = Metrics(registry=registry, model_ids=[MODEL])
    for n in range(1, 4):
        with m.inflight("design"):
            m.observe_request(record(usage=Usage(prompt=2, cost_usd=0.25), duration=0.3, ttfb=0.1))
            m.upstream_done(MODEL, 200, 0.2)
            assert value(m, "gateway_inflight_requests", team="design") == 1
        text = generate_latest(registry).decode()  # not through exposition()
        assert [s.value for f in text_string_to_metric_families(text) for s in f.samples
                if s.name == "gateway_requests_total"] == [n]
        assert value(m, "gateway_tokens_total", type="prompt") == 2 * n
        assert value(m, "gateway_cost_usd_total") == 0.25 * n
        assert value(m, "gateway_request_duration_seconds_bucket", le="0.5") == n
        assert value(m, "gateway_request_duration_seconds_bucket", le="0.25") == 0
        assert value(m, "gateway_upstream_duration_seconds_count") == n
        assert value(m, "gateway_time_to_first_byte_seconds_sum") == pytest.approx(0.1 * n)
        assert value(m, "gateway_overhead_seconds_count") == n
        assert value(m, "gateway_inflight_requests", team="design") == 0
