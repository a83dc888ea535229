"""HTTP/1.1 on the wire: llhttp reads it, this module writes it.

Every request head a client sends and every response a child sends is parsed by llhttp, through
MagicStack's ``httptools`` bindings (the parser aiohttp and uvicorn are built on): whatever llhttp
refuses, swapper refuses. On top of llhttp this module adds aiohttp's limits (``MAX_HEADERS``
fields, ``MAX_FIELD`` bytes in a target, a header name or a header value) and aiohttp's rules for
requests (exactly one ``Host`` on HTTP/1.1; origin-form or absolute-form targets), so that the
front door accepts exactly the requests aiohttp's server would (tests/test_wire_differential.py).

Owns: nothing shared. A ``RequestReader`` belongs to one front-door connection and a
``ResponseReader`` to one upstream connection; each holds its parser and the message being read.

Framing: a ``RequestReader`` is fed one head at a time (the bytes up to and including the blank
line; the front door finds it with a substring search, the only framing it does itself) and then,
for a request the front door serves, that request's Content-Length body; so llhttp never reads
past a message the front door may still hand, byte for byte, to aiohttp. A ``ResponseReader`` is
fed whatever arrives and reports the body as llhttp de-chunks it; a body that llhttp delimits by
the connection's end is completed by ``ResponseReader.eof``.

Writing: ``request_head`` and ``response_head`` build heads from header pairs as they were
received (bytes), so nothing is decoded and re-encoded on the way through. Hop-by-hop headers
(RFC 9110 §7.6.1: the fixed list ``HOP_BY_HOP`` and whatever ``Connection`` names) are dropped
by ``kept_fields`` (``forwardable``: the same as header lines), the one filter every forwarding
path uses, both ways: the front door's, aiohttp's relay and the peers' client.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Final

import httptools

__all__ = [
    "CHUNK_END",
    "PLAIN_CONNECTION",
    "MAX_FIELD",
    "MAX_HEADERS",
    "BadMessage",
    "RequestHead",
    "RequestReader",
    "ResponseReader",
    "chunk",
    "connection_of",
    "forwardable",
    "kept_fields",
    "request_head",
    "response_head",
]

MAX_HEADERS: Final = 128  # header fields in one head (aiohttp's default)
MAX_FIELD: Final = 8190  # bytes in a request target, a header name or a header value (aiohttp's)
MAX_LINE: Final = 2 * MAX_FIELD + 16  # a longer head line (name, colon, value) breaks a limit for sure
MAX_RESPONSE_HEAD: Final = 64 * 1024  # bytes in a child's response head
CHUNK_END: Final = b"0\r\n\r\n"

# Hop-by-hop headers (RFC 9110 §7.6.1), lower case: never forwarded in either direction.
HOP_BY_HOP: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authentication-info",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
# What a proxied request never carries on: hop-by-hop headers; Host (written from the upstream
# URL); Content-Length (written from the body as sent); Expect (answered by swapper itself).
REQUEST_DROP: Final = HOP_BY_HOP | {b"host", b"content-length", b"expect"}
# What a response re-framed as chunked drops besides the hop-by-hop headers.
RECHUNKED_DROP: Final = HOP_BY_HOP | {b"content-length"}
# Connection values that name no other header.
PLAIN_CONNECTION: Final = frozenset({b"keep-alive", b"close", b"Keep-Alive", b"Close", b""})


class BadMessage(Exception):
    """A message llhttp or swapper's limits refuse; for a request the answer is a 400."""


def connection_of(headers: Iterable[tuple[bytes, bytes]]) -> bytes:
    """Every Connection value of ``headers``, comma-joined (what ``kept_fields`` takes)."""
    return b", ".join([value for name, value in headers if name.lower() == b"connection"])


def kept_fields(
    headers: Iterable[tuple[bytes, bytes]], connection: bytes, drop: frozenset[bytes] = HOP_BY_HOP
) -> list[tuple[bytes, bytes]]:
    """``headers`` minus ``drop`` (lower-case names) and the names listed in ``connection`` (the
    message's Connection values, comma-joined): what a proxy passes on."""
    if connection not in PLAIN_CONNECTION:
        drop = drop | {name.strip().lower() for name in connection.split(b",")}
    return [(name, value) for name, value in headers if name.lower() not in drop]


