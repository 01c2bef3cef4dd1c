"""A corpus of malformed requests, sent over raw sockets to a real gateway process.

Whatever a client sends, the gateway answers (where an answer can come) in the provider's JSON
error shape, never with a 5xx, never hangs, and writes no traceback and no byte of a key to its
log. The process's log is also scanned for keys by tests/fixtures/logscan.py.
"""
from __future__ import annotations

import asyncio
import base64
import json
import logging
from dataclasses import dataclass

import aiohttp
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.observability.accesslog import ACCESS_LOGGER
from tests.fixtures.gateway import gateway_config, stop_gateway, team_key

MODEL = "google/gemini-3-pro-image-preview"
KEY = team_key("alpha")
READ_TIMEOUT_S = 1  # short, so that the stalled cases end quickly
NO_HANG_S = 20  # a guard: a case still open this long is a hang (the test fails, it does not wait)


@dataclass(frozen=True)
class Case:
    name: str
    pieces: tuple[bytes, ...]  # sent in this order, each in its own write
    then: str = "read"  # read: read the answer to the end; stall: send nothing more, read; half: shut our side


def request(method: bytes = b"POST", path: bytes = b"/v1/chat/completions", *, headers: dict[bytes, bytes] | None = None,
            body: bytes = b"", auth: bytes = b"Bearer " + KEY.encode(), length: bool = True) -> bytes:
    head = {b"Host": b"gw", b"Connection": b"close", b"Content-Type": b"application/json", b"Authorization": auth}
    head.update(headers or {})
    if length and body and b"Transfer-Encoding" not in head:
        head[b"Content-Length"] = str(len(body)).encode()
    lines = [method + b" " + path + b" HTTP/1.1", *[k + b": " + v for k, v in head.items() if v is not None]]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def chat(**fields) -> bytes:
    return json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "a lighthouse"}], **fields}).encode()


def image_part(url: str) -> bytes:
    return orjson.dumps({"model": MODEL, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "this"}, {"type": "image_url", "image_url": {"url": url}}]}]})


def case(name: str, *pieces: bytes, then: str = "read") -> Case:
    return Case(name, pieces, then)


