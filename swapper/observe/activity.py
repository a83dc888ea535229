"""The activity log: the last N model requests with their timings and token counts, and captures.

Owns: ``ActivityLog``, an ``events.Observer`` holding one ``Record`` per finished model request in
a ring of ``metricsMaxInMemory`` entries (the oldest drop out), and, when ``captureBuffer`` is set,
``Captures``: whole exchanges (request and response, headers and bodies) in a FIFO byte budget.
``/api/metrics`` and the web UI read them (``swapper.web.ui.api``).

Cost on the hot path: recording a request is one small object appended to a deque, in the bus's
``request_finished`` hook. Token counts are not parsed then: a record keeps the answer's last
bytes (``RequestTrack.tail``, at most ``TAIL``, set by the relay, which keeps the last few chunks
of a stream and never looks inside one), and they are parsed the first time someone reads the
record. A stream's counts come from its last events only: llama-server puts ``timings`` (and
``usage``, when asked) in its final event, OpenAI-style servers put ``usage`` there.

Token rules (llama-swap's): ``usage`` gives prompt (``prompt_tokens``/``input_tokens``), completion
(``completion_tokens``/``output_tokens``) and cached counts; llama.cpp's ``timings`` override them
(``prompt_n``, ``predicted_n``, ``cache_n``) and give the speeds. Unknown values are -1. Without
``timings``, a stream's generation speed is its completion tokens over the time from its first
byte to its end.

Captures (off unless ``captureBuffer`` is set): ``request_started`` gives the track a ``Capture``;
the exchange fills in the request and the response head, the relay the body (up to the whole
buffer's size; what does not fit is cut and marked). A finished capture goes into the budget,
evicting the oldest ones; one larger than the whole budget is not kept. Sensitive headers
(``Authorization``, ``Cookie``, API keys) are redacted when read.

Concurrency: everything runs on the event loop's thread (bus hooks and handlers).
"""

from __future__ import annotations

import json
import re
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from http import HTTPStatus
from typing import Any, Final

from aiohttp import web

from swapper.observe.capture import Capture
from swapper.observe.events import Observer, RequestTrack

__all__ = [
    "ACTIVITY",
    "DEFAULT_RECORDS",
    "TAIL",
    "TAIL_CHUNKS",
    "ActivityLog",
    "Capture",
    "Captures",
    "Record",
    "Tokens",
    "parse_tokens",
    "tail_of",
]

DEFAULT_RECORDS: Final = 1000  # llama-swap's metricsMaxInMemory default
TAIL: Final = 2048  # bytes of an answer kept for its token counts: a final event's usage and timings
TAIL_CHUNKS: Final = 4  # a stream's last reads kept by a relay (llama-server's last event, then [DONE])
# The last "usage" and "timings" objects in a tail. A quote inside generated text is escaped in
# JSON, so a bare `"usage":` is a key, not content.
_FIELD: Final = re.compile(r'"(usage|timings)"\s*:\s*')
_DECODER: Final = json.JSONDecoder()
_UPSTREAM_ROUTE: Final = "/upstream/{rest}"


@dataclass(frozen=True, slots=True)
class Tokens:
    """One answer's token counts and speeds; -1 where the answer did not say."""

    input: int = -1
    output: int = -1
    cached: int = -1
    draft: int = -1
    draft_accepted: int = -1
    prompt_per_second: float = -1.0
    tokens_per_second: float = -1.0
    error: str | None = None  # an error answer's message (error.message, error, message, detail)

    def as_json(self) -> dict[str, Any]:
        """llama-swap's ``tokens`` object."""
        return {
            "cache_tokens": self.cached,
            "draft_tokens": self.draft,
            "draft_acc_tokens": self.draft_accepted,
            "input_tokens": self.input,
            "output_tokens": self.output,
            "prompt_per_second": self.prompt_per_second,
            "tokens_per_second": self.tokens_per_second,
        }


def tail_of(chunks: deque[bytes] | list[bytes]) -> bytes:
    """The last ``TAIL`` bytes of ``chunks`` joined (a relay's last reads)."""
    last: list[bytes] = []
    size = 0
    for data in reversed(chunks):
        last.append(data[-TAIL:])
        size += len(last[-1])
        if size >= TAIL:
            break
    last.reverse()
    return b"".join(last)[-TAIL:]


