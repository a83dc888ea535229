"""One exchange as it went (``captureBuffer``): what the exchange sent upstream and what came back.

Owns: each ``Capture``'s bytes, filled by the exchange and the relay; the activity log keeps the
finished ones (``activity.Captures``) and ``/api/captures`` reads them. Imports nothing of
swapper's, so the event bus (whose ``RequestTrack`` carries one) and the activity log both can.
"""

from __future__ import annotations

import base64
from typing import Any, Final

__all__ = ["REDACTED", "Capture"]

REDACTED: Final = "[REDACTED]"
_SENSITIVE: Final = frozenset({"authorization", "proxy-authorization", "cookie", "set-cookie", "x-api-key"})


class Capture:
    """One exchange as it went: filled by the exchange and the relay, read by ``/api/captures``."""

    __slots__ = (
        "_limit",
        "body",
        "cut",
        "req_body",
        "req_headers",
        "req_path",
        "resp_headers",
        "size",
        "status",
    )

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self.req_path = ""
        self.req_headers = b""  # header lines as sent upstream
        self.req_body = b""
        self.status = 0
        self.resp_headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.size = 0
        self.cut = False  # the response body did not fit in the buffer

    def request(self, path: str, headers: bytes, body: bytes) -> None:
        self.req_path, self.req_headers, self.req_body = path, headers, body
        self.size += len(headers) + len(body)

    def response(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.status, self.resp_headers = status, list(headers)

    def add(self, data: bytes) -> None:
        """A piece of the response body (the relay calls this for every piece)."""
        if self.cut:
            return
        if self.size + len(data) > self._limit:
            self.cut = True
            return
        self.body.append(data)
        self.size += len(data)

    def as_json(self, ident: int) -> dict[str, Any]:
        """llama-swap's capture shape (bodies base64), sensitive headers redacted."""
        req_headers = {}
        for line in self.req_headers.split(b"\r\n"):
            name, colon, value = line.partition(b":")
            if colon:
                req_headers[name.decode("latin-1")] = value.strip().decode("utf-8", "replace")
        resp_headers = {n.decode("latin-1"): v.decode("utf-8", "replace") for n, v in self.resp_headers}
        return {
            "id": ident,
            "req_path": self.req_path,
            "req_headers": _redact(req_headers),
            "req_body": base64.b64encode(self.req_body).decode(),
            "resp_status_code": self.status,
            "resp_headers": _redact(resp_headers),
            "resp_body": base64.b64encode(b"".join(self.body)).decode(),
            "resp_body_truncated": self.cut,
        }


def _redact(headers: dict[str, str]) -> dict[str, str]:
    return {name: REDACTED if name.lower() in _SENSITIVE else value for name, value in headers.items()}
