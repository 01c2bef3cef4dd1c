"""Writes one SSE answer event by event, applying the stream faults on the way.

Each event goes to the wire as soon as it is sent (``await response.write``), so a client sees
the first event while the rest is still being made or held. The stream faults live here
because they are about event positions: ``hold_ms`` waits after the first event, ``drip_ms``
between every two, and ``cut_after=N`` closes the connection after N ``data:`` events without
``[DONE]`` (the leading ``: PROCESSING`` comment is not counted).
"""
from __future__ import annotations

import asyncio
from typing import Any

import orjson
from aiohttp import web

from .faults import Fault
from .misbehave import KEY_MARK, spell


class StreamCut(Exception):
    """The ``cut_after`` fault closed the connection mid-stream, on purpose."""


class EventStream:
    def __init__(self, request: web.Request, response: web.StreamResponse, fault: Fault) -> None:
        self._request = request
        self._response = response
        self._cut_after = fault.cut_after
        self._hold_s = (fault.hold_ms or 0) / 1000
        self._drip_s = (fault.drip_ms or 0) / 1000
        self.sent = 0  # data events written so far

    async def comment(self, text: str) -> None:
        await self._response.write(f": {text}\n\n".encode())

    async def send(self, event: dict[str, Any], key_spelling: bytes | None = None) -> None:
        """One ``data:`` event. With ``key_spelling``, the key is written in at ``KEY_MARK`` and
        the event goes out in two writes split inside the key, as a chunk boundary may fall."""
        data = b"data: " + orjson.dumps(event) + b"\n\n"
        if key_spelling is None:
            await self._write(data)
            return
        split = data.index(KEY_MARK.encode()) + len(key_spelling) // 2
        data = spell(data, key_spelling)
        await self._write(data[:split], data[split:])

    async def end(self) -> None:
        """The end of the body without ``[DONE]``, as after a mid-stream error event."""
        await self._response.write_eof()

    async def done(self) -> None:
        """``data: [DONE]`` and the end of the body (unless ``cut_after`` ends it first)."""
        if self._cut_after is not None:
            self._cut()
        await self._pace()
        await self._response.write(b"data: [DONE]\n\n")
        await self._response.write_eof()

    async def _write(self, *parts: bytes) -> None:
        if self._cut_after is not None and self.sent >= self._cut_after:
            self._cut()
        await self._pace()
        for part in parts:
            await self._response.write(part)
        self.sent += 1

    async def _pace(self) -> None:
        if self.sent == 1 and self._hold_s:
            await asyncio.sleep(self._hold_s)
        if self.sent and self._drip_s:
            await asyncio.sleep(self._drip_s)

    def _cut(self) -> None:
        # close(), not abort(): what was written still reaches the client, then EOF arrives
        # in the middle of the chunked body, as when a real upstream dies mid-stream.
        if self._request.transport is not None:
            self._request.transport.close()
        raise StreamCut
