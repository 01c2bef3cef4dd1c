"""The request body as aiohttp sends it upstream: in slices, so no one write holds the loop.

Given bytes, aiohttp writes the whole body with one ``write()`` call on the socket; on loopback
the kernel keeps copying for as long as the peer reads, so a 60 MB body held the event loop for
over 100 ms (aiohttp warns of this for bodies over 1 MB). ``SlicedBody`` writes ``SLICE`` bytes
at a time and waits for the socket to drain between slices, with the same Content-Length and
bytes, and can be sent again (the upstream's retries). ``sliced`` leaves a body of one slice or
less as it is: aiohttp writes it in one call anyway, without a payload object's cost.
"""
from __future__ import annotations

from typing import Any

from aiohttp.abc import AbstractStreamWriter
from aiohttp.payload import Payload

SLICE = 1 << 20  # bytes per write: ~1 ms of copying


def sliced(value: bytes | bytearray | memoryview) -> bytes | bytearray | memoryview | SlicedBody:
    """``value`` to hand aiohttp as a body: itself when small, else a ``SlicedBody``."""
    return value if len(value) <= SLICE else SlicedBody(value)


class SlicedBody(Payload):
    def __init__(self, value: bytes | bytearray | memoryview, **kwargs: Any) -> None:
        view = memoryview(value).cast("B")
        super().__init__(view, content_type=kwargs.pop("content_type", "application/json"), **kwargs)
        self._size = view.nbytes

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        return bytes(self._value).decode(encoding, errors)

    async def as_bytes(self, encoding: str = "utf-8", errors: str = "strict") -> bytes:
        return bytes(self._value)

    async def write(self, writer: AbstractStreamWriter) -> None:
        await self.write_with_length(writer, None)

    async def write_with_length(self, writer: AbstractStreamWriter, content_length: int | None) -> None:
        view = self._value if content_length is None else self._value[:content_length]
        for start in range(0, len(view), SLICE):
            await writer.write(view[start:start + SLICE])  # waits for the socket to drain
