"""What a streaming client sees while its model loads or its request waits in the queue.

Owns: the SSE preamble written to one response before the upstream's stream is appended to it.
Two modes:

* ``reasoning`` (llama-swap's ``sendLoadingState``): OpenAI chat-completion chunks whose
  ``delta.reasoning_content`` carries the status text, so chat UIs show it in their "thinking"
  box and OpenAI SDKs parse it as an ordinary chunk.
* ``comments``: SSE comment lines (``: loading model x 1.2s``), which every SSE parser ignores;
  for UIs where status text in the reasoning box is noise (llama-swap PR #583 asked for this).

Runs in the request's own handler task; the only thing it reads from the run loop is the
advisory queue position.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Literal

from aiohttp import web

from swapper.config.schema import Config, ModelConfig
from swapper.core.errors import SwapperError
from swapper.core.messages import Lease

Mode = Literal["reasoning", "comments"]
TICK_SECONDS = 1.0


def wants_loading_state(config: Config, cfg: ModelConfig, path: str) -> bool:
    """Whether a streamed request to ``cfg``'s model that must wait is shown the loading state:
    status text as reasoning deltas only fits chat completions; comments fit any SSE."""
    if not cfg.send_loading_state:
        return False
    return config.loading_state_mode == "comments" or path.endswith("/chat/completions")


class LoadingStream:
    """The preamble of one response; ``begin`` sends the headers, ``tick``/``done`` status."""

    def __init__(self, request: web.Request, model: str, mode: Mode) -> None:
        self._request = request
        self._model = model
        self._mode = mode
        self._began = time.monotonic()
        self._id = f"chatcmpl-swapper-{int(self._began * 1000)}"
        self.response = web.StreamResponse(
            status=200,
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
            },
        )

    async def begin(self) -> None:
        await self.response.prepare(self._request)
        await self._say(f"swapper: loading model {self._model}\n", f"loading model {self._model}")

    async def tick(self, position: int | None) -> None:
        elapsed = time.monotonic() - self._began
        if position is not None:
            await self._say(f"queue position #{position}\n", f"queued #{position} {elapsed:.1f}s")
        else:
            await self._say(".", f"loading model {self._model} {elapsed:.1f}s")

    async def done(self) -> None:
        elapsed = time.monotonic() - self._began
        await self._say(f"\nDone! ({elapsed:.2f}s)\n\n", f"ready after {elapsed:.2f}s")

    async def fail(self, err: SwapperError) -> None:
        """The headers (200) are gone: the error travels as a final SSE event."""
        payload = {
            "error": {"message": err.message, "type": err.type, "code": err.code, "retryable": err.retryable}
        }
        await self.response.write(b"data: " + json.dumps(payload).encode() + b"\n\n")
        await self.response.write_eof()

    async def _say(self, reasoning: str, comment: str) -> None:
        if self._mode == "comments":
            await self.response.write(f": {comment}\n\n".encode())
            return
        chunk = {
            "id": self._id,
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": self._model,
            "choices": [{"index": 0, "delta": {"reasoning_content": reasoning}, "finish_reason": None}],
        }
        await self.response.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")


async def wait_with_preamble(
    stream: LoadingStream,
    lease: asyncio.Future[Lease],
    position: Callable[[], int | None],
) -> None:
    """Sends the preamble's status ticks until ``lease`` resolves (or raises)."""
    await stream.begin()
    while True:
        done, _ = await asyncio.wait({lease}, timeout=TICK_SECONDS)
        if done:
            break
        await stream.tick(position())
    if lease.exception() is None:
        await stream.done()
