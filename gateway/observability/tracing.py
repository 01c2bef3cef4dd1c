"""OpenTelemetry traces of requests, with the GenAI semantic conventions.

Imported only when the config has ``tracing`` (``http.app`` imports it then), so a gateway
without it loads nothing of OpenTelemetry, and its request path pays one ``if`` per hook
(``rec.trace is None``). A request is one SERVER span, continuing the client's ``traceparent``;
its children are ``admission``, ``cache``, ``upstream`` (CLIENT: its ``traceparent`` goes to the
provider) and ``relay``. Events: ``retry`` (upstream), ``first_byte``, ``stream_cut``. A request
that failed has status ERROR with its error code as the description.

An Images API request (``n`` images) is one server span with ``gen_ai.operation.name`` = ``chat``
(the contract names one operation for every request: each becomes chat calls to the provider),
``gen_ai.output.type`` = ``image`` and ``gen_ai.request.choice.count`` = ``n``;
its ``n`` chat calls are each an ``upstream`` CLIENT span (``chat``, as the provider sees them),
with their own ``cache`` and ``relay`` siblings, all children of that one server span.

Spans are parented explicitly (never through OpenTelemetry's current-context), so nothing is
attached to the event loop's context; the provider is the app's own (no global is set), batched
(``BatchSpanProcessor``) to ``<otlp_endpoint>/v1/traces`` over OTLP/HTTP and flushed at shutdown.
Attributes hold ids, names and counts only: never a key, a prompt or base64.
"""
from __future__ import annotations

from typing import Any, Mapping

from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, format_trace_id, set_span_in_context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from gateway.config import TracingConfig
from gateway.http.record import RequestRecord

# gen_ai.operation.name of the server span, by path (the GenAI conventions' well-known values)
OPERATIONS = {"/v1/chat/completions": "chat", "/v1/images/generations": "chat", "/v1/images/edits": "chat"}
IMAGE_PATHS = frozenset({"/v1/images/generations", "/v1/images/edits"})
MAX_PATH = 200  # paths come from clients: keep attributes bounded
_propagator = TraceContextTextMapPropagator()  # W3C traceparent/tracestate only: no baggage


class Tracing:
    """The app's tracer provider; ``start`` opens a request's trace."""

    def __init__(self, cfg: TracingConfig) -> None:
        self.provider = TracerProvider(
            resource=Resource.create({"service.name": cfg.service_name}),
            sampler=ParentBased(TraceIdRatioBased(cfg.sample_ratio)),
        )
        exporter = OTLPSpanExporter(endpoint=cfg.otlp_endpoint.rstrip("/") + "/v1/traces")
        self.provider.add_span_processor(BatchSpanProcessor(exporter))
        self._tracer = self.provider.get_tracer("gateway")

    def start(self, headers: Mapping[str, str], rec: RequestRecord, route: str | None) -> RequestTrace:
        """The request's SERVER span, a child of the client's ``traceparent`` when it sent one;
        named by its ``route`` (the pattern, never the path: names stay few), renamed
        ``<operation> <model>`` by ``finish`` for a chat or Images API request."""
        attributes = {"http.request.method": rec.method, "url.path": rec.path[:MAX_PATH],
                      "gateway.request_id": rec.request_id}
        if route is not None:
            attributes["http.route"] = route
        span = self._tracer.start_span(f"{rec.method} {route or 'unmatched'}", context=_propagator.extract(headers),
                                       kind=SpanKind.SERVER, attributes=attributes)
        return RequestTrace(self._tracer, span)

    def shutdown(self) -> None:
        """Export what is still queued, then stop (blocking: run it off the event loop)."""
        self.provider.shutdown()


