"""Fault specs: one small grammar shared by the header, the body field, the script and the flags.

A spec is ``;``-separated items, each ``name=value`` or a bare flag, e.g.
``latency_ms=2000;status=429;retry_after=1``. The full list is in the package docstring.
Parsing is strict (an unknown item or a bad value raises ``FaultSpecError`` naming it), because
a typo in a test's fault would otherwise silently test nothing.

Specs from several sources combine with ``Fault.merged``: an item set in the later spec wins,
items it leaves unset keep the earlier value.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace


class FaultSpecError(ValueError):
    """A fault spec that does not follow the grammar; the message names the bad item."""


def _count(name: str, text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError(f"{name} must be >= 0")
    return value


def _status(name: str, text: str) -> int:
    value = int(text)
    if not 400 <= value <= 599:
        raise ValueError(f"{name} must be an HTTP error status (400-599)")
    return value


def _seconds(name: str, text: str) -> float:
    value = float(text)
    if not value >= 0:  # also rejects NaN
        raise ValueError(f"{name} must be >= 0")
    return value


def _megabytes(name: str, text: str) -> float:
    value = float(text)
    if not 0 < value <= 1024:
        raise ValueError(f"{name} must be in (0, 1024]")
    return value


def _one_of(*options: str):
    def parse_option(name: str, text: str) -> str:
        if text not in options:
            raise ValueError(f"{name} must be one of {', '.join(options)}")
        return text

    return parse_option


MALFORMED = ("choices", "message", "images")
BLOCK_REASONS = ("IMAGE_SAFETY", "PROHIBITED_CONTENT", "IMAGE_PROHIBITED_CONTENT", "SAFETY")

# item name -> value parser; the bare flags are the bool fields of Fault.
_VALUE_ITEMS = {
    "latency_ms": _count,
    "status": _status,
    "retry_after": _seconds,
    "cut_after": _count,
    "hold_ms": _count,
    "drip_ms": _count,
    "image_mb": _megabytes,
    "malformed": _one_of(*MALFORMED),
    "split_error_ms": _count,
    "blocked": _one_of(*BLOCK_REASONS),
}
_FLAGS = (
    "reset", "garbage", "no_usage", "echo_key", "not_http", "echo_key_header", "echo_key_body",
    "echo_key_stream", "echo_key_stream_error", "key_escaped",
)


@dataclass(frozen=True)
class Fault:
    """What to do wrong with one request. ``None``/``False`` means "not set by this spec"."""

    latency_ms: int | None = None
    status: int | None = None
    retry_after: float | None = None
    reset: bool = False
    garbage: bool = False
    cut_after: int | None = None
    hold_ms: int | None = None
    drip_ms: int | None = None
    image_mb: float | None = None
    no_usage: bool = False
    echo_key: bool = False  # with status: the error message quotes the key, as some providers do
    not_http: bool = False
    malformed: str | None = None
    split_error_ms: int | None = None
    blocked: str | None = None
    echo_key_header: bool = False
    echo_key_body: bool = False
    echo_key_stream: bool = False
    echo_key_stream_error: bool = False
    key_escaped: bool = False

    def merged(self, later: Fault) -> Fault:
        """This spec overridden item by item by whatever ``later`` sets."""
        changes = {f.name: getattr(later, f.name) for f in fields(self) if _is_set(getattr(later, f.name))}
        return replace(self, **changes)

    def spec(self) -> str:
        """The canonical spec string (round-trips through ``parse``); ``""`` for no fault."""
        items = []
        for f in fields(self):
            value = getattr(self, f.name)
            if value is True:
                items.append(f.name)
            elif isinstance(value, str):
                items.append(f"{f.name}={value}")
            elif _is_set(value):
                items.append(f"{f.name}={number_text(value)}")
        return ";".join(items)


NO_FAULT = Fault()


def _is_set(value: object) -> bool:
    return value is not None and value is not False  # by identity: 0 is a value, not "unset"


def number_text(value: float) -> str:
    """``2.0`` -> ``"2"``, ``0.25`` -> ``"0.25"``: how numbers appear in specs and headers."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def parse(spec: str) -> Fault:
    """Parse a spec string; raises ``FaultSpecError`` naming the first bad item."""
    values: dict[str, object] = {}
    for raw in spec.split(";"):
        item = raw.strip()
        if not item:
            continue
        name, sep, text = (part.strip() for part in item.partition("="))
        if name in _FLAGS and not sep:
            values[name] = True
        elif name in _VALUE_ITEMS and sep:
            try:
                values[name] = _VALUE_ITEMS[name](name, text)
            except ValueError as exc:
                raise FaultSpecError(f"bad fault item {item!r}: {exc}") from None
        else:
            known = ", ".join([f"{n}=N" for n in _VALUE_ITEMS] + list(_FLAGS))
            raise FaultSpecError(f"unknown fault item {item!r} (known: {known})")
    return Fault(**values)