def forwardable(
    headers: Iterable[tuple[bytes, bytes]], connection: bytes, drop: frozenset[bytes] = HOP_BY_HOP
) -> bytes:
    """``kept_fields`` as header lines, each ending in CRLF."""
    return b"".join([b"%s: %s\r\n" % field for field in kept_fields(headers, connection, drop)])


def request_head(method: str, target: str, host: str, lines: bytes, body: int | None) -> bytes:
    """A request head: ``lines`` are header lines (see ``forwardable``); ``body`` the length
    for a Content-Length line (None: no such line)."""
    length = b"" if body is None else b"Content-Length: %d\r\n" % body
    return b"%s %s HTTP/1.1\r\nHost: %s\r\n%s%s\r\n" % (
        method.encode(),
        target.encode("utf-8", "surrogateescape"),
        host.encode(),
        lines,
        length,
    )


def response_head(status: int, reason: bytes, lines: bytes) -> bytes:
    """A response head: the status line, ``lines`` (each ending in CRLF) and the blank line."""
    return b"HTTP/1.1 %d %s\r\n%s\r\n" % (status, reason, lines)


def chunk(data: bytes) -> bytes:
    """``data`` as one chunk of the chunked transfer coding."""
    return b"%x\r\n%b\r\n" % (len(data), data)


# ---- requests ----


class RequestHead:
    """A request head llhttp accepted, and the facts the front door decides on.

    ``target`` is the path and query as sent (an absolute-form target reduced to them);
    ``headers`` are the fields as received, values without trailing blanks; ``forward`` is them as
    header lines minus what a proxy drops (``REQUEST_DROP``), built in the head's one pass;
    ``forwarded()`` also drops the names ``connection`` lists.
    """

    # Defaults on the class: a head sets only what it has (one per request, built in one pass).
    method = ""
    target = ""
    path = ""
    query = ""
    forward = b""
    http11 = True
    keep_alive = True
    upgrade = False  # an Upgrade or CONNECT: aiohttp's business
    # A header line over MAX_FIELD bytes: where aiohttp's own line limits apply (they differ by a
    # few bytes with the line's place in the head), aiohttp judges.
    long_line = False
    length = -1  # Content-Length, -1 if none
    te = False  # a Transfer-Encoding (llhttp accepts it only as chunked)
    content_type: str | None = None  # the first Content-Type
    connection = b""  # every Connection value, comma-joined
    expect: bytes | None = None  # the Expect value, lower case
    authorization: bytes | None = None
    api_key: bytes | None = None  # x-api-key
    origin: bytes | None = None

    def __init__(self, headers: list[tuple[bytes, bytes]]) -> None:
        self.headers = headers

    def forwarded(self) -> bytes:
        """The header lines this request goes upstream with (``forward``, unless its Connection
        names more hop-by-hop headers: RFC 9110 §7.6.1)."""
        if self.connection in PLAIN_CONNECTION:
            return self.forward
        return forwardable(self.headers, self.connection, REQUEST_DROP)

    @property
    def for_aiohttp(self) -> bool:
        """Whether only aiohttp's server may answer it: an upgrade, HTTP/1.0, a chunked body, an
        expectation other than 100-continue (417), a line near aiohttp's line limits."""
        return (
            self.upgrade
            or not self.http11
            or self.te
            or self.long_line
            or self.expect not in (None, b"100-continue")
        )


# Headers whose values the readers look at, by lower-case name.
_CONTENT_LENGTH, _CONTENT_TYPE, _CONNECTION, _EXPECT, _HOST, _TE = (
    b"content-length",
    b"content-type",
    b"connection",
    b"expect",
    b"host",
    b"transfer-encoding",
)
_AUTHORIZATION, _API_KEY, _ORIGIN = b"authorization", b"x-api-key", b"origin"
_WATCHED: Final = frozenset(
    {_CONTENT_LENGTH, _CONTENT_TYPE, _CONNECTION, _EXPECT, _HOST, _TE, _AUTHORIZATION, _API_KEY, _ORIGIN}
)
_SPECIAL: Final = _WATCHED | REQUEST_DROP  # looked at, or not forwarded
MAX_HEAD: Final = (MAX_HEADERS + 1) * MAX_LINE  # bytes of a request head, whatever its lines


