"""Keep the upstream key inside the gateway: what of the provider's answer may reach a client.

A provider can echo the key it was sent (a "bad key sk-..." error, a debug header, a model that
repeats its prompt), and JSON lets it spell the key many ways. Three filters, one per channel:

* **Headers** pass only through ``ALLOWED_RESPONSE_HEADERS`` (what a client can act on: when to
  retry, and the provider's informational timing/version), and an allowed header whose value
  holds the key (any spelling, or a piece) is dropped too. Everything else (cookies, our account's rate limits, anything
  new a provider invents) stays here.
* **Error bodies** are small and read whole: ``KeyGuard.redact_json`` decodes them, replaces the
  key and every 8+ character piece of it inside every decoded string (so ``\\u0073k...``
  escapes cannot hide it), and re-encodes. A body that is not JSON is redacted as bytes.
* **200 bodies** can be 60 MB of base64 and are relayed as they arrive, so they are scanned,
  not decoded: ``KeyGuard.stream()`` returns a checker whose ``clean(chunk)`` replaces every
  occurrence of the key, written raw or JSON-escaped (any mix of plain characters, ``\\uXXXX``
  in either hex case and short escapes such as ``\\/``), even across chunk boundaries.

How the scan stays at wire speed: a raw occurrence is found by ``bytes.find`` (memchr/two-way,
GB/s). An escaped occurrence must contain an escape introducer (``\\u``, or the short escape of a
key character, e.g. ``\\/`` only if the key has a ``/``), and lies within one encoded key length
of it; base64 holds none, so the careful match (a regex of every spelling, run with ``pos`` and
``endpos``, no copies) runs only on the small windows around introducers (~400 MB/s on base64;
only a key with a ``/`` in a body whose every ``/`` is escaped degrades to the regex over the
whole body, ~40 MB/s; ``python -m tests.bench.secrets_scan``). At a chunk's end, the checker
holds back the tail that could still begin a spelling of the key (shorter than one spelling,
and nothing unless the tail really is such a prefix): the next chunk or ``flush()`` releases
it. A match whose first byte belongs to an escape (``\\u0073k...`` is a backslash, then text)
keeps that escape whole, so the JSON stays valid; the checker tracks backslash parity across
chunks for that.
"""
from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping

import orjson

REDACTED = "[redacted]"
PIECE = 8  # the shortest piece of the key redacted on its own in error bodies

# Lower-case names a client may see from the provider: the retry advice the OpenAI SDK honours
# (after our own retries are spent, it is the client's to act on) and informational headers.
ALLOWED_RESPONSE_HEADERS = frozenset(
    {"retry-after", "retry-after-ms", "x-should-retry", "openai-processing-ms", "openai-version", "openai-model"}
)

_SHORT_ESCAPES = {'"': b'\\"', "\\": b"\\\\", "/": b"\\/", "\b": b"\\b", "\f": b"\\f", "\n": b"\\n", "\r": b"\\r", "\t": b"\\t"}
_BACKSLASH = 0x5C
_BASE64 = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=")
ANCHOR_DENSITY = 1024  # an anchor byte more often than once in this many bytes: search for the whole key


def allowed_headers(headers: Mapping[str, str] | Iterable[tuple[str, str]], key: str = "") -> dict[str, str]:
    """The provider's response headers a client may see: allow-listed, and none whose value
    holds the upstream ``key`` in any spelling, or a piece of it."""
    items = headers.items() if isinstance(headers, Mapping) else headers
    allowed = {name: value for name, value in items if name.lower() in ALLOWED_RESPONSE_HEADERS}
    if key and allowed:
        guard = _guard(key)
        allowed = {name: value for name, value in allowed.items() if not guard.found_in(value)}
    return allowed


@functools.lru_cache(maxsize=4)
def _guard(key: str) -> KeyGuard:
    return KeyGuard(key)  # one per upstream key, built on first use


def _units(char: str) -> list[int]:
    """The UTF-16 code units JSON's ``\\u`` escapes spell ``char`` with."""
    data = char.encode("utf-16-be")
    return [int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2)]


