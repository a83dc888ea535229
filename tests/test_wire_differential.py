"""Differential tests of the wire: swapper's readers against aiohttp's own parsers, on generated
and mutated messages (control bytes, folding, conflicting framing, odd chunk sizes, bare CR and
LF, huge heads).

Requests: the front door reads a head the way ``codec.RequestReader.read_head`` does and then
either serves the request, refuses it (400), or leaves it to aiohttp (an upgrade, HTTP/1.0, a
chunked upload: aiohttp then parses it itself). Whatever the front door serves, aiohttp's parser
must accept too, seeing the same method, target, headers and body; whatever the front door
refuses, aiohttp's parser must refuse; and what aiohttp refuses, the front door never serves.

Responses: h1pool reads a child's answer with ``codec.ResponseReader``; aiohttp's client parser,
in the strict mode it uses in development, reads the same bytes. What swapper accepts, aiohttp
accepts with the same status, headers and body, except a Content-Length beside a chunked
Transfer-Encoding, which swapper reads as chunked (RFC 9112 §6.3) and aiohttp refuses. What
aiohttp accepts, swapper accepts, except (stricter on purpose, as llhttp) a head with a bare CR
or LF, a control byte or a malformed status line, and a 204 or 304 with a Content-Length that
llhttp cannot read, which aiohttp ignores.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, field
from typing import Any
from unittest import mock

from aiohttp import http_exceptions
from aiohttp.http_parser import HttpRequestParser, HttpResponseParserPy
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from swapper.wire.codec import BadMessage, RequestReader, ResponseReader

# ---- generating messages ----

TOKEN = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
NAMES = st.text(alphabet=TOKEN, min_size=1, max_size=10).filter(
    lambda n: (
        n.lower() not in {"host", "content-length", "transfer-encoding", "connection", "upgrade", "expect"}
    )
)
ODD = [b"\x00", b"\x01", b"\x7f", b"\x80", b"\xff", b"\t", b" ", b"\r", b"\n", b"\x0b", b":"]
PLAIN_VALUES = st.lists(st.sampled_from([b"a", b"b", b"1", b"=", b"/", b" ", b"\t", b"\xc3\xa9"]), max_size=8)
ODD_VALUES = st.lists(st.sampled_from([b"a", b"1", *ODD]), min_size=1, max_size=8)
VALUES = st.sampled_from([PLAIN_VALUES] * 7 + [ODD_VALUES]).flatmap(lambda values: values).map(b"".join)
ODD_LENGTHS = ["05", "+5", " 5", "5 ", "0x5", "5.0", "-5", "²", "", "99999999999999999999"]
CODINGS = st.sampled_from(["chunked", "gzip, chunked", "chunked, gzip", "identity", "Chunked", "chunked "])
GOOD_TARGETS = [b"/v1/chat/completions", b"/a?b=c&d", b"/a%00b", b"/health", b"//x"]
ODD_TARGETS = [
    b"http://h.example:8080/v1/x?y=1",
    b"HTTP://h/x",
    b"http://h",
    b"https://h/x",
    b"ftp://h/x",
    b"*",
    b"h.example:443",
    b"/a\x00b",
    b"/a\x7fb",
    b"/a\xffb",
    b"/a\tb",
    b"x",
    b"/" + b"a" * 8200,
]
ODD_METHODS = [b"PUT", b"HEAD", b"OPTIONS", b"DELETE", b"get", b"FOO", b"CONNECT"]
ODD_VERSIONS = [b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.2", b"HTTP/1.1 ", b"http/1.1"]
CHUNK_SIZES = st.sampled_from([b"5", b"05", b"0x5", b"1_0", b"-0", b" 5", b"5 ", b"5;x=y", b"+5", b"A", b"a"])


def chance(draw: st.DrawFn, n: int) -> bool:
    """True about one time in ``n`` (and False when shrinking)."""
    return draw(st.sampled_from([False] * (n - 1) + [True]))


def rarely(draw: st.DrawFn, common: list[bytes], odd: list[bytes]) -> bytes:
    """Mostly one of ``common``, one time in four one of ``odd``."""
    return draw(st.sampled_from(odd if chance(draw, 4) else common))


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    """Mostly well-formed requests, each with a chance of one or two things wrong or odd."""
    method = rarely(draw, [b"POST", b"GET"], ODD_METHODS)
    target = rarely(draw, GOOD_TARGETS, ODD_TARGETS)
    version = rarely(draw, [b"HTTP/1.1"], ODD_VERSIONS)
    fields: list[tuple[bytes, bytes]] = []
    hosts = 1 if not chance(draw, 4) else draw(st.sampled_from([0, 2]))
    fields += [(b"Host", b"h.example")] * hosts
    fields += [(n.encode(), v) for n, v in draw(st.lists(st.tuples(NAMES, VALUES), max_size=6))]
    body = draw(st.binary(max_size=12))
    chunked = chance(draw, 6)
    if not chunked:
        lengths = [str(len(body))] if not chance(draw, 6) else []
        if chance(draw, 5):
            lengths.append(draw(st.sampled_from(ODD_LENGTHS + [str(len(body))])))
        fields += [(b"Content-Length", v.encode()) for v in lengths]
    else:
        fields.append((b"Transfer-Encoding", draw(CODINGS).encode()))
        if chance(draw, 4):
            fields.append((b"Content-Length", b"5"))
    for name in ("Connection", "Expect", "Upgrade"):
        if chance(draw, 6):
            fields.append(
                (name.encode(), draw(st.sampled_from([b"close", b"keep-alive", b"upgrade", b"100-continue"])))
            )
    if chance(draw, 21):
        fields += [(b"X-Many", b"1")] * draw(st.integers(120, 135))
    if chance(draw, 21):
        fields.append((b"X-Big", b"a" * draw(st.integers(8180, 8200))))
    fields = draw(st.permutations(fields))
    lines = [method + b" " + target + b" " + version] + [name + b": " + value for name, value in fields]
    # Mutations of the line structure: a bare LF or CR, an obs-fold, a blank before a colon.
    seps = [b"\r\n"] * len(lines)
    for _ in range(draw(st.sampled_from([1, 2])) if chance(draw, 4) else 0):
        at = draw(st.integers(0, len(lines) - 1))
        mutation = draw(st.sampled_from(["lf", "cr", "fold", "space"]))
        if mutation == "lf":
            seps[at] = b"\n"
        elif mutation == "cr":
            seps[at] = b"\r"
        elif mutation == "fold":
            lines.insert(at + 1, b" folded")
            seps.insert(at + 1, b"\r\n")
        elif at > 0:
            lines[at] = lines[at].replace(b":", b" :", 1)
    head = b"".join(line + sep for line, sep in zip(lines, seps, strict=True)) + b"\r\n"
    if chance(draw, 10):
        head = b"\r\n" + head  # a blank line before the request
    if chunked:
        size = draw(CHUNK_SIZES)
        payload = b"hello" if size in (b"5", b"05", b" 5", b"5 ", b"5;x=y", b"+5") else b"0123456789"
        return head + size + b"\r\n" + payload + b"\r\n0\r\n\r\n"
    return head + body


# ---- the two views ----


@dataclass(frozen=True)
class Seen:
    method: bytes
    target: bytes
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes
    size: int = field(default=0, compare=False)  # bytes of the message


REFUSED = "refused"
DEFERRED = "deferred to aiohttp"
INCOMPLETE = "incomplete"


def front_door(data: bytes) -> Seen | str:
    """What the front door makes of ``data``: the request it serves, or why it does not."""
    reader, buf = RequestReader(), bytearray(data)
    try:
        head = reader.read_head(buf)
        if head is None:
            return INCOMPLETE
        if head.for_aiohttp:
            return DEFERRED
        length = max(head.length, 0)
        body = bytes(buf[reader.fed : reader.fed + length])
        if len(body) < length:
            return INCOMPLETE
        reader.feed(body)
    except BadMessage:
        return REFUSED
    assert reader.complete
    return Seen(
        head.method.encode(),
        head.target.encode("utf-8", "surrogateescape"),
        tuple(head.headers),
        body,
        len(data) - len(buf) + reader.fed + length,
    )


def _parser(cls: Any) -> Any:
    loop = asyncio.new_event_loop()
    loop.close()  # the parser only keeps it
    protocol = mock.Mock()
    # As aiohttp's server (web_protocol.RequestHandler) and client make theirs.
    extra = {"read_until_eof": True} if issubclass(cls, HttpResponseParserPy) else {}
    return cls(protocol, loop, 2**16, max_line_size=8190, max_field_size=8190, max_headers=128, **extra)


def aiohttp_server(data: bytes) -> Seen | str:
    parser = _parser(HttpRequestParser)
    try:
        messages, upgraded, _ = parser.feed_data(data)
    except http_exceptions.HttpProcessingError:
        return REFUSED
    if not messages:
        return INCOMPLETE
    message, payload = messages[0]
    if not payload.is_eof():
        return INCOMPLETE  # its body is still due
    body = b"".join(getattr(payload, "_buffer", ()))
    target = message.url.raw_path_qs if message.url.absolute else message.path
    if isinstance(target, str):
        target = target.encode("utf-8", "surrogateescape")
    return Seen(message.method.encode(), target, tuple(message.raw_headers), body)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests())
@example(b"POST /v1/chat/completions HTTP/1.1\r\nHost: h\r\nX-A: a\x00b\r\nContent-Length: 0\r\n\r\n")
@example(b"POST http://h:1/v1/chat/completions?x=1 HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\n{}")
@example(b"GET /health HTTP/1.1\r\n\r\n")
@example(b"GET /health HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")
@example(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: \xc2\xb2\r\n\r\n")
def test_the_front_door_and_aiohttp_agree_on_requests(data: bytes) -> None:
    ours = front_door(data)
    # What follows a request the front door read is the next request: only the first counts.
    theirs = aiohttp_server(data[: ours.size] if isinstance(ours, Seen) else data)
    if isinstance(ours, Seen):
        assert theirs == ours  # served here: aiohttp would have seen exactly the same request
    elif ours == REFUSED:
        assert theirs == REFUSED
    elif ours == INCOMPLETE:
        assert not isinstance(theirs, Seen)
    if theirs == REFUSED:
        assert ours in (REFUSED, DEFERRED)


# ---- responses ----


@st.composite
def responses(draw: st.DrawFn) -> bytes:
    version = rarely(draw, [b"HTTP/1.1", b"HTTP/1.0"], [b"HTTP/2.0", b"http/1.1", b"HTTP/1.1 "])
    status = rarely(draw, [b"200", b"201", b"204", b"304", b"404"], [b"20", b"2000", b"099", b"600"])
    reason = rarely(draw, [b" OK", b" ", b"", b" Tr\xe8s bien"], [b" O\x00K", b" O\nX: 1", b" O\rK"])
    fields = [(n.encode(), v) for n, v in draw(st.lists(st.tuples(NAMES, VALUES), max_size=5))]
    body = draw(st.binary(max_size=12))
    framing = draw(st.sampled_from(["length", "chunked", "close"] * 2 + ["odd-length", "odd-chunk"]))
    if framing == "length":
        fields.append((b"Content-Length", str(len(body)).encode()))
    elif framing == "odd-length":
        lengths = draw(st.lists(st.sampled_from([*ODD_LENGTHS, "5"]), min_size=1, max_size=2))
        fields += [(b"Content-Length", v.encode()) for v in lengths]
    elif framing in ("chunked", "odd-chunk"):
        fields.append((b"Transfer-Encoding", b"chunked"))
    if chance(draw, 11):
        # Away from the limit: aiohttp's response parser counts the status line as a header.
        fields += [(b"X-Many", b"1")] * draw(st.sampled_from([100, 140]))
    lines = [version + b" " + status + reason] + [
        name + b": " + value for name, value in draw(st.permutations(fields))
    ]
    head = b"\r\n".join(lines) + b"\r\n\r\n"
    if status in (b"204", b"304"):
        return head  # no body, whatever the head says; what follows would be the next answer
    if framing == "chunked":
        return head + (b"%x\r\n%s\r\n" % (len(body), body) if body else b"") + b"0\r\n\r\n"
    if framing == "odd-chunk":
        return head + draw(CHUNK_SIZES) + b"\r\nhello\r\n0\r\n\r\n"
    return head + body


@dataclass(frozen=True)
class Answer:
    status: int
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes


def h1pool_view(data: bytes) -> Answer | str:
    """The answer h1pool delivers when the connection ends after ``data``; REFUSED for one it
    fails (a refused or cut short answer). Bytes after a complete answer only cost the
    connection its reuse."""
    body: list[bytes] = []
    reader = ResponseReader(lambda: None, body, lambda: None)
    try:
        reader.feed(data)
    except BadMessage:
        if not reader.ended:
            return REFUSED
    if not reader.ended and not reader.eof():
        return REFUSED
    return Answer(reader.status, tuple(reader.headers), b"".join(body))


class StrictResponseParser(HttpResponseParserPy):
    """aiohttp's response parser as it runs in development mode: strict, where its default
    tolerates a bare LF, control bytes in values and blanks after a chunk size from a broken
    server. swapper is strict with its children whatever the mode."""

    lax = False


def aiohttp_client_view(data: bytes) -> Answer | str:
    """aiohttp's reading of the first response in ``data``. Fed a byte at a time, so that bytes
    after a complete response (the start of a next one, to aiohttp) can't refuse the first."""
    parser = _parser(StrictResponseParser)
    messages: list[Any] = []
    try:
        for i in range(len(data)):
            got, _, _ = parser.feed_data(data[i : i + 1], b"\r\n")  # its strict mode's separator
            messages += got
            if messages and messages[0][1].is_eof():
                break
        else:
            parser.feed_eof()
    except http_exceptions.HttpProcessingError:
        if not (messages and messages[0][1].is_eof()):
            return REFUSED
    if not messages:
        return REFUSED  # the connection ended before a whole head
    message, payload = messages[0]
    if payload.exception() is not None:
        return REFUSED
    return Answer(message.code, tuple(message.raw_headers), b"".join(getattr(payload, "_buffer", ())))