class RequestReader:
    """llhttp's request parser for one connection, and the head it is reading.

    ``read_head`` feeds a head as it arrives and gives it once whole. Then either ``feed`` the
    request's body (``complete`` turns True at its end) and call ``next``, or drop the reader.
    Raises ``BadMessage`` for anything llhttp or the limits refuse; the reader is then unusable.
    """

    __slots__ = ("_headers", "_parser", "_url", "complete", "fed", "head")

    def __init__(self) -> None:
        self._parser = httptools.HttpRequestParser(self)
        self.head: RequestHead | None = None
        self.complete = False
        self.fed = 0  # bytes of the current message fed so far (see read_head)
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []

    def read_head(self, buf: bytearray) -> RequestHead | None:
        """Feeds the head at the start of ``buf`` (a connection's unread bytes) as far as it has
        arrived; returns it once whole (once), else None. The end of a head is its first blank
        line: llhttp takes no bare LF or CR, so no valid head ends anywhere else. Blank lines
        before a request (which llhttp skips) are dropped from ``buf``. Then ``fed`` is the
        head's size, and what follows is its body or the next request."""
        while True:
            fed = self.fed
            end = buf.find(b"\r\n\r\n", max(0, fed - 3))
            stop = len(buf) if end < 0 else end + 4
            if stop > fed:
                self.feed(bytes(buf[fed:stop]))
                self.fed = stop
            head = self.head
            if head is not None:
                self.head = None
                return head
            if end < 0:
                if len(buf) - (buf.rfind(b"\r\n") + 2) > MAX_LINE:
                    raise BadMessage(f"a line longer than {MAX_LINE} bytes")
                if len(buf) > MAX_HEAD:
                    raise BadMessage(f"a head longer than {MAX_HEAD} bytes")
                return None
            del buf[:stop]  # blank lines only: llhttp read them and waits for a request
            self.fed = 0

    def next(self) -> None:
        """The current message was read to its end (``fed`` bytes): the next one starts after it."""
        self.fed = 0

    def feed(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            pass  # Upgrade or CONNECT: on_headers_complete marked it
        except httptools.HttpParserError as exc:
            raise _refusal(exc) from None

    # ---- llhttp callbacks ----

    def on_message_begin(self) -> None:
        self.complete = False
        self._url = b""
        self._headers = []

    def on_url(self, url: bytes) -> None:
        url = self._url + url if self._url else url
        if len(url) > MAX_FIELD:
            raise BadMessage(f"request target longer than {MAX_FIELD} bytes")
        self._url = url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))  # checked whole in on_headers_complete

    def on_headers_complete(self) -> None:
        raw = self._headers
        if len(raw) > MAX_HEADERS:
            raise BadMessage(f"more than {MAX_HEADERS} header fields")
        headers: list[tuple[bytes, bytes]] = []
        head = RequestHead(headers)
        lines: list[bytes] = []
        hosts = 0
        for name, value in raw:
            value = value.rstrip(b" \t")
            if len(name) + len(value) > MAX_FIELD - 2:
                if len(name) > MAX_FIELD or len(value) > MAX_FIELD:
                    raise BadMessage(f"header field longer than {MAX_FIELD} bytes")
                head.long_line = True
            headers.append((name, value))
            lower = name.lower()
            if lower not in _SPECIAL:
                lines += (name, b": ", value, b"\r\n")
                continue
            if lower == _CONTENT_TYPE:
                if head.content_type is None:
                    head.content_type = value.decode("utf-8", "surrogateescape")
            elif lower == _CONTENT_LENGTH:
                head.length = int(value)  # llhttp checked it: digits, one value
                continue
            elif lower == _HOST:
                hosts += 1
                continue
            elif lower == _CONNECTION:
                head.connection = value if not head.connection else head.connection + b", " + value
                continue
            elif lower == _AUTHORIZATION:
                head.authorization = head.authorization or value
            elif lower == _API_KEY:
                head.api_key = head.api_key or value
            elif lower == _ORIGIN:
                head.origin = head.origin or value
            elif lower == _EXPECT:
                head.expect = value.lower() if head.expect is None else b"(several)"
                continue
            elif lower == _TE:
                head.te = True
                continue
            else:  # hop-by-hop: not forwarded
                continue
            lines += (name, b": ", value, b"\r\n")
        head.forward = b"".join(lines)
        parser = self._parser
        head.method = parser.get_method().decode()
        if parser.get_http_version() != "1.1":
            head.http11 = False
        elif hosts != 1:
            # RFC 9112 §3.2; aiohttp refuses both cases too.
            raise BadMessage("missing Host header" if not hosts else "more than one Host header")
        head.keep_alive = parser.should_keep_alive()
        head.upgrade = parser.should_upgrade()
        head.target, head.path, head.query = _origin_form(self._url, head.method)
        self.head = head

    def on_message_complete(self) -> None:
        self.complete = True