class KeyGuard:
    """Built once per upstream key; finds it in every spelling a provider can send."""

    def __init__(self, key: str) -> None:
        self.key = key
        self._raw = key.encode()
        self._pieces = {key[i : i + PIECE] for i in range(len(key) - PIECE + 1)} | ({key} if key else set())
        # Per key character: its raw bytes (None where JSON forbids it raw), its short escape,
        # and its \u escape in lower case (hex case is normalised before comparing).
        self._plain: list[bytes | None] = []
        self._short: list[bytes | None] = []
        self._uesc: list[bytes] = []
        alternatives: list[bytes] = []
        for char in key:
            plain = None if char in '"\\' or ord(char) < 0x20 else char.encode()  # JSON forbids these raw
            short = _SHORT_ESCAPES.get(char)
            units = _units(char)
            self._plain.append(plain)
            self._short.append(short)
            self._uesc.append(b"".join(b"\\u%04x" % u for u in units))
            spellings = [re.escape(plain)] if plain else []
            spellings += [re.escape(short)] if short else []
            spellings.append(b"".join(b"\\\\u" + b"".join(_hex_class(d) for d in b"%04x" % u) for u in units))
            alternatives.append(b"(?:" + b"|".join(spellings) + b")")
        self._pattern = re.compile(b"".join(alternatives)) if key else None
        self._introducers = [b"\\u"] + sorted({s for s in self._short if s})
        self._longest = sum(max(len(p or b""), len(s or b""), len(u)) for p, s, u in zip(self._plain, self._short, self._uesc))
        first = self._plain[0][:1] if key and self._plain[0] else b"\\"
        self._starts = {first, b"\\"}  # the bytes a spelling of the key can begin with
        # The key's first byte that base64 never holds ("-", "_", ...), and where: answers are
        # mostly base64, so memchr finds its few occurrences at memory speed, where a search for
        # the whole key (two-way) runs ~10 times slower over a 10 MB image.
        at = next((i for i, byte in enumerate(self._raw) if byte not in _BASE64), None)
        self._anchor = None if at is None else (self._raw[at : at + 1], at)

    def found_in(self, text: str) -> bool:
        """Whether ``text`` holds the key, raw or JSON-escaped, or an 8+ character piece of it."""
        if not self.key:
            return False
        return any(piece in text for piece in self._pieces) or self._pattern.search(text.encode("utf-8", "surrogateescape")) is not None

    # -- error bodies -------------------------------------------------------------------------

    def redact_text(self, text: str) -> str:
        """``text`` with the key, and every run of 8+ characters of it, replaced."""
        if not any(piece in text for piece in self._pieces):
            return text
        out, i = [], 0
        while i < len(text):
            length = self._piece_at(text, i)
            if length:
                out.append(REDACTED)
                i += length
            else:
                out.append(text[i])
                i += 1
        return "".join(out)

    def _piece_at(self, text: str, i: int) -> int:
        """Length of the longest piece of the key (the whole key, or 8+ characters) at ``text[i:]``."""
        key, best = self.key, 0
        if text.startswith(key, i):
            return len(key)
        start = key.find(text[i : i + PIECE]) if len(key) > PIECE and len(text) - i >= PIECE else -1
        while start >= 0:
            length = PIECE
            while start + length < len(key) and i + length < len(text) and key[start + length] == text[i + length]:
                length += 1
            best = max(best, length)
            start = key.find(text[i : i + PIECE], start + 1)
        return best

    def redact_json(self, body: bytes) -> bytes:
        """An error body with the key gone from every decoded string (keys of objects too)."""
        if not self.key:
            return body
        try:
            parsed = orjson.loads(body)
        except orjson.JSONDecodeError:
            scrubbed = self.clean_whole(body).decode("utf-8", "surrogateescape")
            return self.redact_text(scrubbed).encode("utf-8", "surrogateescape")
        return orjson.dumps(self._redact_value(parsed))

    def _redact_value(self, value):
        if isinstance(value, str):
            return self.redact_text(value)
        if isinstance(value, list):
            return [self._redact_value(v) for v in value]
        if isinstance(value, dict):
            return {self.redact_text(k): self._redact_value(v) for k, v in value.items()}
        return value

    # -- 200 bodies ---------------------------------------------------------------------------

    def stream(self) -> StreamGuard:
        """A checker for one response body, fed its chunks in order."""
        return StreamGuard(self)

    def clean_whole(self, body: bytes) -> bytes:
        """A whole body with the key replaced; no second copy when it holds none."""
        checker = self.stream()
        body, held = checker.clean(body), checker.flush()
        return body + held if held else body

    def _matches(self, buf: bytes, odd_before: bool) -> list[tuple[int, int]]:
        """Non-overlapping spans of ``buf`` that spell the key, in order."""
        found = {_unescaped_span(buf, i, i + len(self._raw), odd_before) for i in self._find_raw(buf)}
        for lo, hi in self._windows(buf):
            match = self._pattern.search(buf, lo, hi)
            while match:
                found.add(_unescaped_span(buf, match.start(), match.end(), odd_before))
                match = self._pattern.search(buf, match.start() + 1, hi)
        spans, end = [], 0
        for span in sorted(found):
            if span[0] >= end:
                spans.append(span)
                end = span[1]
        return spans

    def _find_raw(self, buf: bytes):
        """Where the key is written raw in ``buf`` (overlaps included)."""
        if self._anchor is None:
            yield from _find_all(buf, self._raw)
            return
        byte, at = self._anchor
        budget = len(buf) // ANCHOR_DENSITY + 16
        for n, i in enumerate(_find_all(buf, byte)):
            if n > budget:  # not rare in this body after all: the whole key's search is the faster
                yield from _find_all(buf, self._raw, max(0, i - at))
                return
            if i >= at and buf.startswith(self._raw, i - at):
                yield i - at

    def _windows(self, buf: bytes) -> list[tuple[int, int]]:
        """Merged ranges around each escape introducer: the only places an escaped key can be."""
        reach = self._longest
        introducers = tuple(self._introducers)  # each starts with a backslash: one search finds them all
        windows: list[tuple[int, int]] = []
        for p in _find_all(buf, b"\\"):
            if not buf.startswith(introducers, p):
                continue
            lo, hi = max(0, p - reach), min(len(buf), p + reach)
            if windows and lo <= windows[-1][1]:
                windows[-1] = (windows[-1][0], hi)
            else:
                windows.append((lo, hi))
        return windows

    def _hold_from(self, buf: bytes, after: int) -> int:
        """Where the tail that could still begin the key starts (``len(buf)`` if none)."""
        lo = max(after, len(buf) - self._longest + 1)
        # only where a spelling can begin (two bytes.find scans), not byte by byte
        for q in sorted(q for start in self._starts for q in _find_all(buf, start, lo)):
            if self._is_prefix(buf, q):
                return q
        return len(buf)

    def _is_prefix(self, buf: bytes, pos: int) -> bool:
        """Whether ``buf[pos:]`` is an incomplete spelling of the key."""
        for plain, short, uesc in zip(self._plain, self._short, self._uesc):
            rest = buf[pos:]
            if not rest:
                return True
            if rest[0] != _BACKSLASH:
                spelling = plain
            elif short and short.startswith(rest[: len(short)]):
                spelling = short
            else:
                spelling, rest = uesc, rest[: len(uesc)].lower()
            if not spelling or not spelling.startswith(rest[: len(spelling)]):
                return False
            if len(rest) < len(spelling):
                return True
            pos += len(spelling)
        return False  # a whole spelling: already found and replaced, nothing to hold


