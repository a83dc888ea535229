"""The error hierarchy and the one envelope every error swapper produces is rendered in.

Owns: nothing mutable. A leaf module: it imports nothing from the rest of swapper.

Each error carries its HTTP status and an OpenAI-style ``code``; ``error_body()`` renders the
envelope ``{"error": {"message", "type", "param", "code", "retryable"}, "src": "swapper"}`` so
clients written for OpenAI (and for llama-swap, whose envelope has the same fields) parse it.

``retryable`` tells a caller (a shell script, a home-automation hook) whether the same request may
succeed if sent again later. One place decides it: ``SwapperError.retryable``, from the status
(``RETRYABLE_STATUSES``) unless the error's class or the raiser says otherwise (a command that
cannot run at all fails every time, whatever its 502 says).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "authentication_error",
    404: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}

# Statuses that mean "not now" rather than "not this request": a queue or limit that is full, a
# model being unloaded or swapped, a child that died, hung or refused, a peer that is down.
RETRYABLE_STATUSES = frozenset({408, 425, 429, 502, 503, 504})


class SwapperError(Exception):
    """Base of every error that becomes an HTTP response; ``status`` and ``code`` say which."""

    status: int = 500
    code: str = "internal_error"
    # None: decided by the status (``RETRYABLE_STATUSES``); a class or a raiser may say otherwise.
    retry: bool | None = None

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
        retryable: bool | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        if code is not None:
            self.code = code
        if retryable is not None:
            self.retry = retryable
        self.headers: Mapping[str, str] = headers or {}

    @property
    def retryable(self) -> bool:
        """Whether the same request may succeed if sent again later (see the module doc)."""
        return self.status in RETRYABLE_STATUSES if self.retry is None else self.retry

    @property
    def type(self) -> str:
        if self.status >= 500:
            return "server_error"
        return _TYPE_BY_STATUS.get(self.status, "invalid_request_error")


class BadRequest(SwapperError):
    status = 400
    code = "bad_request"


class ModelRequired(BadRequest):
    """No model id in the request, no ``defaultModel``, and not exactly one model loaded."""

    code = "model_required"


class ModelNotFound(SwapperError):
    status = 404
    code = "model_not_found"


class NotFound(SwapperError):
    status = 404
    code = "not_found"


class Unauthorized(SwapperError):
    status = 401
    code = "unauthorized"


class BodyTooLarge(SwapperError):
    status = 413
    code = "request_too_large"


class Conflict(SwapperError):
    status = 409
    code = "conflict"


class ConcurrencyLimit(SwapperError):
    status = 429
    code = "concurrency_limit"


class QueueFull(SwapperError):
    status = 503
    code = "queue_full"


class ModelLoadFailed(SwapperError):
    """The child exited, never became healthy, or could not be spawned.

    Retryable (the child may have died of memory others held, or hung): a command that cannot
    run at all is raised with ``retryable=False``."""

    status = 502
    code = "model_load_failed"


class ModelUnloaded(SwapperError):
    """The request's model was unloaded (admin unload, reload) while the request waited."""

    status = 503
    code = "model_unloaded"


class ShuttingDown(SwapperError):
    status = 503
    code = "shutting_down"


class UpstreamError(SwapperError):
    """The child refused, reset or dropped the connection before answering."""

    status = 502
    code = "bad_gateway"


class UpstreamRefused(UpstreamError):
    """No connection could be made to the child at all: nothing was sent, so a retry is safe."""


class GatewayTimeout(SwapperError):
    """A ``timeouts`` deadline ran out: the connect, the response head, or the whole request."""

    status = 504
    code = "gateway_timeout"


def error_body(err: SwapperError) -> bytes:
    return json.dumps(
        {
            "error": {
                "message": err.message,
                "type": err.type,
                "param": None,
                "code": err.code,
                "retryable": err.retryable,
            },
            "src": "swapper",
        }
    ).encode()


def sse_error_event(err: SwapperError) -> bytes:
    """The envelope as a final SSE event, for a stream that cannot end normally (OpenAI's
    clients raise it as an error)."""
    return b"data: " + error_body(err) + b"\n\n"


@dataclass(frozen=True, slots=True)
class Answer:
    """A small whole response swapper writes itself (an error, the model list, health): each
    server renders it its own way (``routes.answer_response``, the front door's writer)."""

    status: int
    body: bytes
    content_type: str = "application/json"
    charset: str | None = None
    headers: tuple[tuple[str, str], ...] = ()


def error_answer(err: SwapperError) -> Answer:
    return Answer(err.status, error_body(err), headers=tuple(err.headers.items()))
