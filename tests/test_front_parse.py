"""The front door's request-head parser (``front._parse_head``), property-based: it must accept
only what it can serve exactly as aiohttp would, and never raise.

Over random heads (valid ones built from random header sets, and random byte soup), it returns
None (the request goes to aiohttp) or a head whose fields agree with the bytes: the method and
target of the request line, every header in order with its value trimmed, one decimal
Content-Length, the first Content-Type, every Connection value, close when a Connection token is
``close``. Anything that could be read two ways (two Content-Lengths, a Transfer-Encoding, an
obs-fold or a space before a colon, HTTP/1.0, an Upgrade, a non-100-continue Expect) is refused.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from swapper.front import _parse_head

TOKEN = st.text(
    alphabet="!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ",
    min_size=1,
    max_size=12,
)
VALUE = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=20)
PLAIN_NAMES = TOKEN.filter(
    lambda n: (
        n.lower()
        not in {"content-length", "transfer-encoding", "upgrade", "expect", "connection", "content-type"}
    )
)


@given(st.binary(max_size=300))
def test_byte_soup_never_raises(data: bytes) -> None:
    head = _parse_head(data)
    if head is not None:
        assert head.length >= 0
        assert data.startswith(f"{head.method} {head.target} HTTP/1.1".encode())


@given(
    method=st.sampled_from(["POST", "GET", "PUT"]),
    path=st.from_regex(r"/[a-z/]{0,20}", fullmatch=True),
    headers=st.lists(st.tuples(PLAIN_NAMES, VALUE), max_size=8),
    length=st.integers(min_value=0, max_value=10**9),
    content_type=st.none() | VALUE,
    connection=st.none() | st.sampled_from(["close", "keep-alive", "Close", "keep-alive, close", "x-foo"]),
    pad=st.sampled_from(["", " ", "  ", "\t"]),
)
def test_well_formed_heads_are_read_exactly(
    method: str,
    path: str,
    headers: list[tuple[str, str]],
    length: int,
    content_type: str | None,
    connection: str | None,
    pad: str,
) -> None:
    fields = [*headers, ("Content-Length", str(length))]
    if content_type is not None:
        fields.insert(0, ("Content-Type", content_type))
    if connection is not None:
        fields.append(("Connection", connection))
    raw = f"{method} {path} HTTP/1.1\r\n" + "\r\n".join(f"{n}:{pad}{v}{pad}" for n, v in fields)
    head = _parse_head(raw.encode())
    assert head is not None
    assert (head.method, head.target, head.length) == (method, path, length)
    assert head.headers == [(n, v) for n, v in fields]
    assert head.content_type == content_type
    assert head.connection == connection
    assert head.close == (
        connection is not None and "close" in connection.lower().replace(" ", "").split(",")
    )


@given(
    bad=st.sampled_from(
        [
            "Content-Length: 5\r\nContent-Length: 5",
            "Content-Length: 5\r\nTransfer-Encoding: chunked",
            "Content-Length: +5",
            "Content-Length: 5\r\n folded",
            "Content-Length : 5",
            " Content-Length: 5",
            "Content-Length: 5\r\nUpgrade: websocket",
            "Content-Length: 5\r\nExpect: 200-ok",
            "Host: x",
        ]
    ),
    version=st.sampled_from(["HTTP/1.1", "HTTP/1.0"]),
)
def test_ambiguous_heads_are_left_to_aiohttp(bad: str, version: str) -> None:
    assert _parse_head(f"POST /v1/chat/completions {version}\r\n{bad}".encode()) is None


@given(
    before=st.sampled_from(["", "a", "text/plain"]),
    breaker=st.sampled_from(["\n", "\r", "\n\t", "\rX-Evil: 1"]),
    after=st.sampled_from(["", "b", "X-Evil: 1"]),
)
def test_a_bare_cr_or_lf_inside_a_header_is_refused(before: str, breaker: str, after: str) -> None:
    # Forwarded as is, a bare line break could split one header into two at the upstream.
    head = f"POST /v1/chat/completions HTTP/1.1\r\nX-Note: {before}{breaker}{after}\r\nContent-Length: 2"
    assert _parse_head(head.encode()) is None


def test_a_get_without_a_content_length_is_read_as_bodyless_only_when_asked() -> None:
    raw = b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAccept: */*"
    assert _parse_head(raw) is None  # a POST path needs its Content-Length
    head = _parse_head(raw, bodyless=True)
    assert head is not None and head.length == -1 and head.headers == [("Host", "x"), ("Accept", "*/*")]
