"""Big data-URL strings found in raw JSON bytes and cut out, so only the skeleton is parsed.

A 60 MB request or a 10 MB answer is mostly base64 in a few JSON strings. ``orjson.loads`` of
the whole builds a Python str of each (~40 ms per 10 MB here) and holds the GIL throughout, even
in a thread, stalling every other stream of the worker. The gateway needs those strings' bytes
only (to check, hash or relay them), so ``cut`` finds them at memchr speed and returns the
skeleton: the document with each one replaced by a placeholder ``"\\u0000<n>"``, a few KB that
parse in microseconds. The caller reads each cut string from ``raw[start:end]``.

What is cut: a string that starts with ``data:``, is at least ``MIN_BYTES`` long, holds no
backslash (so its bytes are its value and its end is the next quote) and is the value of a
``"url"`` or ``"image"`` key (where image parts carry their data URLs). Strings are found by
walking the quotes from the start (``bytes.find``: base64 holds none), so a quote inside a
string is never taken for one that opens a string. A placeholder cannot be one of the
document's own strings: when the skeleton spells ``\\u0000`` anywhere, nothing is cut.

Cutting proves nothing about the cut bytes: they are valid JSON string content only if they
hold no control character and are UTF-8. Callers check that (``base64_ok`` proves it for a
data URL: strict base64 is a subset of printable ASCII) or parse the whole instead.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pybase64

MIN_BYTES = 4096  # shorter strings cost nothing to parse
MAX_QUOTES = 20_000  # a document of many small strings: walking its quotes would cost more than parsing
SLICE = 1 << 20  # base64 characters checked per call (pybase64 holds the GIL while it runs)
_KEYS = re.compile(rb'"(?:url|image)"\s*:\s*$')  # the key before a cut string (looked at in ~16 bytes)
_HEADER = re.compile(rb"data:[\x20-\x21\x23-\x5b\x5d-\x7e]{0,64}?,")  # printable ASCII, no quote or backslash


@dataclass(frozen=True, slots=True)
class Cut:
    skeleton: bytes  # the document with every cut string replaced by "\u0000<n>"
    spans: tuple[tuple[int, int], ...]  # span n: where string n's characters are in raw (quotes excluded)


def cut(raw: bytes | bytearray, *, min_bytes: int = MIN_BYTES) -> Cut | None:
    """The skeleton of ``raw`` and where its cut strings are, or None when there is nothing to cut."""
    spans: list[tuple[int, int]] = []
    find, startswith = raw.find, raw.startswith
    i, quotes = find(b'"'), 0
    while i != -1:
        quotes += 1
        if quotes > MAX_QUOTES:
            return None
        end = find(b'"', i + 1)  # i opens a string: where it ends, if it holds no escaped quote
        while end != -1 and raw[end - 1] == 0x5C and _escaped(raw, end):
            end = find(b'"', end + 1)
        if end == -1:
            return None  # unterminated: the parser will say so
        if (end - i > min_bytes and startswith(b"data:", i + 1) and find(b"\\", i + 1, end) == -1
                and _KEYS.search(raw, max(0, i - 16), i)):
            spans.append((i + 1, end))
        i = find(b'"', end + 1)
    if not spans:
        return None
    parts, pos = [], 0
    for n, (start, end) in enumerate(spans):
        parts += [raw[pos:start], b"\\u0000%d" % n]
        pos = end
    parts.append(raw[pos:])
    skeleton = b"".join(parts)
    if skeleton.count(b"\\u0000") != len(spans):
        return None  # the document spells \u0000 itself: a placeholder could be mistaken for it
    return Cut(skeleton, tuple(spans))


def _escaped(raw: bytes | bytearray, pos: int) -> bool:
    """Whether the quote at ``pos`` follows an odd run of backslashes."""
    run = 0
    while raw[pos - run - 1] == 0x5C:
        run += 1
    return run % 2 == 1


def index(value: object) -> int | None:
    """The span number a parsed placeholder stands for, or None for any other value."""
    if type(value) is str and value[:1] == "\x00" and value[1:].isdigit():
        return int(value[1:])
    return None


def restore(value: Any, string: Callable[[int], str | None]) -> Any:
    """``value`` (a parsed skeleton) with each placeholder replaced by ``string(n)`` (kept where
    that is None), in place."""
    n = index(value)
    if n is not None:
        restored = string(n)
        return value if restored is None else restored
    if isinstance(value, dict):
        for key, item in value.items():
            value[key] = restore(item, string)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            value[i] = restore(item, string)
    return value


def base64_ok(view: memoryview) -> bool:
    """Whether a cut data URL is ``data:<printable ASCII>,<strict base64>``: valid JSON string
    content, checked slice by slice so another thread gets the GIL between slices."""
    head = _HEADER.match(view[:80])
    if head is None:
        return False
    for start in range(head.end(), len(view), SLICE):
        try:
            pybase64.b64decode(view[start:start + SLICE], validate=True)
        except ValueError:
            return False
    return True


def splice(encoded: bytes, raw: bytes | bytearray, spans: dict[int, tuple[int, int]]) -> bytes:
    """``encoded`` (orjson's output for a parsed skeleton) with the placeholder of each string in
    ``spans`` (number -> where it is in ``raw``) replaced by the string's original bytes."""
    found = []
    for n, span in spans.items():
        at = encoded.find(b'"\\u0000%d"' % n)
        if at == -1:
            raise ValueError(f"placeholder {n} is not in the encoded document")
        found.append((at + 1, at + len(b'"\\u0000%d' % n), span))
    parts, pos = [], 0
    view = memoryview(raw)
    for at, after, (start, end) in sorted(found):
        parts += [encoded[pos:at], view[start:end]]
        pos = after
    parts.append(encoded[pos:])
    return b"".join(parts)