def both_framings(data: bytes) -> bool:
    head = data.partition(b"\r\n\r\n")[0].lower()
    return b"\ncontent-length:" in head and b"\ntransfer-encoding:" in head


def stricter_on_purpose(data: bytes) -> bool:
    """A head with a bare CR or LF, a control byte, or a status line that is not ``HTTP/x.y``,
    one blank and three digits: aiohttp's parsers read some of these (a bare LF in the status line
    even becomes a header); swapper refuses them all, as llhttp does."""
    head = data.partition(b"\r\n\r\n")[0]
    lines = head.split(b"\r\n")
    if not re.fullmatch(rb"HTTP/\d\.\d \d{3}(?: .*)?", lines[0], re.DOTALL):
        return True
    return any(b < 0x20 and b != 0x09 or b == 0x7F for line in lines for b in line)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(responses())
@example(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
@example(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end")
@example(b"HTTP/1.1 200 OK\nX-Injected: 1\r\nContent-Length: 0\r\n\r\n")
def test_h1pool_and_aiohttp_agree_on_responses(data: bytes) -> None:
    ours, theirs = h1pool_view(data), aiohttp_client_view(data)
    if isinstance(ours, Answer):
        if both_framings(data):
            assert ours.body == b"hello" or ours == theirs  # on purpose: the chunking wins
        else:
            assert ours == theirs  # accepted here: aiohttp reads exactly the same answer
    elif isinstance(theirs, Answer) and theirs.status in (204, 304):
        # aiohttp ignores the Content-Length of an answer without a body; llhttp refuses one
        # it cannot read (an overflow, a bad digit).
        assert stricter_on_purpose(data) or any(n.lower() == b"content-length" for n, _ in theirs.headers)
    elif theirs != REFUSED:
        assert stricter_on_purpose(data), theirs  # stricter than aiohttp only there
