"""The heads the front door writes on the wire: the answer's head from the child's, the reason
phrases; and the capturing relay sink.

Owns: nothing mutable.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from http import HTTPStatus
from typing import Final

from swapper.observe.capture import Capture
from swapper.wire.codec import response_head
from swapper.wire.h1pool import Response

_BODILESS: Final = frozenset({204, 304})  # answers that never have a body
_CLOSE: Final = b"Connection: close\r\n"


def _capturing(sink: Callable[[bytes, bool], None], capture: Capture) -> Callable[[bytes, bool], None]:
    def relay(data: bytes, last: bool) -> None:
        capture.add(data)
        sink(data, last)

    return relay


def _answer_head(upstream: Response, close: bool) -> tuple[bytes, bool]:
    """The head of the client's answer to ``upstream``, and whether its body goes out chunked
    (the upstream's was, or had no length)."""
    chunked = upstream.status not in _BODILESS and not upstream.sized
    lines = upstream.reader.forward(chunked)
    if chunked:
        lines += b"Transfer-Encoding: chunked\r\n"
    if upstream.sse:
        lines += b"X-Accel-Buffering: no\r\n"  # nginx and friends in front of us must not buffer
    if close:
        lines += _CLOSE
    return response_head(upstream.status, upstream.reason, lines), chunked


def _reason(status: int) -> bytes:
    with contextlib.suppress(ValueError):
        return HTTPStatus(status).phrase.encode()
    return b"Error"
