"""Server-sent events split on raw chunks, never by line reading.

One ``data:`` line may carry a 30 MB image, so a line reader with a small buffer is out.
``EventScanner`` finds event boundaries in the chunks as they arrive and reports what the
gateway needs from a stream: the usage, how many images went out, the finish reasons, whether
``[DONE]`` came, and an error event if the provider sent one. Whole events are read through
``gateway.answer``: one that is not a provider event raises ``UpstreamBadResponse``. Events
larger than ``large`` are *skimmed* unless the caller wants whole events (the cache does): only
their head and tail are kept and image markers are counted on the fly, so relaying a huge event
costs no second copy. A whole event is kept up to ``whole_max`` bytes, never more: a provider
streaming without separators must not grow the buffer until the deadline.
"""
from __future__ import annotations

import re
from typing import Any, Callable

import orjson

from gateway import answer
from gateway.errors import UpstreamBadResponse

SEPARATORS = (b"\n\n", b"\r\n\r\n")
# Once per image in any shape the provider or OpenAI use ({"type":"image_url","image_url":{...}}),
# whatever the spacing after the colon; base64 holds no quote, escaped JSON text holds \" instead.
IMAGE_MARKER = b'"image_url":'
SCAN_STEPS = 16  # newlines or quotes looked at one by one before a plain search takes over
HEAD_BYTES = 4096
TAIL_BYTES = 64 * 1024
FINISH_RE = re.compile(rb'"finish_reason"\s*:\s*"([A-Za-z_]+)"')
NATIVE_FINISH_RE = re.compile(rb'"native_finish_reason"\s*:\s*"([A-Za-z_]+)"')


def event_data(event: bytes | bytearray) -> memoryview | None:
    """The ``data:`` payload of one event (multi-line data joined), or None if it has none."""
    view = memoryview(event)
    if event.startswith(b"data:") and b"\n" not in event:  # the usual case: no copy
        start = 6 if event[5:6] == b" " else 5
        return view[start:]
    parts = []
    for line in bytes(event).splitlines():
        if line.startswith(b"data:"):
            parts.append(line[6:] if line[5:6] == b" " else line[5:])
    return memoryview(b"\n".join(parts)) if parts else None


def _find_separator(buf: bytes | bytearray, start: int) -> tuple[int, int]:
    """(index, length) of the first event separator (``SEPARATORS``) at or after ``start``, or (-1, 0).

    Looks for single newlines (memchr speed: a 10 MB base64 line has none) and checks their
    neighbours: a separator's first newline is its first or its second byte. Text with many
    lone newlines hands over to plain searches after ``SCAN_STEPS`` of them."""
    i = buf.find(b"\n", start)
    for _ in range(SCAN_STEPS):
        if i == -1:
            return -1, 0
        if i > start and buf.startswith(b"\r\n\r\n", i - 1):
            return i - 1, 4
        if buf.startswith(b"\n", i + 1):
            return i, 2
        i = buf.find(b"\n", i + 1)
    if i == -1:
        return -1, 0
    best, length = -1, 0  # no separator has its first newline before i
    for sep in SEPARATORS:
        j = buf.find(sep, max(start, i - 1))
        if j != -1 and (best == -1 or j < best):
            best, length = j, len(sep)
    return best, length


def count_images(buf: bytes | bytearray, start: int = 0, end: int | None = None) -> int:
    """How many ``IMAGE_MARKER`` start in ``buf[start:end]``: one pass, at memchr speed over
    base64 (quotes are looked at one by one for ``SCAN_STEPS``, then one plain count)."""
    if end is None:
        end = len(buf)
    n = 0
    i = buf.find(b'"', start, end)
    for _ in range(SCAN_STEPS):
        if i == -1:
            return n
        if buf.startswith(IMAGE_MARKER, i, end):
            n += 1
        i = buf.find(b'"', i + 1, end)
    return n if i == -1 else n + buf.count(IMAGE_MARKER, i, end)


def _json_object_after(text: bytes, pos: int) -> Any:
    """Parse the JSON value that starts at the first ``{`` or ``null`` after ``pos``."""
    colon = text.find(b":", pos)
    if colon == -1:
        return None
    rest = text[colon + 1 :].lstrip()
    if not rest.startswith(b"{"):
        return None
    depth, in_str, esc = 0, False, False
    for i, c in enumerate(rest):
        if in_str:
            if esc:
                esc = False
            elif c == 0x5C:
                esc = True
            elif c == 0x22:
                in_str = False
        elif c == 0x22:
            in_str = True
        elif c == 0x7B:
            depth += 1
        elif c == 0x7D:
            depth -= 1
            if depth == 0:
                try:
                    return orjson.loads(rest[: i + 1])
                except orjson.JSONDecodeError:
                    return None
    return None


