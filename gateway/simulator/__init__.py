"""A simulated upstream: the provider API of ``upstream/API.md``, for demos, tests and benchmarks.

It answers like the real provider (same JSON and SSE shapes, real JPEG images, plausible usage,
the provider's errors) but in milliseconds, deterministically, and with faults on demand, so
the gateway's relay, retries, accounting and limits can be tested through real HTTP.

Routes
    POST /v1/chat/completions   Bearer key; text-to-image, edit (1 image), composition
                                (several), vision (``modalities`` without "image", or the last
                                user text ends with "?"), JSON or SSE (``"stream": true``)
    GET  /v1/models             Bearer key; the provider's model list
    GET  /_sim/stats            no auth; calls, completed, cancelled, outcomes, inflight and
                                peak_inflight per ``user``, the last 200 requests
    POST /_sim/script           no auth; ``{"faults": ["status=503", ""]}`` queues one spec per
                                coming chat request ("" = no fault for that one)
    POST /_sim/reset            no auth; clears stats (not live inflight counts) and the script

Images are a pure function of (all message text, seed, image_config, input bytes): the same
request gives byte-identical JPEGs, with or without a seed. Sizes follow Gemini's table:
1K 1:1 is 1024x1024, 16:9 is 1376x768, 2K and 4K are 2x and 4x. Without ``aspect_ratio``
an edit keeps the shape of its input. Any ``model`` is accepted and echoed.

Fault grammar
    A spec is ``;``-separated items, ``name=value`` or a bare flag, e.g.
    ``latency_ms=2000;status=429;retry_after=1``:

    latency_ms=N    wait N ms before answering at all
    status=CODE     answer HTTP CODE (400-599) with the provider's JSON error for it
                    (429: "Rate limit exceeded.", rate_limit_error, rate_limit_exceeded)
    retry_after=S   with status: send ``Retry-After: S`` (seconds; fractions allowed)
    reset           drop the connection (TCP RST) without any response
    garbage         answer 200 ``application/json`` with a body that is not JSON
    cut_after=N     stream: close the connection after N ``data:`` events, no ``[DONE]``
    hold_ms=N       stream: after the first ``data:`` event, wait N ms before the rest
    drip_ms=N       stream: wait N ms between every two events
    image_mb=N      pad the JPEG to at least N MiB (decoded) with comment segments; still valid
    no_usage        leave usage out (no ``usage`` key in JSON, no usage in the stream)
    echo_key        with status: the error message quotes the caller's key (as some providers
                    do), to prove the gateway never passes the upstream key on
    echo_key_header every response carries the key in ``X-Debug-Authorization`` and in
                    ``OpenAI-Model`` (a name a gateway may allow through)
    echo_key_body   JSON 200: the message ``content`` quotes the key
    echo_key_stream stream: a content delta quotes the key, written in two pieces split
                    inside the key
    echo_key_stream_error
                    stream: after the progress text, ``data: {"error": {...}}`` quoting the
                    key (finish_reason ``error``), then the body ends without ``[DONE]``
    key_escaped     wherever the key is echoed, spell it JSON-escaped: every other character
                    as ``\\uXXXX`` (mixed hex case), which decodes to the key but is not its bytes
    malformed=WHAT  a 200 of the wrong shape, WHAT one of ``choices`` (``"choices": 1``),
                    ``message`` (a string), ``images`` (``5``); in a stream, one such event
                    (``data: {"choices":1}``...) after the progress text, the rest as usual
    blocked=REASON  a safety-blocked answer: no image (or text), ``finish_reason``
                    ``content_filter``, ``native_finish_reason`` REASON (``IMAGE_SAFETY``,
                    ``PROHIBITED_CONTENT``, ``IMAGE_PROHIBITED_CONTENT``, ``SAFETY``); usage
                    bills the prompt and thinking, no image tokens
    not_http        answer with bytes that are no HTTP at all, then close the connection
    split_error_ms=N
                    with status: send the error's headers and half its body, wait N ms, then
                    the rest (a body that arrives in two TCP pieces)

    ``reset`` and ``not_http`` happen after the whole request was read and counted, so the
    stats prove whether a gateway sent it again.
    The leading ``: PROCESSING`` comment of a stream is not an event for cut/hold/drip.
    When several apply: reset wins over not_http, not_http over status, status over garbage,
    garbage over an answer.

Fault sources, combined item by item, later ones overriding earlier ones:
    1. the server default: ``create_app(latency_ms=, fault=)`` / ``--latency-ms``, ``--fault``
    2. the next scripted spec (``POST /_sim/script``), popped by each chat request that passed
       auth and JSON parsing (so a 401 does not consume one)
    3. the request header ``X-Sim-Fault: <spec>``
    4. the body field ``"sim_fault": "<spec>"`` (reaches the simulator through the gateway,
       which passes unknown body fields on)
    A malformed spec is a 400 ``invalid_fault`` naming the bad item.
"""
from .app import create_app
from .faults import Fault, FaultSpecError
from .server import serve

__all__ = ["Fault", "FaultSpecError", "create_app", "serve"]
