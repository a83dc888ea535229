"""A fake inference server (llama-server / whisper-server / sd-server shapes) run as a child process.

Used by every test that needs a real upstream process:
``python tests/upstreams/fake_server.py --port P [flags]``.

Why it is not an aiohttp app: ``import aiohttp.web`` costs ~0.45 s of CPU on the 2-core CI
machines (client SSL contexts are built at import time), against ~30 ms for a real llama-server
to become healthy. A stdlib-only HTTP/1.1 server on asyncio streams starts in ~0.1 s, so swap
tests stay fast and a swap's overhead is not hidden behind the fake's own start-up. It speaks
enough HTTP/1.1 for a proxy: keep-alive, ``Connection: close``, Content-Length and chunked
request bodies, ``Expect: 100-continue``, HEAD, and chunked SSE responses.

Behaviour flags (all optional except --port):
  --host H               bind address (127.0.0.1)
  --model-name NAME      reported in every response; generated text contains it
  --load-delay S         /health answers 503 {"status":"loading"} for S seconds, then 200 {"status":"ok"}
  --tps N                streaming speed in tokens/s (1000; 0 = as fast as possible)
  --tokens N             tokens generated when the request has no max_tokens (8)
  --crash-after-bytes N  os._exit(3) once N body bytes of a streamed response were written
  --exit-during-load     print an error and exit rc 1 after ~50 ms, never healthy
  --never-healthy        /health always 503
  --ignore-sigterm       SIGTERM is ignored (SIGINT still exits)
  --defer-sigterm        like llama-server: a SIGTERM while a request is in flight is deferred until
                         no request is in flight; a second SIGTERM exits rc 1 at once
  --fork-grandchild      start a sleeping grandchild (same process group, ignores SIGTERM, inherits
                         stdout/stderr) and print "GRANDCHILD <pid>"
  --print-ready          print "server is listening on http://HOST:PORT" when /health turns 200
  --chatty-load          while loading, print a progress line every 2 ms with the number of /health
                         probes answered so far (a server that logs its load, as llama-server does)
  --print-early-ready    print "HTTP server is listening, ..." *before* loading, as older llama-server
                         builds do (a readiness line that /health does not yet agree with)
  --alloc-mib N          allocate and touch N MiB of RAM before listening
  --exit-after S         crash (rc 2) S seconds after start, whatever it is doing
  --deaf-after N         after answering N requests (not counting /health), stop listening and
                         close the connection, but stay alive: new connections are refused
  --drop-reused          close a keep-alive connection, unanswered, when a second request arrives
                         on it (not /health): a pooled connection that died as it was reused
  --llama-meta           GET /v1/models answers in llama-server's shape: ``aliases``, ``tags``,
                         ``meta`` (n_ctx_train 2048, n_ctx 512, ...) and the ``models`` array
  --metrics MODE         GET /metrics: ``off`` (default) answers 501 as llama-server without
                         --metrics; ``on`` answers llama-server-shaped Prometheus text (a counter
                         of the requests answered, a gauge); ``hang`` never answers
  --vram-mib N --vram-gpus 0,1
                         GPU memory the tests' fake NVML (tests/fake_nvml.py) reports this process
                         holding, split evenly over those GPUs (default: the GPUs in its
                         CUDA_VISIBLE_DEVICES, else GPU 0); the server itself ignores them
  --die-on-request S     S seconds after reading a request (not /health), print "dying" and SIGKILL
                         itself: a child that a request crashes
  --stop-on-request S    S seconds after reading a request (not /health), SIGSTOP itself: a hung
                         child (nothing answers, /health neither)
  --stop-after-bytes N   SIGSTOP itself once N body bytes of a streamed response were written
  --silent               read requests (not /health) and never answer them; /health still answers:
                         a child that is only slow
  --flood                print a 200-byte line as fast as its stdout takes them, from the start
  --no-listen            never open its port (nor print more): a load that stalled
  --request-lines N      print N more 100-byte lines for each request (not /health): a chatty server

Endpoints: POST /v1/chat/completions, POST /v1/completions (OpenAI shapes, "stream": true gives
SSE chunks then ``data: [DONE]``; honours max_tokens), POST /v1/embeddings, GET /v1/models,
GET /props, GET /health, POST /sdapi/v1/txt2img, POST /v1/images/generations,
POST /v1/audio/transcriptions and POST /inference (multipart), and an echo route for anything
else: ``{"method", "path", "raw_path", "query", "headers", "header_list", "body_b64",
"model_name", "pid"}``. Generated token i is ``"<model-name>#<i> "``.

With ``FAKE_REQUEST_LOG`` set in its environment, each request (not /health) that carries an
``X-Soak-Id`` header appends ``<pid> <id>`` to that file as it is read (the soak's check that no
request reaches two children).

A request with the header ``X-Fake-Delay: S`` is answered S seconds late (not a stream). One with
``X-Fake-Raw: <base64>`` is answered with exactly those bytes, then the connection is closed (for
malformed, oddly framed or connection-delimited answers).

Log lines go to stdout, one per request and one per state change. SIGTERM/SIGINT exit rc 0; the
SIGTERM line says how many client connections were still open (llama-server's exit waits for an
idle keep-alive connection to be noticed, so a proxy should close its idle ones first).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import signal
import sys
import time
from typing import Any

START = time.monotonic()
_REQUEST_LOG = os.environ.get("FAKE_REQUEST_LOG")
# One small O_APPEND write a request: atomic, so children writing at once never interleave.
REQUEST_LOG = os.open(_REQUEST_LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644) if _REQUEST_LOG else None

# A 1x1 transparent PNG, for the image endpoints.
TINY_PNG_B64 = (
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=="
)
GRANDCHILD_CODE = "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\ntime.sleep(1000)"
REASONS = {
    100: "Continue",
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    413: "Payload Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}
MAX_HEADER_BYTES = 64 * 1024


def log(msg: str) -> None:
    print(f"fake_server[{os.getpid()}]: {msg}", flush=True)


class BadRequest(Exception):
    pass


class Request:
    __slots__ = ("method", "target", "path", "query", "version", "headers", "body")

    def __init__(self, method: str, target: str, version: str, headers: list[tuple[str, str]]) -> None:
        self.method = method
        self.target = target
        self.path, _, self.query = target.partition("?")
        self.version = version
        self.headers = headers
        self.body = b""

    def header(self, name: str, default: str = "") -> str:
        name = name.lower()
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return default

    def keep_alive(self) -> bool:
        conn = self.header("connection").lower()
        if self.version == "HTTP/1.0":
            return "keep-alive" in conn
        return "close" not in conn

    def json(self) -> dict[str, Any]:
        try:
            obj = json.loads(self.body or b"{}")
        except ValueError as exc:
            raise BadRequest(f"invalid JSON body: {exc}") from None
        if not isinstance(obj, dict):
            raise BadRequest("JSON body must be an object")
        return obj


async def read_request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Request | None:
    """Reads one request; None on a clean EOF between requests."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if exc.partial.strip():
            raise BadRequest("truncated request head") from None
        return None
    except asyncio.LimitOverrunError:
        raise BadRequest("request head too large") from None
    lines = head.decode("latin-1").split("\r\n")
    try:
        method, target, version = lines[0].split(" ", 2)
    except ValueError:
        raise BadRequest(f"bad request line {lines[0]!r}") from None
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        if line:
            name, sep, value = line.partition(":")
            if not sep:
                raise BadRequest(f"bad header line {line!r}")
            headers.append((name.strip(), value.strip()))
    req = Request(method, target, version, headers)
    if req.header("expect").lower() == "100-continue":
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    if "chunked" in req.header("transfer-encoding").lower():
        req.body = await read_chunked(reader)
    elif length := req.header("content-length"):
        req.body = await reader.readexactly(int(length))
    return req