class EventScanner:
    """Feed raw chunks; read ``usage``, ``images_out``, ``finish_reason``, ``native_finish_reason``,
    ``done``, ``error``."""

    def __init__(self, on_event: Callable[[answer.Answer], None] | None = None, *, large: int = 1 << 20,
                 whole_max: int = 1 << 62, whole: bool = False) -> None:
        """``on_event`` gets every parsed event, kept whole for it up to ``whole_max`` bytes; past
        that it is dropped (``on_event`` becomes None: a cache collector keeps nothing of this
        stream). ``whole``: the caller needs every event whole (links rewrite them), so one past
        ``whole_max`` is ``UpstreamBadResponse``."""
        self.on_event = on_event
        self.large = large
        self.whole_max = whole_max
        self.whole = whole
        self.usage: dict | None = None
        self.images_out = 0
        self.finish_reason: str | None = None
        self.native_finish_reason: str | None = None
        self.done = False
        self.error: dict | None = None
        self.events = 0
        self._buf = bytearray()
        self._scan_from = 0
        self._skim: _Skim | None = None

    @property
    def mid_event(self) -> bool:
        """True when a partial event is pending (a cut stream needs a separator first)."""
        return bool(self._buf) or self._skim is not None

    def feed(self, chunk: bytes) -> list[bytearray]:
        """Consume one chunk; return the complete events still to be parsed and handled."""
        pending: list[bytearray] = []
        pos = 0
        while pos < len(chunk):
            if self._skim is not None:
                consumed = self._skim.feed(chunk, pos)
                if consumed < 0:
                    break
                self._finish_skim()
                pos = consumed
                continue
            before = len(self._buf)
            self._buf += chunk if pos == 0 else memoryview(chunk)[pos:]
            pos = len(chunk)
            idx, seplen = _find_separator(self._buf, max(0, before - 3))
            while idx != -1:
                event = self._buf[:idx]
                del self._buf[: idx + seplen]
                if event:
                    pending.append(event)
                idx, seplen = _find_separator(self._buf, 0)
            if len(self._buf) > min(self.large, self.whole_max) and not self._keep_whole():
                self._skim = _Skim(self._buf)
                self._buf = bytearray()
        return pending

    def _keep_whole(self) -> bool:
        """Whether the pending event, grown past a limit, is still kept whole."""
        if len(self._buf) <= self.whole_max:
            return self.whole or self.on_event is not None
        if self.whole:
            raise UpstreamBadResponse(f"The upstream sent a stream event over {self.whole_max >> 20} MB.")
        self.on_event = None
        return False

    def handle(self, payload: memoryview | None) -> None:
        """Record one complete event's data; UpstreamBadResponse if it is not a provider event."""
        if payload is None:
            return  # a comment or a field-only event
        if payload == b"[DONE]":
            self.done = True
            return
        event = answer.loads(payload, chunk=True, image_data=self.on_event is not None)
        self.events += 1
        if event.error is not None:
            self.error = event.error
        if event.usage is not None:
            self.usage = event.usage
        self.images_out += event.images_out
        self.finish_reason = event.finish_reason or self.finish_reason
        self.native_finish_reason = event.native_finish_reason or self.native_finish_reason
        if self.on_event is not None:
            self.on_event(event)

    def _finish_skim(self) -> None:
        skim, self._skim = self._skim, None
        self.events += 1
        self.images_out += skim.images
        tail = bytes(skim.tail)
        for text in (tail, skim.head):
            pos = text.rfind(b'"usage"')
            if pos != -1:
                usage = _json_object_after(text, pos)
                if isinstance(usage, dict):
                    self.usage = usage
                    break
        self.finish_reason = _last_match(FINISH_RE, tail, skim.head) or self.finish_reason
        self.native_finish_reason = _last_match(NATIVE_FINISH_RE, tail, skim.head) or self.native_finish_reason


def _last_match(pattern: re.Pattern, *texts: bytes) -> str | None:
    """The last match in the first text that has one (a skimmed event's tail, then its head)."""
    for text in texts:
        found = pattern.findall(text)
        if found:
            return found[-1].decode()
    return None


class _Skim:
    """A large event being relayed: keeps its head, its last TAIL_BYTES and an image count."""

    EDGE = 24  # longer than any marker or separator, so none is missed across chunks

    def __init__(self, start: bytearray) -> None:
        self.head = bytes(start[:HEAD_BYTES])
        self.images = count_images(start)
        self.tail = bytearray(start[-TAIL_BYTES:])

    def feed(self, chunk: bytes, pos: int) -> int:
        """Scan ``chunk[pos:]`` in place; return where the next event starts, or -1."""
        carry = bytes(self.tail[-self.EDGE :])
        lead = chunk[pos : pos + self.EDGE]
        edge = carry + lead
        # Markers and a separator that straddle the previous chunk and this one.
        self.images += count_images(edge) - count_images(carry) - count_images(lead)
        idx, seplen = _find_separator(edge, 0)
        if idx != -1 and idx < len(carry):
            return pos + idx + seplen - len(carry)
        idx, seplen = _find_separator(chunk, pos)
        body_end = len(chunk) if idx == -1 else idx
        self.images += count_images(chunk, pos, body_end)
        self.tail += memoryview(chunk)[max(pos, body_end - TAIL_BYTES) : body_end]
        if len(self.tail) > TAIL_BYTES:
            del self.tail[: len(self.tail) - TAIL_BYTES]
        return -1 if idx == -1 else idx + seplen
