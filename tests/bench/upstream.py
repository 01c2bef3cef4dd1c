"""The bench's upstream: a raw asyncio HTTP/1.1 server answering with canned bytes.

No framework, no parsing beyond what framing needs, so it is many times faster than anything
put in front of it. Every POST gets a precomputed answer chosen by the request body's
``"bench"`` field (the gateway passes unknown fields through untouched); the default is
``small``.

    small     a small chat.completion (one tiny image), ~1 KB, Content-Length
    big_json  a chat.completion carrying one 10 MB base64 image, Content-Length
    big_sse   the same as an SSE stream, the image in ONE event, chunked encoding
    img2k     a chat.completion carrying one ~5 MB base64 image (a "2K" image), Content-Length
    img4k     a chat.completion carrying one 20 MB base64 image (a "4K" image), Content-Length
    small_sse ``small`` as an SSE stream (4 events), chunked encoding
    slow      ``small``, but held SLOW_S seconds first

Keep-alive is the default (HTTP/1.1), ``Connection: close`` is honoured, request bodies may
come with Content-Length or chunked. Requests on one connection are answered in order.

    python -m tests.bench.upstream [--host H] [--port P]   # prints "upstream listening on http://H:P"
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import random
import re
import resource
import time

import orjson

SLOW_S = 5.0
BIG_B64_BYTES = 10 * 1000 * 1000  # the "10 MB image" as it travels: base64 text
IMG2K_B64_BYTES = 5 * 1000 * 1000  # a 2K image, ~5 MB of base64
IMG4K_B64_BYTES = 20 * 1000 * 1000  # a 4K image, 20 MB of base64 (the provider's can exceed 30 MB)
MODEL = "google/gemini-3-pro-image-preview"
MODE_RE = re.compile(rb'"bench"\s*:\s*"([A-Za-z0-9_]+)"')
HEAD_SCAN = 4096  # clients put "bench" first; the whole body is searched only as a fallback
MAX_HEADER = 64 * 1024


def _image_url(b64_len: int, seed: int) -> str:
    raw_len = b64_len // 4 * 3
    rnd = random.Random(seed)
    raw = b"\xff\xd8\xff\xe0" + rnd.randbytes(raw_len - 4)  # JPEG magic, then noise
    return "data:image/jpeg;base64," + base64.b64encode(raw).decode()


def _usage() -> dict:
    return {
        "prompt_tokens": 14, "completion_tokens": 2004, "total_tokens": 2018,
        "completion_tokens_details": {"accepted_prediction_tokens": 0, "audio_tokens": 0, "image_tokens": 1120,
                                      "reasoning_tokens": 884, "rejected_prediction_tokens": 0},
        "prompt_tokens_details": None,
    }


def _completion(image_url: str) -> bytes:
    message = {
        "role": "assistant", "content": "", "refusal": None, "annotations": None,
        "images": [{"type": "image_url", "index": 0, "image_url": {"url": image_url}}],
        "reasoning_content": "", "function_call": None, "tool_calls": None, "reasoning_details": [],
    }
    return orjson.dumps({
        "id": "chatcmpl-bench", "object": "chat.completion", "created": 1779778659, "model": MODEL,
        "choices": [{"index": 0, "message": message, "finish_reason": "stop", "native_finish_reason": "STOP",
                     "logprobs": None}],
        "usage": _usage(), "system_fingerprint": None, "service_tier": None, "logprobs": None,
    })


def _sse_events(image_url: str) -> list[bytes]:
    base = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1779778659, "model": MODEL}

    def chunk(delta: dict, finish: str | None = None, **extra) -> bytes:
        choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        return b"data: " + orjson.dumps({**base, "choices": [choice], **extra}) + b"\n\n"

    return [
        chunk({"role": "assistant", "content": ""}),
        chunk({"images": [{"type": "image_url", "index": 0, "image_url": {"url": image_url}}]}),  # ONE event
        chunk({}, "stop", usage=_usage()),
        b"data: [DONE]\n\n",
    ]


def _fixed(body: bytes, content_type: bytes = b"application/json") -> bytes:
    return (b"HTTP/1.1 200 OK\r\nContent-Type: " + content_type + b"\r\nContent-Length: "
            + str(len(body)).encode() + b"\r\n\r\n" + body)


def _chunked(events: list[bytes]) -> bytes:
    out = [b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
           b"Transfer-Encoding: chunked\r\n\r\n"]
    for event in events:
        out += [b"%x\r\n" % len(event), event, b"\r\n"]
    out.append(b"0\r\n\r\n")
    return b"".join(out)


def build_responses() -> dict[bytes, bytes]:
    small = _completion(_image_url(800, 1))
    big_url = _image_url(BIG_B64_BYTES, 2)
    return {
        b"small": _fixed(small),
        b"slow": _fixed(small),
        b"big_json": _fixed(_completion(big_url)),
        b"big_sse": _chunked(_sse_events(big_url)),
        b"small_sse": _chunked(_sse_events(_image_url(800, 1))),
        b"img2k": _fixed(_completion(_image_url(IMG2K_B64_BYTES, 3))),
        b"img4k": _fixed(_completion(_image_url(IMG4K_B64_BYTES, 4))),
    }


NOT_FOUND = b"HTTP/1.1 404 Not Found\r\nContent-Type: text/plain\r\nContent-Length: 10\r\n\r\nnot found\n"
BAD = b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nContent-Length: 12\r\n\r\nbad request\n"


class Upstream(asyncio.Protocol):
    """One connection: parse requests in order, answer each with canned bytes."""

    responses: dict[bytes, bytes] = {}

    def __init__(self) -> None:
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.busy = False  # a slow answer is pending: parse nothing more until it is sent
        self.head: tuple[bytes, bytes, bool, int | None, bool] | None = None  # method, path, close, length, chunked

    def connection_made(self, transport) -> None:
        self.transport = transport

    def connection_lost(self, exc) -> None:
        self.transport = None

    def pause_writing(self) -> None:  # the client reads slower than we answer: stop reading
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None:
            self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.busy:
            self._parse()

    def _parse(self) -> None:
        while self.transport is not None and not self.busy:
            if self.head is None:
                end = self.buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(self.buf) > MAX_HEADER:
                        self._reply(BAD, close=True)
                    return
                self.head = self._head(bytes(self.buf[:end]))
                del self.buf[:end + 4]
                if self.head is None:
                    self._reply(BAD, close=True)
                    return
            method, path, close, length, chunked = self.head
            if chunked:
                body = self._dechunk()
                if body is None:
                    return
            else:
                length = length or 0
                if len(self.buf) < length:
                    return
                body = bytes(self.buf[:length])
                del self.buf[:length]
            self.head = None
            self._answer(method, path, body, close)

    @staticmethod
    def _head(head: bytes):
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ")
        if len(parts) != 3:
            return None
        close = parts[2] == b"HTTP/1.0"
        length, chunked = None, False
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name, value = name.strip().lower(), value.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding":
                chunked = b"chunked" in value
            elif name == b"connection":
                close = value == b"close" or (close and value != b"keep-alive")
        return parts[0], parts[1], close, length, chunked

    def _dechunk(self) -> bytes | None:
        """The whole chunked body, or None while it is incomplete (nothing consumed then)."""
        pos, pieces = 0, []
        while True:
            eol = self.buf.find(b"\r\n", pos)
            if eol < 0:
                return None
            size = int(bytes(self.buf[pos:eol]).split(b";")[0], 16)
            start = eol + 2
            if size == 0:
                end = self.buf.find(b"\r\n\r\n", start - 2)  # no trailers expected: "0\r\n\r\n"
                if end < 0:
                    return None
                del self.buf[:end + 4]
                return b"".join(pieces)
            if len(self.buf) < start + size + 2:
                return None
            pieces.append(bytes(self.buf[start:start + size]))
            pos = start + size + 2

    def _answer(self, method: bytes, path: bytes, body: bytes, close: bool) -> None:
        if method != b"POST":
            self._reply(NOT_FOUND, close)
            return
        m = MODE_RE.search(body, 0, HEAD_SCAN) or MODE_RE.search(body)
        mode = m.group(1) if m else b"small"
        reply = self.responses.get(mode, self.responses[b"small"])
        if mode == b"slow":
            self.busy = True
            asyncio.get_running_loop().call_later(SLOW_S, self._slow_done, reply, close)
        else:
            self._reply(reply, close)

    def _slow_done(self, reply: bytes, close: bool) -> None:
        self.busy = False
        self._reply(reply, close)
        if self.buf and self.transport is not None:
            self._parse()

    def _reply(self, reply: bytes, close: bool) -> None:
        if self.transport is None:
            return
        if close:
            reply = reply.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n", 1)
        self.transport.write(reply)
        if close:
            self.transport.close()
            self.transport = None


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def use_uvloop() -> None:
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


async def serve(host: str, port: int) -> None:
    started = time.perf_counter()
    Upstream.responses = build_responses()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Upstream, host, port, backlog=8192, reuse_address=True)
    bound = server.sockets[0].getsockname()[1]
    print(f"upstream listening on http://{host}:{bound} (ready in {time.perf_counter() - started:.1f} s)", flush=True)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    args = p.parse_args(argv)
    raise_nofile()
    use_uvloop()
    try:
        asyncio.run(serve(args.host, args.port))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