class StreamGuard:
    """One response body's checker: ``clean`` each chunk in order, then ``flush`` at the end."""

    def __init__(self, guard: KeyGuard) -> None:
        self._guard = guard
        self._held = b""
        self._odd = False  # what was already returned ends in an odd run of backslashes

    def clean(self, chunk: bytes) -> bytes:
        """``chunk`` (after what was held back) with the key replaced, minus a held-back tail."""
        guard = self._guard
        if not guard.key:
            return chunk
        buf = self._held + chunk if self._held else chunk
        spans = guard._matches(buf, self._odd)
        cut = guard._hold_from(buf, spans[-1][1] if spans else 0)
        self._held = buf[cut:]
        if spans:
            parts, start = [], 0
            for lo, hi in spans:
                parts += [buf[start:lo], REDACTED.encode()]
                start = hi
            parts.append(buf[start:cut])
            out = b"".join(parts)
        else:
            out = buf if cut == len(buf) else buf[:cut]
        self._odd = _odd_tail(out, self._odd)
        return out

    def flush(self) -> bytes:
        """What was held back at the end: the body ended, so it was not the key."""
        held, self._held = self._held, b""
        self._odd = _odd_tail(held, self._odd)
        return held


def _hex_class(digit: int) -> bytes:
    char = bytes([digit])
    return b"[" + char.lower() + char.upper() + b"]" if char.isalpha() else char


def _find_all(buf: bytes, needle: bytes, start: int = 0):
    i = buf.find(needle, start)
    while i >= 0:
        yield i
        i = buf.find(needle, i + 1)


def _unescaped_span(buf: bytes, start: int, end: int, odd_before: bool) -> tuple[int, int]:
    """The span to replace for a spelling at ``buf[start:end]``.

    If ``buf[start]`` follows an unescaped backslash it belongs to that escape (``\\u0073k...``
    is a backslash, then the text ``u0073k...``): the escape is kept whole, so the JSON stays
    valid, and the key's characters after it go."""
    run = 0
    while run < start and buf[start - run - 1] == _BACKSLASH:
        run += 1
    odd = run % 2 == 1
    if (odd != odd_before) if run == start else odd:
        start += 5 if buf[start] == ord("u") else 1  # past \uXXXX, or past \\ or \t
    return start, end


def _odd_tail(data: bytes, odd_before: bool) -> bool:
    """Whether the output ends in an odd run of backslashes, after ``data`` is appended."""
    run = len(data) - len(data.rstrip(b"\\"))
    return (run % 2 == 1) != odd_before if run == len(data) else run % 2 == 1