class RequestTrace:
    """One request's server span and the way to its children."""

    __slots__ = ("_tracer", "span", "_parent", "trace_id", "sampled")

    def __init__(self, tracer: Any, span: Span) -> None:
        self._tracer, self.span = tracer, span
        self._parent = set_span_in_context(span)
        ctx = span.get_span_context()
        self.trace_id = format_trace_id(ctx.trace_id)
        self.sampled = ctx.trace_flags.sampled  # only a sampled trace is exported (and an exemplar)

    def child(self, name: str) -> _Child:
        """``with trace.child("admission"):`` an INTERNAL child span; an exception fails it."""
        return _Child(self._tracer.start_span(name, context=self._parent))

    def upstream(self, model: str) -> UpstreamSpan:
        """The CLIENT span of the call to the provider (its attempts, until its answer is released)."""
        return UpstreamSpan(self._tracer.start_span(
            "upstream", context=self._parent, kind=SpanKind.CLIENT,
            attributes={"gen_ai.operation.name": "chat", "gen_ai.request.model": model}))

    def event(self, name: str, attributes: Mapping[str, Any] | None = None) -> None:
        self.span.add_event(name, attributes)

    def choices(self, n: int) -> None:
        """The number of answers asked for (the Images API's ``n``)."""
        self.span.set_attribute("gen_ai.request.choice.count", n)

    def finish(self, rec: RequestRecord) -> None:
        """The request's outcome onto its span, then end it: once, whatever way it ended."""
        span = self.span
        attrs: dict[str, Any] = {"http.response.status_code": rec.status, "gateway.cache": rec.cache}
        if rec.team is not None:
            attrs["gateway.team"] = rec.team
        if rec.key_fingerprint is not None:
            attrs["gateway.key_fingerprint"] = rec.key_fingerprint
        operation = OPERATIONS.get(rec.path)
        if operation is not None:
            attrs["gen_ai.operation.name"] = operation
            attrs["gen_ai.request.model"] = rec.model
            span.update_name(f"{operation} {rec.model}")  # the GenAI convention's span name
            if rec.path in IMAGE_PATHS:
                attrs["gen_ai.output.type"] = "image"
            if rec.response_model:
                attrs["gen_ai.response.model"] = rec.response_model
            if rec.usage is not None:
                attrs["gen_ai.usage.input_tokens"] = rec.usage.prompt
                attrs["gen_ai.usage.output_tokens"] = rec.usage.completion
        span.set_attributes(attrs)
        if rec.error_code is not None:
            span.set_status(Status(StatusCode.ERROR, rec.error_code))
        elif rec.status >= 500:
            span.set_status(Status(StatusCode.ERROR, f"http_{rec.status}"))
        span.end()


class _Child:
    __slots__ = ("span",)

    def __init__(self, span: Span) -> None:
        self.span = span

    def __enter__(self) -> Span:
        return self.span

    def __exit__(self, _type, err: BaseException | None, _tb) -> None:
        if err is not None:
            fail(self.span, err)
        self.span.end()


class UpstreamSpan:
    """The provider call's CLIENT span: its ``traceparent`` header, retry events, its end."""

    __slots__ = ("span",)

    def __init__(self, span: Span) -> None:
        self.span = span

    def inject(self, headers) -> None:
        """``traceparent`` (and the client's ``tracestate``) naming this span, for the provider."""
        _propagator.inject(headers, context=set_span_in_context(self.span))

    def retry(self, attempt: int, reason: str) -> None:
        """A failed attempt that will be tried again; ``reason`` an HTTP status or error kind."""
        self.span.add_event("retry", {"gateway.retry.attempt": attempt, "gateway.retry.reason": reason})

    def answered(self, status: int) -> None:
        self.span.set_attribute("http.response.status_code", status)
        if status >= 400:
            self.span.set_status(Status(StatusCode.ERROR, f"http_{status}"))

    def end(self, err: BaseException | None = None) -> None:
        if err is not None:
            fail(self.span, err)
        self.span.end()


def fail(span: Span, err: BaseException) -> None:
    """ERROR with the error's code (a ``GatewayError``'s), else its type: never its message."""
    code = getattr(err, "code", None)
    span.set_status(Status(StatusCode.ERROR, code if isinstance(code, str) else type(err).__name__))