def _object_at(text: str, at: int | None) -> dict[str, Any] | None:
    if at is None:
        return None
    try:
        value, _ = _DECODER.raw_decode(text, at)
    except ValueError:
        return None  # cut by the tail's start, or not JSON after all
    return value if isinstance(value, dict) else None


def _int(obj: dict[str, Any] | None, *keys: str) -> int:
    for key in keys:
        value = obj.get(key) if obj else None
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return -1


def _float(obj: dict[str, Any] | None, key: str) -> float:
    value = obj.get(key) if obj else None
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else -1.0


def _cached(usage: dict[str, Any] | None) -> int:
    if usage is None:
        return -1
    if (n := _int(usage, "cache_read_input_tokens")) >= 0:
        return n
    for key in ("input_tokens_details", "prompt_tokens_details"):
        details = usage.get(key)
        if isinstance(details, dict) and (n := _int(details, "cached_tokens")) >= 0:
            return n
    return -1


def _error_message(text: str) -> str | None:
    """An error answer's message, when its tail is the whole JSON body."""
    try:
        body = json.loads(text)
    except ValueError:
        return None
    if not isinstance(body, dict):
        return None
    error = body.get("error")
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return str(error["message"])
    for key in ("error", "message", "detail"):
        if isinstance(body.get(key), str):
            return str(body[key])
    return None


def parse_tokens(tail: bytes, *, error: bool = False) -> Tokens:
    """The token counts in an answer's last bytes (see the module docstring); ``error``: also
    look for an error answer's message."""
    text = tail.decode("utf-8", "replace")  # a tail may begin mid-character
    where: dict[str, int] = {}
    for match in _FIELD.finditer(text):
        where[match.group(1)] = match.end()  # the last of each wins: the final event's
    usage = _object_at(text, where.get("usage"))
    timings = _object_at(text, where.get("timings"))
    message = _error_message(text) if error else None
    if usage is None and timings is None:
        return Tokens(error=message)
    output = _int(timings, "predicted_n")
    return Tokens(
        input=_int(timings, "prompt_n") if timings else _int(usage, "prompt_tokens", "input_tokens"),
        output=output if output >= 0 else _int(usage, "completion_tokens", "output_tokens"),
        cached=_int(timings, "cache_n") if timings else _cached(usage),
        draft=_int(timings, "draft_n"),
        draft_accepted=_int(timings, "draft_n_accepted"),
        prompt_per_second=_float(timings, "prompt_per_second"),
        tokens_per_second=_float(timings, "predicted_per_second"),
        error=message,
    )