GOOD = chat()
CORPUS = [
    # -- the request line
    case("garbage line", b"GARBAGE\r\n\r\n"),
    case("tls hello", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(32)) + b"\r\n\r\n"),
    case("bad version", b"GET /v1/models HTTP/9.9\r\nHost: gw\r\n\r\n"),
    case("space in path", b"GET /v1/mo dels HTTP/1.1\r\nHost: gw\r\n\r\n"),
    case("non-utf8 path", request(b"GET", b"/v1/\xff\xfe", body=b"")),
    case("control byte in path", b"GET /v1/\x01models HTTP/1.1\r\nHost: gw\r\n\r\n"),
    case("request line too long", b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\nHost: gw\r\n\r\n"),
    case("absolute url", request(b"GET", b"http://other.example/v1/models")),
    case("unknown method", request(b"BREW", b"/v1/models")),
    case("LF only", b"GET /v1/models HTTP/1.1\nHost: gw\nConnection: close\n\n"),
    # -- headers
    case("key with DEL", request(b"GET", b"/v1/models", auth=b"Bearer " + KEY.encode() + b"\x7f")),
    case("key with NUL", request(b"GET", b"/v1/models", auth=b"Bearer " + KEY.encode() + b"\x00")),
    case("key non-utf8", request(b"GET", b"/v1/models", auth=b"Bearer \xff\xfe" + KEY.encode())),
    case("key non-utf8 on chat", request(body=GOOD, auth=b"Bearer " + KEY.encode() + b"\xc3")),
    case("key non-utf8 on usage", request(b"GET", b"/v1/usage", auth=b"Bearer \xe9t\xe9")),
    case("key non-utf8 on admin", request(b"GET", b"/admin/usage", auth=b"Bearer \x80\x81")),
    case("key latin-1 scheme", request(b"GET", b"/v1/models", auth=b"B\xe9arer " + KEY.encode())),
    case("key in an oversized header", request(b"GET", b"/v1/models", auth=b"Bearer " + KEY.encode() + b"a" * 20000)),
    case("header control byte", request(b"GET", b"/v1/models", headers={b"X-A": b"a\x01b"})),
    case("header name with space", request(b"GET", b"/v1/models", headers={b"X A": b"b"})),
    case("header without colon", b"GET /v1/models HTTP/1.1\r\nHost: gw\r\nAuthorization Bearer " + KEY.encode() + b"\r\n\r\n"),
    case("too many headers", request(b"GET", b"/v1/models", headers={b"X-%d" % i: b"v" for i in range(300)})),
    case("non-utf8 request id", request(b"GET", b"/v1/models", headers={b"X-Request-ID": b"\xff\xfe"})),
    case("non-utf8 cache-control", request(body=GOOD, headers={b"Cache-Control": b"no-\xffcache"})),
    case("non-utf8 content-type", request(body=GOOD, headers={b"Content-Type": b"application/\xffjson"})),
    case("obs-fold", b"GET /v1/models HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer\r\n " + KEY.encode() + b"\r\n\r\n"),
    # -- framing
    case("negative length", request(body=GOOD, headers={b"Content-Length": b"-1"}, length=False)),
    case("non-numeric length", request(body=GOOD, headers={b"Content-Length": b"12a"}, length=False)),
    case("two lengths", request(body=GOOD, headers={b"Content-Length": b"5, 6"}, length=False)),
    case("length and chunked", request(body=b"5\r\nhello\r\n0\r\n\r\n",
                                       headers={b"Transfer-Encoding": b"chunked", b"Content-Length": b"5"}, length=False)),
    case("bad chunk size", request(body=b"zz\r\nabc\r\n0\r\n\r\n", headers={b"Transfer-Encoding": b"chunked"})),
    case("bad chunk size later", request(body=b"2\r\n{}\r\n", headers={b"Transfer-Encoding": b"chunked"}),
         b"zz\r\nabc\r\n0\r\n\r\n"),
    case("chunk longer than said", request(body=b"2\r\nabcdef\r\n0\r\n\r\n", headers={b"Transfer-Encoding": b"chunked"})),
    case("unknown transfer coding", request(body=GOOD, headers={b"Transfer-Encoding": b"gzip, chunked2"}, length=False)),
    case("gzip that is not", request(body=b"not gzip at all", headers={b"Content-Encoding": b"gzip"})),
    case("huge length", request(body=b"{}", headers={b"Content-Length": b"99999999999999999999"}, length=False)),
    case("length over the limit", request(body=b"{}", headers={b"Content-Length": str(200 * 1024 * 1024).encode()},
                                          length=False)),
    case("truncated body, client done", request(body=GOOD, headers={b"Content-Length": b"1000"}, length=False),
         then="half"),
    case("truncated chunked, client done", request(body=b"10\r\n{\"mod", headers={b"Transfer-Encoding": b"chunked"}),
         then="half"),
    # -- stalls (closed after READ_TIMEOUT_S)
    case("half a head, then nothing", b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nAuthor", then="stall"),
    case("half a body, then nothing", request(body=GOOD[:20], headers={b"Content-Length": str(len(GOOD)).encode()},
                                              length=False), then="stall"),
    case("head only, then nothing", request(body=b"", headers={b"Content-Length": b"100"}), then="stall"),
    case("half a chunked body, then nothing", request(body=b"5\r\n{\"mod", headers={b"Transfer-Encoding": b"chunked"}),
         then="stall"),
    # -- the body: what validation refuses
    case("wrong content-type", request(body=GOOD, headers={b"Content-Type": b"text/plain"})),
    case("empty content-type", request(body=GOOD, headers={b"Content-Type": b""})),
    case("no body", request(body=b"")),
    case("bad json", request(body=b"{\"model\": ")),
    case("json not an object", request(body=b"[1, 2, 3]")),
    case("json null", request(body=b"null")),
    case("non-utf8 json", request(body=b"{\"model\": \"\xff\xfe\"}")),
    case("bom", request(body=b"\xef\xbb\xbf" + GOOD)),
    case("NaN", request(body=chat().replace(b"}", b", \"temperature\": NaN}", 1))),
    case("deep nesting", request(body=b"[" * 5000 + b"]" * 5000)),
    case("model a number", request(body=chat(model=5))),
    case("unknown model", request(body=chat(model="nope/\u00e9"))),
    case("messages a number", request(body=orjson.dumps({"model": MODEL, "messages": 5}))),
    case("messages empty", request(body=orjson.dumps({"model": MODEL, "messages": []}))),
    case("content a dict", request(body=orjson.dumps({"model": MODEL, "messages": [{"role": "user", "content": {}}]}))),
    case("role a list", request(body=orjson.dumps({"model": MODEL, "messages": [{"role": [], "content": "x"}]}))),
    case("stream a string", request(body=chat(stream="yes"))),
    case("huge max_tokens", request(body=chat(max_tokens=10**17))),
    case("huge max_completion_tokens", request(body=chat(max_completion_tokens=10**30))),
    case("integer over 64 bits", request(body=chat().replace(b"}", b", \"max_tokens\": 1" + b"0" * 400 + b"}", 1))),
    case("float max_tokens", request(body=chat(max_tokens=1.5))),
    case("negative max_tokens", request(body=chat(max_tokens=-1))),
    case("bool max_tokens", request(body=chat(max_tokens=True))),
    case("huge temperature", request(body=chat().replace(b"}", b", \"temperature\": 1e999}", 1))),
    case("bad base64", request(body=image_part("data:image/png;base64,@@@not base64@@@"))),
    case("base64 of not an image", request(body=image_part("data:image/png;base64," + base64.b64encode(b"hello").decode()))),
    case("data url without base64", request(body=image_part("data:image/png,rawbytes"))),
    case("image url a number", request(body=orjson.dumps({"model": MODEL, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": 5}}]}]}))),
    case("surrogate escape in json", request(body=b"{\"model\": \"\\ud800\", \"messages\": []}")),
    case("control chars in json string", request(body=b"{\"model\": \"a\x01b\", \"messages\": []}")),
    # -- routes and keys, to be sure the well-formed neighbours stay clean
    case("no key", request(b"GET", b"/v1/models", auth=None)),
    case("wrong key", request(b"GET", b"/v1/models", auth=b"Bearer key-nobody")),
    case("wrong method", request(b"DELETE", b"/v1/models")),
    case("no route", request(b"GET", b"/nowhere/\xc3\xa9")),
]


@dataclass
class Answer:
    raw: bytes

    @property
    def status(self) -> int:
        return int(self.raw.split(b" ", 2)[1])

    def headers(self) -> dict[str, str]:
        head = self.raw.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")[1:]
        return {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in head)}

    def body(self) -> bytes:
        body = self.raw.split(b"\r\n\r\n", 1)[1]
        if self.headers().get("transfer-encoding") == "chunked":
            out = b""
            while body:
                size, _, rest = body.partition(b"\r\n")
                n = int(size, 16)
                out, body = out + rest[:n], rest[n + 2:]
                if n == 0:
                    break
            return out
        return body


def complete(raw: bytes) -> bool:
    """Whether ``raw`` holds a whole response (a client need not wait for aiohttp's lingering
    close after an early answer such as 413)."""
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep:
        return False
    headers = Answer(raw).headers()
    if "content-length" in headers:
        return len(body) >= int(headers["content-length"])
    return headers.get("transfer-encoding") == "chunked" and body.endswith(b"0\r\n\r\n")


async def read_answer(reader: asyncio.StreamReader) -> bytes:
    raw = b""
    while not complete(raw) and (data := await reader.read(65536)):
        raw += data
    return raw


async def send(port: int, c: Case) -> Answer | None:
    """The whole answer, or None when the gateway closed without one."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for piece in c.pieces:
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(0)
        if c.then == "half":
            writer.write_eof()
        try:
            raw = await asyncio.wait_for(read_answer(reader), NO_HANG_S)
        except ConnectionResetError:
            raw = b""
        except TimeoutError:
            raise AssertionError(f"{c.name}: no answer and no close after {NO_HANG_S} s") from None
        return Answer(raw) if raw else None
    finally:
        writer.close()


@pytest.fixture
def gateway(gateway_processes, simulator):
    config = gateway_config(simulator.url, simulator.api_key, server={"read_timeout_s": READ_TIMEOUT_S},
                            logging={"level": "info", "format": "json"})
    return gateway_processes(config)


async def test_the_malformed_corpus_gets_json_errors_no_5xx_and_no_traceback(gateway, tmp_path):
    port = int(gateway.url.rsplit(":", 1)[1])
    answers = await asyncio.gather(*(send(port, c) for c in CORPUS))
    problems = []
    for c, answer in zip(CORPUS, answers):
        if answer is None:
            if c.then == "read":  # a client that stalled or stopped sending may just be cut off
                problems.append(f"{c.name}: closed without an answer")
            continue
        if answer.status >= 500:
            problems.append(f"{c.name}: {answer.raw[:300]!r}")
            continue
        if answer.headers().get("content-type", "").split(";")[0] != "application/json":
            problems.append(f"{c.name}: not JSON: {answer.raw[:300]!r}")
            continue
        if answer.status >= 400:
            error = json.loads(answer.body())["error"]
            if set(error) != {"message", "type", "code", "param"} or KEY in error["message"]:
                problems.append(f"{c.name}: not the provider's error shape: {error}")
    assert not problems, "\n".join(problems)
    stop_gateway(gateway)  # every line written, those of connections still draining included
    log = (tmp_path / "gw0.log").read_text(errors="replace")
    assert "Traceback" not in log
    assert "key-" not in log  # no key, not even the start of one
    assert all(json.loads(line)["level"] != "error" for line in log.splitlines() if '"level"' in line)


async def test_a_malformed_request_gets_one_access_line_and_is_counted(start_gateway, caplog, monkeypatch):
    monkeypatch.setattr(logging.getLogger(ACCESS_LOGGER), "propagate", True)  # to caplog
    caplog.set_level(logging.INFO)
    gw = await start_gateway()
    port = int(gw.url.rsplit(":", 1)[1])
    answer = await send(port, case("key with DEL", request(b"GET", b"/v1/models", auth=b"Bearer " + KEY.encode() + b"\x7f")))
    assert answer is not None and answer.status == 400
    lines = [r.access for r in caplog.records if r.name == ACCESS_LOGGER]
    assert [(line["request_id"], line["status"], line["team"], line["bytes_out"]) for line in lines] == [
        (answer.headers()["x-request-id"], 400, None, len(answer.body()))]
    assert "key-" not in caplog.text
    async with aiohttp.ClientSession() as http, http.get(gw.url + "/metrics") as resp:
        scrape = await resp.text()
    counted = {(s.labels["team"], s.labels["model"], s.labels["status"]): s.value
               for family in text_string_to_metric_families(scrape) for s in family.samples
               if s.name == "gateway_requests_total" and s.value}
    assert counted == {("none", "other", "400"): 1}