async def read_chunked(reader: asyncio.StreamReader) -> bytes:
    parts = []
    while True:
        size_line = await reader.readuntil(b"\r\n")
        size = int(size_line.split(b";", 1)[0].strip(), 16)
        if size == 0:
            # Trailers (rarely sent) end with an empty line.
            while (await reader.readuntil(b"\r\n")) != b"\r\n":
                pass
            return b"".join(parts)
        parts.append(await reader.readexactly(size))
        await reader.readexactly(2)


def response_head(status: int, headers: list[tuple[str, str]]) -> bytes:
    lines = [f"HTTP/1.1 {status} {REASONS.get(status, 'Unknown')}", "Server: fake_server"]
    lines += [f"{k}: {v}" for k, v in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


class Server:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.name: str = args.model_name
        self.in_flight = 0
        self.open_connections = 0
        self.term_pending = False
        self.ready_at = START + args.load_delay
        self.stream_bytes = 0  # body bytes of streamed responses, for --crash-after-bytes
        self.answered = 0  # requests other than /health, for --deaf-after
        self.health_probes = 0
        self.listener: asyncio.Server | None = None

    def healthy(self) -> bool:
        a = self.args
        return not (a.never_healthy or a.exit_during_load) and time.monotonic() >= self.ready_at

    # --- connection handling -------------------------------------------------------------

    async def handle_conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        served = 0  # requests answered on this connection, /health not counted
        self.open_connections += 1
        try:
            while True:
                try:
                    req = await read_request(reader, writer)
                except BadRequest as exc:
                    await self.send_json(writer, 400, {"error": str(exc)}, keep_alive=False)
                    break
                if req is None:
                    break
                if req.path != "/health":
                    served += 1
                    if self.args.drop_reused and served > 1:
                        log(f"{req.method} {req.path} dropped: a reused connection")
                        break
                    if REQUEST_LOG is not None and (soak_id := req.header("x-soak-id")):
                        os.write(REQUEST_LOG, f"{os.getpid()} {soak_id}\n".encode())
                    if self.args.request_lines:
                        chatter = f"fake_server[{os.getpid()}]: working on {req.path} " + "." * 60
                        print("\n".join([chatter] * self.args.request_lines), flush=True)
                    await self.fault_on_request(req)
                self.in_flight += 1
                try:
                    keep_alive = await self.dispatch(req, writer)
                finally:
                    self.in_flight -= 1
                    if self.term_pending and self.in_flight == 0:
                        exit_now(0, "deferred SIGTERM: no request in flight, exiting")
                if not keep_alive:
                    break
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            self.open_connections -= 1
            writer.close()

    async def fault_on_request(self, req: Request) -> None:
        """--die-on-request, --stop-on-request, --silent: what a request does to this child."""
        a = self.args
        if a.die_on_request is None and a.stop_on_request is None and not a.silent:
            return
        log(f"{req.method} {req.path} received")
        if a.die_on_request is not None:
            await asyncio.sleep(a.die_on_request)
            log("dying (--die-on-request)")
            os.kill(os.getpid(), signal.SIGKILL)
        if a.stop_on_request is not None:
            await asyncio.sleep(a.stop_on_request)
            log("stopping (--stop-on-request)")
            os.kill(os.getpid(), signal.SIGSTOP)
        if a.silent:
            await asyncio.get_running_loop().create_future()  # never answered

    async def send_json(
        self,
        writer: asyncio.StreamWriter,
        status: int,
        obj: Any,
        *,
        keep_alive: bool,
        head_only: bool = False,
    ) -> bool:
        body = json.dumps(obj).encode()
        headers = [
            ("Content-Type", "application/json; charset=utf-8"),
            ("Content-Length", str(len(body))),
            ("Connection", "keep-alive" if keep_alive else "close"),
        ]
        writer.write(response_head(status, headers) + (b"" if head_only else body))
        await writer.drain()
        return keep_alive

    async def dispatch(self, req: Request, writer: asyncio.StreamWriter) -> bool:
        keep = req.keep_alive()
        if raw := req.header("x-fake-raw", ""):
            # Whatever bytes the test wants as the answer (malformed ones too), then the end of
            # the connection.
            writer.write(base64.b64decode(raw))
            await writer.drain()
            log(f"{req.method} {req.path} raw answer")
            return False
        if req.method == "GET" and req.path == "/metrics":
            return await self.metrics(writer, keep)
        route = ROUTES.get((req.method, req.path))
        try:
            if route is None:
                status, obj = 200, self.echo(req)
            else:
                result = route(self, req)
                if isinstance(result, tuple):
                    status, obj = result
                else:
                    log(f"{req.method} {req.path} 200 (stream)")
                    return await self.stream(writer, req, result, keep)
        except BadRequest as exc:
            status, obj = 400, {"error": {"message": str(exc), "type": "invalid_request_error"}}
        if req.path != "/health":
            if delay := float(req.header("x-fake-delay", "0") or 0):
                await asyncio.sleep(delay)
            log(f"{req.method} {req.path} {status}")
            self.answered += 1
            if self.args.deaf_after is not None and self.answered >= self.args.deaf_after:
                keep = False
                if self.listener is not None and self.listener.is_serving():
                    self.listener.close()
                    log(f"deaf after {self.answered} requests: no longer accepting connections")
        return await self.send_json(writer, status, obj, keep_alive=keep, head_only=req.method == "HEAD")

    async def metrics(self, writer: asyncio.StreamWriter, keep: bool) -> bool:
        mode = self.args.metrics
        if mode == "hang":
            await asyncio.sleep(3600)
        if mode == "off":
            return await self.send_json(writer, 501, {"error": {"code": 501}}, keep_alive=keep)
        body = (
            "# HELP llamacpp:requests_answered_total Requests answered (not /health).\n"
            "# TYPE llamacpp:requests_answered_total counter\n"
            f"llamacpp:requests_answered_total {self.answered}\n"
            "# HELP llamacpp:kv_cache_usage_ratio KV-cache usage.\n"
            "# TYPE llamacpp:kv_cache_usage_ratio gauge\n"
            "llamacpp:kv_cache_usage_ratio 0.25\n"
        ).encode()
        head = [("Content-Type", "text/plain; version=0.0.4"), ("Content-Length", str(len(body)))]
        writer.write(response_head(200, [*head, ("Connection", "keep-alive" if keep else "close")]) + body)
        await writer.drain()
        return keep

    # --- streaming -----------------------------------------------------------------------

    async def stream(self, writer: asyncio.StreamWriter, req: Request, events: list[Any], keep: bool) -> bool:
        headers = [
            ("Content-Type", "text/event-stream"),
            ("Cache-Control", "no-cache"),
            ("Transfer-Encoding", "chunked"),
            ("Connection", "keep-alive" if keep else "close"),
        ]
        writer.write(response_head(200, headers))
        tps = self.args.tps
        t0 = time.monotonic()
        for i, event in enumerate(events):
            if tps > 0 and i > 1:
                # Pace by absolute time so slow writes do not slow the overall rate further.
                delay = t0 + (i - 1) / tps - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            data = b"data: " + (event if isinstance(event, bytes) else json.dumps(event).encode()) + b"\n\n"
            await self.write_stream_bytes(writer, data)
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        return keep

    async def write_stream_bytes(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        stop_at = self.args.stop_after_bytes
        if stop_at is not None and self.stream_bytes + len(data) >= stop_at:
            writer.write(b"%x\r\n%s\r\n" % (len(data), data))
            await writer.drain()
            log(f"stopping after {stop_at} streamed bytes (--stop-after-bytes)")
            os.kill(os.getpid(), signal.SIGSTOP)
        limit = self.args.crash_after_bytes
        if limit is not None and self.stream_bytes + len(data) >= limit:
            data = data[: limit - self.stream_bytes]
            writer.write(b"%x\r\n%s\r\n" % (len(data), data) if data else b"")
            await writer.drain()
            exit_now(3, f"crashing after {limit} streamed bytes (--crash-after-bytes)")
        self.stream_bytes += len(data)
        writer.write(b"%x\r\n%s\r\n" % (len(data), data))
        await writer.drain()

    # --- endpoints -----------------------------------------------------------------------

    def tokens(self, body: dict[str, Any]) -> list[str]:
        n = body.get("max_tokens") or body.get("n_predict") or self.args.tokens
        return [f"{self.name}#{i} " for i in range(int(n))]

    def base(self, obj: str) -> dict[str, Any]:
        return {"id": f"fake-{os.getpid()}-{time.monotonic_ns()}", "object": obj, "created": int(time.time())}

    def chat(self, req: Request) -> tuple[int, Any] | list[Any]:
        body = req.json()
        toks = self.tokens(body)
        usage = {"prompt_tokens": len(req.body) // 4, "completion_tokens": len(toks)}
        usage["total_tokens"] = usage["prompt_tokens"] + len(toks)
        if not body.get("stream"):
            msg = {"role": "assistant", "content": "".join(toks)}
            choice = {"index": 0, "message": msg, "finish_reason": "length"}
            return 200, self.base("chat.completion") | {
                "model": self.name,
                "choices": [choice],
                "usage": usage,
            }
        head = self.base("chat.completion.chunk") | {"model": self.name}

        def chunk(delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
            return head | {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

        events: list[Any] = [chunk({"role": "assistant", "content": ""}, None)]
        events += [chunk({"content": t}, None) for t in toks]
        events += [chunk({}, "length") | {"usage": usage}, b"[DONE]"]
        return events

    def completions(self, req: Request) -> tuple[int, Any] | list[Any]:
        body = req.json()
        toks = self.tokens(body)
        head = self.base("text_completion") | {"model": self.name}
        if not body.get("stream"):
            choice = {"index": 0, "text": "".join(toks), "logprobs": None, "finish_reason": "length"}
            return 200, head | {"choices": [choice]}

        def chunk(text: str, finish: str | None) -> dict[str, Any]:
            return head | {"choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}

        return [chunk(t, None) for t in toks] + [chunk("", "length"), b"[DONE]"]

    def embeddings(self, req: Request) -> tuple[int, Any]:
        body = req.json()
        inputs = body.get("input", "")
        if not isinstance(inputs, list):
            inputs = [inputs]
        data = []
        for i, text in enumerate(inputs):
            seed = sum(str(text).encode()) % 97
            vec = [((seed + k * 31) % 97) / 97.0 for k in range(8)]
            data.append({"object": "embedding", "index": i, "embedding": vec})
        return 200, {"object": "list", "model": self.name, "data": data, "usage": {"prompt_tokens": 1}}

    def models(self, req: Request) -> tuple[int, Any]:
        entry = {"id": self.name, "object": "model", "created": int(START), "owned_by": "fake_server"}
        if not self.args.llama_meta:
            return 200, {"object": "list", "data": [entry]}
        meta = {"vocab_type": 1, "n_vocab": 512, "n_ctx": 512, "n_ctx_train": 2048, "n_embd": 64}
        entry |= {"aliases": [self.name], "tags": ["tiny"], "meta": meta | {"n_params": 1000, "size": 604000}}
        listed = {"name": self.name, "model": self.name, "type": "model", "capabilities": ["completion"]}
        return 200, {"models": [listed], "object": "list", "data": [entry]}

    def props(self, req: Request) -> tuple[int, Any]:
        return 200, {
            "model_name": self.name,
            "model_path": f"/fake/{self.name}.gguf",
            "total_slots": 1,
            "default_generation_settings": {"n_ctx": 2048},
        }

    def health(self, req: Request) -> tuple[int, Any]:
        self.health_probes += 1
        if self.healthy():
            return 200, {"status": "ok"}
        return 503, {"status": "loading"}

    def txt2img(self, req: Request) -> tuple[int, Any]:
        body = req.json()
        return 200, {"images": [TINY_PNG_B64], "parameters": body, "info": json.dumps({"model": self.name})}

    def images(self, req: Request) -> tuple[int, Any]:
        req.json()
        return 200, {"created": int(time.time()), "model": self.name, "data": [{"b64_json": TINY_PNG_B64}]}

    def transcribe(self, req: Request) -> tuple[int, Any]:
        fields = parse_multipart(req)
        if "file" not in fields:
            raise BadRequest("multipart field 'file' is required")
        size = len(fields["file"])
        model = fields.get("model", b"").decode(errors="replace")
        return 200, {"text": f"{self.name} heard {size} bytes", "model": model, "file_bytes": size}

    def echo(self, req: Request) -> dict[str, Any]:
        return {
            "method": req.method,
            "path": req.path,
            "raw_path": req.target,
            "query": req.query,
            "headers": {k: v for k, v in req.headers},
            "header_list": [[k, v] for k, v in req.headers],
            "body_b64": base64.b64encode(req.body).decode(),
            "model_name": self.name,
            "pid": os.getpid(),
        }


ROUTES = {
    ("POST", "/v1/chat/completions"): Server.chat,
    ("POST", "/v1/completions"): Server.completions,
    ("POST", "/v1/embeddings"): Server.embeddings,
    ("GET", "/v1/models"): Server.models,
    ("GET", "/props"): Server.props,
    ("GET", "/health"): Server.health,
    ("POST", "/sdapi/v1/txt2img"): Server.txt2img,
    ("POST", "/v1/images/generations"): Server.images,
    ("POST", "/v1/audio/transcriptions"): Server.transcribe,
    ("POST", "/inference"): Server.transcribe,
}


def parse_multipart(req: Request) -> dict[str, bytes]:
    ctype = req.header("content-type")
    if not ctype.lower().startswith("multipart/form-data"):
        raise BadRequest("expected multipart/form-data")
    boundary = ""
    for param in ctype.split(";")[1:]:
        key, _, value = param.strip().partition("=")
        if key.lower() == "boundary":
            boundary = value.strip('"')
    if not boundary:
        raise BadRequest("multipart boundary missing")
    fields: dict[str, bytes] = {}
    for part in req.body.split(b"--" + boundary.encode())[1:]:
        if part.startswith(b"--"):
            break
        head, _, data = part.partition(b"\r\n\r\n")
        if data.endswith(b"\r\n"):
            data = data[:-2]
        for line in head.decode("latin-1").split("\r\n"):
            if line.lower().startswith("content-disposition:"):
                for param in line.split(";")[1:]:
                    key, _, value = param.strip().partition("=")
                    if key == "name":
                        fields[value.strip('"')] = data
    return fields


def exit_now(code: int, why: str) -> None:
    log(why)
    sys.stdout.flush()
    os._exit(code)


def fork_grandchild() -> None:
    import subprocess

    # Inherits our stdout/stderr and process group, and ignores SIGTERM: only a SIGKILL to the
    # group gets rid of it, and until then it holds the parent's pipes open.
    gc = subprocess.Popen(
        [sys.executable, "-S", "-c", GRANDCHILD_CODE, "fake_server.py-grandchild"],
        stdin=subprocess.DEVNULL,
    )
    print(f"GRANDCHILD {gc.pid}", flush=True)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="fake inference server for swapper's tests")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--model-name", default="fake")
    p.add_argument("--load-delay", type=float, default=0.0)
    p.add_argument("--tps", type=float, default=1000.0)
    p.add_argument("--tokens", type=int, default=8)
    p.add_argument("--crash-after-bytes", type=int, default=None)
    p.add_argument("--exit-during-load", action="store_true")
    p.add_argument("--never-healthy", action="store_true")
    p.add_argument("--ignore-sigterm", action="store_true")
    p.add_argument("--defer-sigterm", action="store_true")
    p.add_argument("--fork-grandchild", action="store_true")
    p.add_argument("--print-ready", action="store_true")
    p.add_argument("--print-early-ready", action="store_true")
    p.add_argument("--chatty-load", action="store_true")
    p.add_argument("--alloc-mib", type=int, default=0)
    p.add_argument("--exit-after", type=float, default=None)
    p.add_argument("--deaf-after", type=int, default=None)
    p.add_argument("--drop-reused", action="store_true")
    p.add_argument("--llama-meta", action="store_true")
    p.add_argument("--metrics", choices=("off", "on", "hang"), default="off")
    # Read from the command line by the tests' fake NVML (tests/fake_nvml.py); the server ignores them.
    p.add_argument("--vram-mib", type=int, default=0)
    p.add_argument("--vram-gpus", default="")
    p.add_argument("--die-on-request", type=float, default=None)
    p.add_argument("--stop-on-request", type=float, default=None)
    p.add_argument("--stop-after-bytes", type=int, default=None)
    p.add_argument("--silent", action="store_true")
    p.add_argument("--flood", action="store_true")
    p.add_argument("--no-listen", action="store_true")
    p.add_argument("--request-lines", type=int, default=0)
    return p.parse_args(argv)


def install_signals(loop: asyncio.AbstractEventLoop, server: Server) -> None:
    args = server.args

    def on_term() -> None:
        if args.defer_sigterm and server.in_flight and not server.term_pending:
            server.term_pending = True
            log("SIGTERM with requests in flight: cleaning up before exit")
            return
        why = f"SIGTERM received with {server.open_connections} client connections open, exiting"
        exit_now(1 if server.term_pending else 0, why)

    if args.ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        loop.add_signal_handler(signal.SIGTERM, on_term)
    loop.add_signal_handler(signal.SIGINT, exit_now, 0, "SIGINT received, exiting")


def flood() -> None:
    """--flood: lines as fast as stdout takes them (blocking when its reader stalls), in a thread
    so that requests are still served meanwhile."""
    line = f"fake_server[{os.getpid()}]: flood " + "x" * 170
    n = 0
    with contextlib.suppress(OSError, ValueError):
        while True:
            n += 1
            print(f"{line} {n}", flush=True)


async def main(argv: list[str]) -> None:
    args = parse_args(argv)
    server = Server(args)
    loop = asyncio.get_running_loop()
    install_signals(loop, server)
    log(f"loading model {args.model_name}")
    ballast = b"\x01" * (args.alloc_mib << 20)  # bytes * n writes every page, so RSS really grows
    if args.fork_grandchild:
        fork_grandchild()
    if args.no_listen:
        if args.chatty_load:
            for step in range(int(args.load_delay / 0.01)):  # printing while it "loads"
                log(f"loading: step {step}")
                await asyncio.sleep(0.01)
        await asyncio.get_running_loop().create_future()  # stalled: until a signal ends it
    srv = await asyncio.start_server(server.handle_conn, args.host, args.port, limit=MAX_HEADER_BYTES)
    server.listener = srv
    log(f"accepting connections on {args.host}:{args.port} (model loading)")
    if args.print_early_ready:
        log(f"HTTP server is listening, hostname: {args.host}, port: {args.port}")
    background: list[asyncio.Task[None]] = []  # referenced until the end, so never collected
    if args.chatty_load:

        async def chatter() -> None:
            step = 0
            while not server.healthy():
                step += 1
                log(f"loading: step {step}, {server.health_probes} health probes so far")
                await asyncio.sleep(0.002)

        background.append(asyncio.ensure_future(chatter()))
    if args.flood:
        background.append(asyncio.ensure_future(asyncio.to_thread(flood)))
    if args.exit_after is not None:
        loop.call_later(max(0.0, START + args.exit_after - time.monotonic()), exit_now, 2, "fake crash")
    if args.exit_during_load:
        loop.call_later(0.05, exit_now, 1, "error: failed to load model (--exit-during-load)")
    elif not args.never_healthy:
        ready_msg = f"model loaded; server is listening on http://{args.host}:{args.port}"
        if not args.print_ready:
            ready_msg = "model loaded"
        loop.call_at(server.ready_at, log, ready_msg)
    async with srv:
        await srv.start_serving()
        await asyncio.get_running_loop().create_future()  # until a signal ends the process (a
        # closed listener, --deaf-after, must not end it, as serve_forever() would)
    del ballast, background


if __name__ == "__main__":
    try:
        asyncio.run(main(sys.argv[1:]))
    except OSError as exc:  # e.g. port in use: fail fast like llama-server (rc 1)
        exit_now(1, f"error: {exc}")