def _origin_form(url: bytes, method: str) -> tuple[str, str, str]:
    """(target, path, query) of a request target: origin-form as sent; absolute-form reduced to
    its path and query; authority-form only for CONNECT and ``*`` only for OPTIONS (as aiohttp)."""
    target = url.decode("utf-8", "surrogateescape")
    if not target.startswith("/"):
        if target == "*" and method == "OPTIONS" or method == "CONNECT":
            return target, target, ""
        try:
            parsed = httptools.parse_url(url)
        except httptools.HttpParserInvalidURLError:
            raise BadMessage("request target is not a path or an absolute URL") from None
        if not parsed.host:
            raise BadMessage("request target is not a path or an absolute URL")
        path = (parsed.path or b"/").decode("utf-8", "surrogateescape")
        target = f"{path}?{parsed.query.decode('utf-8', 'surrogateescape')}" if parsed.query else path
    path, _, query = target.partition("?")
    return target, path, query


def _refusal(exc: httptools.HttpParserError) -> BadMessage:
    cause = exc.__context__
    if isinstance(cause, BadMessage):
        return cause
    if cause is not None:  # a bug in a callback, not a bad request: let it show
        raise cause
    return BadMessage(str(exc) or type(exc).__name__)


# ---- responses ----


class ResponseReader:
    """llhttp's response parser for the responses on one upstream connection, one at a time.

    ``start`` a response; then ``on_head()`` is called once its (final, non-interim) head is in,
    each piece of de-chunked body is appended to ``body`` (by llhttp's callback itself: no Python
    call per chunk), and ``on_end()`` is called at its end. ``feed`` raises
    ``BadMessage`` for what llhttp or the limits refuse, and for bytes after the end. For a
    response to HEAD (``head_only``) the body is taken to be empty whatever the head says.

    Content-Length beside a chunked Transfer-Encoding is accepted (RFC 9112 §6.3: the chunking
    wins); ``both_framings`` says it happened, so the connection is not reused, and that
    Content-Length is never forwarded (``forward``).
    """

    __slots__ = (
        "_ended",
        "_fed",
        "_head_only",
        "_length_line",
        "_lines",
        "_on_end",
        "_on_head",
        "_body",
        "_parser",
        "_raw",
        "_reason",
        "chunked",
        "connection",
        "content_type",
        "headers",
        "keep_alive",
        "on_body",
        "reason",
        "sized",
        "status",
        "te",
        "until_close",
    )

    def __init__(self, on_head: Callable[[], None], body: list[bytes], on_end: Callable[[], None]) -> None:
        self._on_head, self._on_end = on_head, on_end
        self._body = body
        self.on_body = body.append  # llhttp's on_body callback (read when a parser is made)
        self._parser: httptools.HttpResponseParser | None = None
        self._head_only = False
        self._ended = True
        self.start(head_only=False)

    def start(self, *, head_only: bool) -> None:
        """Readies the reader for the next response (to a HEAD request: ``head_only``)."""
        if self._parser is None or head_only or self._head_only or not self._ended:
            # llhttp resets itself after a complete response; after a HEAD (whose body llhttp
            # was not told to skip) or a broken one, it starts afresh.
            self._parser = httptools.HttpResponseParser(self)
            self._parser.set_dangerous_leniencies(lenient_chunked_length=True)
        self._head_only = head_only
        self._ended = False
        self._fed = 0  # head bytes fed so far (bounded by MAX_RESPONSE_HEAD)
        self._reason = b""
        self._raw: list[tuple[bytes, bytes]] = []
        self.status = 0  # 0 until the head is in
        self.reason = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.content_type = b""  # lower case
        self.connection = b""  # every Connection value, comma-joined
        self.chunked = False
        self.te = False  # any Transfer-Encoding
        self.sized = False  # a Content-Length
        self.until_close = False  # the body ends with the connection
        self.keep_alive = False
        self._lines = b""  # the forwarded header lines, without Content-Length
        self._length_line = b""

    @property
    def both_framings(self) -> bool:
        return self.te and self.sized

    def forward(self, rechunked: bool) -> bytes:
        """The header lines a client's copy of the head carries: minus hop-by-hop ones and, for
        a body that goes out re-chunked (or came with both framings), minus Content-Length."""
        if self.connection not in PLAIN_CONNECTION:  # it names more hop-by-hop headers
            return forwardable(self.headers, self.connection, RECHUNKED_DROP if rechunked else HOP_BY_HOP)
        if rechunked or self.te:
            return self._lines
        return self._lines + self._length_line

    def feed(self, data: bytes) -> None:
        assert self._parser is not None
        if self.status == 0:
            self._fed += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            raise BadMessage("upstream switched protocols; upgrades are not forwarded") from None
        except httptools.HttpParserError as exc:
            raise _refusal(exc) from None
        if self.status == 0 and self._fed > MAX_RESPONSE_HEAD:
            raise BadMessage(f"response head larger than {MAX_RESPONSE_HEAD} bytes")
        if self._head_only and self._body:
            raise BadMessage("upstream sent a body after its response to HEAD")

    def eof(self) -> bool:
        """The connection ended: True if that completed the body (it is delimited by the end)."""
        if self.until_close and not self._ended:
            self._end()
            return True
        return self._ended

    @property
    def ended(self) -> bool:
        return self._ended

    # ---- llhttp callbacks ----

    def on_message_begin(self) -> None:
        if self._ended:
            raise BadMessage("upstream sent bytes after the end of its response")
        self._reason = b""
        self._raw = []

    def on_status(self, reason: bytes) -> None:
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.status:  # after the head: a trailer field, not forwarded
            self._raw.append((name, value))

    def on_headers_complete(self) -> None:
        parser = self._parser
        assert parser is not None
        status = parser.get_status_code()
        if 100 <= status < 200:
            return  # an interim answer (101 raises HttpParserUpgrade): the real one follows
        raw = self._raw
        if len(raw) > MAX_HEADERS:
            raise BadMessage(f"more than {MAX_HEADERS} header fields")
        headers = self.headers
        lines: list[bytes] = []
        for name, value in raw:
            value = value.rstrip(b" \t")
            if len(name) > MAX_FIELD or len(value) > MAX_FIELD:
                raise BadMessage(f"header field longer than {MAX_FIELD} bytes")
            headers.append((name, value))
            lower = name.lower()
            if lower not in HOP_BY_HOP and lower != _CONTENT_LENGTH:
                lines += (name, b": ", value, b"\r\n")
                if lower == _CONTENT_TYPE and not self.content_type:
                    self.content_type = value.lower()
            elif lower == _CONTENT_LENGTH:
                self.sized = True
                self._length_line = b"%s: %s\r\n" % (name, value)
            elif lower == _TE:
                self.te = True
                self.chunked = value.rstrip().lower().endswith(b"chunked")
            elif lower == _CONNECTION:
                self.connection = value if not self.connection else self.connection + b", " + value
        self._lines = b"".join(lines)
        self.keep_alive = parser.should_keep_alive() and not (self.te and self.sized)
        bodiless = self._head_only or status in (204, 304)
        self.until_close = not bodiless and not self.chunked and not (self.sized and not self.te)
        self.reason = self._reason
        self.status = status
        self._on_head()
        if self._head_only:
            self._end()  # llhttp was not told about HEAD: the next response gets a new parser

    def on_message_complete(self) -> None:
        if self.status == 0:
            return  # the end of an interim answer
        if not self._ended:
            self._end()

    def _end(self) -> None:
        self._ended = True
        self._on_end()