class Captures:
    """Finished captures by record id, the oldest evicted to stay within ``budget`` bytes."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self._items: OrderedDict[int, Capture] = OrderedDict()
        self._bytes = 0

    def put(self, ident: int, capture: Capture) -> bool:
        """Keeps ``capture``; False if it is larger than the whole budget (not kept)."""
        if capture.size > self.budget:
            return False
        self._items[ident] = capture
        self._bytes += capture.size
        while self._bytes > self.budget:
            _, old = self._items.popitem(last=False)
            self._bytes -= old.size
        return True

    def get(self, ident: int) -> Capture | None:
        return self._items.get(ident)

    def __contains__(self, ident: object) -> bool:
        return ident in self._items

    @property
    def used(self) -> int:
        return self._bytes


class Record:
    """One finished model request. Token counts are parsed from ``tail`` when first read."""

    __slots__ = (
        "_tokens",
        "at",
        "content_type",
        "duration",
        "id",
        "method",
        "model",
        "outcome",
        "path",
        "selector",
        "status",
        "tail",
        "ttfb",
        "waited",
    )

    def __init__(self, ident: int, req: RequestTrack, duration: float) -> None:
        self.id = ident
        self.at = req.at
        self.model = req.model
        self.method = req.method
        self.path = req.path
        self.status = req.status
        self.outcome = req.outcome or "ok"
        self.waited = req.waited
        self.ttfb = req.ttfb
        # The front door tracks an inline request just after sending it, and times its TTFB from
        # the send: the two may differ by microseconds, never by a duration shorter than its TTFB.
        self.duration = duration if req.ttfb is None else max(duration, req.ttfb)
        self.content_type = req.content_type
        self.tail = req.tail
        self.selector = req.selector
        self._tokens: Tokens | None = None

    @property
    def tokens(self) -> Tokens:
        tokens = self._tokens
        if tokens is None:
            status = self.status
            tokens = parse_tokens(self.tail, error=status is not None and status >= 400)
            # No timings: a stream's speed from its first byte to its end.
            streamed = self.content_type.startswith(b"text/event-stream")
            generating = self.duration - self.ttfb if self.ttfb is not None else 0.0
            if tokens.tokens_per_second < 0 and tokens.output > 0 and streamed and generating > 0:
                tokens = replace(tokens, tokens_per_second=tokens.output / generating)
            self._tokens = tokens
            self.tail = b""  # parsed once; the ring keeps only the counts
        return tokens

    def error_message(self) -> str | None:
        status = self.status
        if status is None:
            return "no answer: the client left or the request was cut"
        if status < 400:
            return _CUT_SHORT.get(self.outcome)
        message = self.tokens.error
        if message:
            return message
        try:
            return f"{status} {HTTPStatus(status).phrase}"
        except ValueError:
            return str(status)

    def as_json(self, has_capture: bool) -> dict[str, Any]:
        """llama-swap's activity entry, plus swapper's timings (``method``, ``queue_wait_ms``,
        ``ttfb_ms``)."""
        entry: dict[str, Any] = {
            "id": self.id,
            "timestamp": datetime.fromtimestamp(self.at, UTC).isoformat(timespec="milliseconds"),
            "model": self.model,
            "method": self.method,
            "req_path": self.path,
            "resp_content_type": self.content_type.decode("latin-1"),
            "resp_status_code": self.status if self.status is not None else 0,
            "outcome": self.outcome,
            "tokens": self.tokens.as_json(),
            "queue_wait_ms": _ms(self.waited),
            "ttfb_ms": _ms(self.ttfb),
            "duration_ms": _ms(self.duration),
            "has_capture": has_capture,
        }
        if (message := self.error_message()) is not None:
            entry["error_msg"] = message
        if self.selector is not None:
            entry["metadata"] = {"selector": self.selector}  # llama-swap's key
        return entry


# Why an answer that began well did not end well (its status alone says success).
_CUT_SHORT: Final = {
    "client_gone": "the client left before the answer was complete",
    "cut": "cut: the model was stopped during the answer",
    "upstream_error": "the upstream broke off the answer",
    "timeout": "timed out during the answer",
}


def _ms(seconds: float | None) -> float:
    return -1 if seconds is None else round(seconds * 1000, 3)


class ActivityLog(Observer):
    """The ring of the last ``limit`` model requests (see the module docstring)."""

    def __init__(self, limit: int, capture_bytes: int = 0) -> None:
        self.limit = limit
        self._records: deque[Record] = deque(maxlen=limit)
        self._next = 1
        self._last: tuple[int, int] | None = None  # (request id, record id) of the newest record
        self.captures = Captures(capture_bytes) if capture_bytes > 0 else None

    def records(self) -> list[Record]:
        """Oldest first."""
        return list(self._records)

    def record_id(self, req: RequestTrack) -> int | None:
        """The record ``req`` just became, for observers told of its end after this log."""
        last = self._last
        return last[1] if last is not None and last[0] == req.req_id else None

    def has_capture(self, ident: int) -> bool:
        return self.captures is not None and ident in self.captures

    @classmethod
    def make(cls, limit: int, capture_bytes: int) -> ActivityLog:
        """The log for ``metricsMaxInMemory`` and ``captureBuffer`` (bytes): without captures,
        the bus skips ``request_started`` for it altogether."""
        return _CapturingLog(limit, capture_bytes) if capture_bytes > 0 else cls(limit)

    # ---- bus hooks ----

    def request_finished(self, req: RequestTrack) -> None:
        if req.route == _UPSTREAM_ROUTE and req.method != "POST":
            return  # a model's own UI and its assets through /upstream: not inference (llama-swap's rule)
        ident = self._next
        self._next = ident + 1
        self._records.append(Record(ident, req, time.perf_counter() - req.started))
        self._last = (req.req_id, ident)
        if req.capture is not None and self.captures is not None:
            self.captures.put(ident, req.capture)
            req.capture = None


class _CapturingLog(ActivityLog):
    def request_started(self, req: RequestTrack) -> None:
        assert self.captures is not None
        req.capture = Capture(self.captures.budget)


ACTIVITY = web.AppKey("activity", ActivityLog)
