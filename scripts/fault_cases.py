#!/usr/bin/env python3
"""The request-side faults, by hand, with real llama-server children: what each client saw, and
how long it took.

Runs ``python -m swapper`` from a checkout (this one, or ``--checkout DIR`` with its own
``.venv``) on loopback, in front of this checkout's ``.demo`` llama-server and tiny models
(``python -m swapper.demo setup``), and breaks things:

  * replay: a child SIGKILLed 0.5 s into a non-streamed chat (max_tokens 2000);
  * hang: a child SIGSTOPped with a stream and a plain request in flight, and a request for
    another model of its group queued behind them (``maxWait: 5``); then ``/unload``;
  * stderr: 300 requests while swapper's stderr is a pipe nobody reads (``logToStdout: both``),
    or until 3 got no answer within 5 s;
  * unload: a non-streamed request cut by ``/unload``;
  * crash-stream: a stream whose child is SIGKILLed, and how the metrics counted it;
  * port: a listen port already taken.

    .venv/bin/python scripts/fault_cases.py                       # this checkout
    .venv/bin/python scripts/fault_cases.py --checkout ../main    # another one, same cases

Every client has a deadline (``--client-timeout``), so a case that hangs ends as "no answer".
Prints one line a case (``--json``: one object).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / ".demo"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def config(extra: str = "") -> str:
    llama = f"{DEMO}/bin/llama-server --host 127.0.0.1 --port ${{PORT}} -t 1 -c 4096 --no-warmup"
    return (
        f"startPort: {free_port()}\nhealthCheckTimeout: 60\n{extra}\nmodels:\n"
        f"  chat-a:\n    cmd: {llama} -m {DEMO}/models/chat-a.gguf\n    maxWait: 5\n"
        f"  chat-b:\n    cmd: {llama} -m {DEMO}/models/chat-b.gguf\n    maxWait: 5\n"
    )


class Swapper:
    def __init__(self, checkout: Path, text: str, *, stderr: Any = subprocess.DEVNULL) -> None:
        self.dir = tempfile.TemporaryDirectory(prefix="fault-cases-")
        path = Path(self.dir.name) / "config.yaml"
        path.write_text(text)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        python = checkout / ".venv" / "bin" / "python"
        self.proc = subprocess.Popen(
            [str(python), "-m", "swapper", "--config", str(path), "--listen", f"127.0.0.1:{self.port}"],
            cwd=checkout,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
        deadline = time.monotonic() + 30
        while not self._up():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"swapper did not start (rc {self.proc.poll()})")
            time.sleep(0.05)

    def _up(self) -> bool:
        try:
            return get(self.url + "/health", 1)[0] == 200
        except OSError:
            return False

    def pid(self, model: str) -> int | None:
        for r in json.loads(get(self.url + "/running", 5)[1])["running"]:
            if r["model"] == model:
                return int(r["pid"]) if r["pid"] else None
        return None

    def state(self, model: str) -> str | None:
        for r in json.loads(get(self.url + "/running", 5)[1])["running"]:
            if r["model"] == model:
                return str(r["state"])
        return None

    def metric(self, name: str, **labels: str) -> float:
        total = 0.0
        for line in get(self.url + "/metrics", 5)[1].decode().splitlines():
            if line.split("{", 1)[0].split(" ", 1)[0] == name and all(
                f'{k}="{v}"' in line for k, v in labels.items()
            ):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def close(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(40)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.dir.cleanup()


def get(url: str, timeout: float) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return int(resp.status), resp.read()


class Call(threading.Thread):
    """One chat request in a thread: what came back (status, body) or how it failed, and when."""

    def __init__(self, url: str, model: str, timeout: float, *, stream: bool = False, max_tokens: int = 2000):
        super().__init__(daemon=True)
        self.args = (url, model, timeout, stream, max_tokens)
        self.began = time.monotonic()
        self.took = 0.0
        self.saw = "no answer"
        self.start()

    def run(self) -> None:
        url, model, timeout, stream, max_tokens = self.args
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens}
        if stream:
            body["stream"] = True
        req = urllib.request.Request(
            url + "/v1/chat/completions",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                data = resp.read()
                self.saw = f"{resp.status}" + (describe_stream(data) if stream else "")
        except urllib.error.HTTPError as exc:
            data = exc.read()
            try:
                err = json.loads(data)["error"]
                self.saw = f"{exc.code} {err['code']}: {err['message'][:90]}"
            except (ValueError, KeyError):
                self.saw = f"{exc.code} (not a JSON error)"
        except TimeoutError:
            self.saw = f"no answer after {timeout:g}s (client timeout)"
        except http.client.IncompleteRead as exc:
            self.saw = f"200, then a truncated body ({type(exc).__name__})"
        except (http.client.HTTPException, OSError) as exc:
            self.saw = f"connection closed, no HTTP response ({type(exc).__name__})"
        self.took = time.monotonic() - self.began

    def result(self) -> str:
        self.join()
        return f"{self.saw} [{self.took:.1f}s]"


def describe_stream(data: bytes) -> str:
    events = [e for e in data.split(b"\n\n") if e.startswith(b"data: ")]
    if events and events[-1] == b"data: [DONE]":
        return f", {len(events)} events, ends [DONE]"
    if events and events[-1].startswith(b'data: {"error"'):
        code = json.loads(events[-1][6:])["error"]["code"]
        return f", {len(events) - 1} events, then an error event ({code}) and a proper end"
    return f", {len(events)} events, no end"


def wait(cond: Any, within: float) -> None:
    deadline = time.monotonic() + within
    while not cond():
        if time.monotonic() > deadline:
            raise SystemExit("a case's set-up timed out")
        time.sleep(0.02)


def case_replay(checkout: Path, timeout: float) -> dict[str, Any]:
    sw = Swapper(checkout, config())
    try:
        Call(sw.url, "chat-a", 30, max_tokens=4).result()  # loaded
        pid = sw.pid("chat-a")
        starts = sw.metric("swapper_model_starts_total", model="chat-a", outcome="ready")
        call = Call(sw.url, "chat-a", timeout)
        time.sleep(0.5)  # a deliberate fault time: 0.5 s into the generation
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        seen = call.result()
        restarted = sw.metric("swapper_model_starts_total", model="chat-a", outcome="ready") - starts
        return {"client": seen, "children_started_during_the_request": restarted}
    finally:
        sw.close()


def case_hang(checkout: Path, timeout: float) -> dict[str, Any]:
    sw = Swapper(checkout, config())
    try:
        Call(sw.url, "chat-a", 30, max_tokens=4).result()
        pid = sw.pid("chat-a")
        assert pid is not None
        stream = Call(sw.url, "chat-a", timeout, stream=True)
        plain = Call(sw.url, "chat-a", timeout)
        time.sleep(0.3)  # both in flight
        os.kill(pid, signal.SIGSTOP)
        queued = Call(sw.url, "chat-b", timeout, max_tokens=4)
        time.sleep(1.0)
        state_after_1s = sw.state("chat-a")
        out = {
            "stream": stream.result(),
            "plain": plain.result(),
            "queued_other_model_maxWait_5": queued.result(),
            "running_1s_after_SIGSTOP": state_after_1s,
        }
        # Once more, for /unload: a stopped child with a request in flight.
        Call(sw.url, "chat-a", 30, max_tokens=4).result()
        pid = sw.pid("chat-a")
        assert pid is not None
        plain = Call(sw.url, "chat-a", timeout)
        time.sleep(0.3)
        os.kill(pid, signal.SIGSTOP)
        began = time.monotonic()
        get(sw.url + "/unload", 60)
        out["unload_of_a_stopped_child"] = f"{time.monotonic() - began:.1f}s"
        out["its_request"] = plain.result()
        kill_quietly(pid)
        return out
    finally:
        sw.close()


def kill_quietly(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def case_stderr(checkout: Path, timeout: float) -> dict[str, Any]:
    sw = Swapper(checkout, config("logToStdout: both"), stderr=subprocess.PIPE)
    try:
        began = time.monotonic()
        results: list[str] = []
        while len(results) < 300 and sum("no answer" in r for r in results) < 3:  # 3: it is stuck
            results.append(Call(sw.url, "chat-a", 5, max_tokens=4).result())
        return {
            "requests": len(results),
            "answered_200": sum(r.startswith("200") for r in results),
            "no_answer_in_5s": sum("no answer" in r for r in results),
            "took": f"{time.monotonic() - began:.1f}s",
        }
    finally:
        if sw.proc.stderr is not None:
            threading.Thread(target=sw.proc.stderr.read, daemon=True).start()  # let it exit
        sw.close()


def case_unload(checkout: Path, timeout: float) -> dict[str, Any]:
    sw = Swapper(checkout, config())
    try:
        Call(sw.url, "chat-a", 30, max_tokens=4).result()
        call = Call(sw.url, "chat-a", timeout)
        time.sleep(0.5)
        get(sw.url + "/unload", 60)
        return {"client": call.result()}
    finally:
        sw.close()


def case_crash_stream(checkout: Path, timeout: float) -> dict[str, Any]:
    sw = Swapper(checkout, config())
    try:
        Call(sw.url, "chat-a", 30, max_tokens=4).result()
        pid = sw.pid("chat-a")
        assert pid is not None
        ok_before = sw.metric("swapper_requests_total", model="chat-a", status="2xx")
        call = Call(sw.url, "chat-a", timeout, stream=True)
        time.sleep(0.5)
        os.kill(pid, signal.SIGKILL)
        seen = call.result()
        wait(lambda: sw.state("chat-a") in (None, "stopped"), 10)
        time.sleep(0.2)  # the track's end is recorded after the relay returns
        counted = sw.metric("swapper_requests_total", model="chat-a", status="2xx") - ok_before
        outcome = sw.metric("swapper_request_outcomes_total", model="chat-a", outcome="upstream_error")
        return {"client": seen, "counted_as_2xx": counted, "outcome_upstream_error": outcome}
    finally:
        sw.close()


def case_port(checkout: Path, timeout: float) -> dict[str, Any]:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "config.yaml"
            path.write_text(config())
            python = checkout / ".venv" / "bin" / "python"
            done = subprocess.run(
                [str(python), "-m", "swapper", "--config", str(path), "--listen", f"127.0.0.1:{port}"],
                cwd=checkout,
                capture_output=True,
                timeout=60,
                check=False,
            )
    lines = done.stderr.decode().strip().splitlines()
    return {"exit": done.returncode, "stderr_lines": len(lines), "last_line": lines[-1] if lines else ""}


CASES = {
    "replay": case_replay,
    "hang": case_hang,
    "stderr": case_stderr,
    "unload": case_unload,
    "crash-stream": case_crash_stream,
    "port": case_port,
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkout", type=Path, default=ROOT, help="the swapper checkout to run (its .venv)")
    p.add_argument("--client-timeout", type=float, default=45.0)
    p.add_argument("--case", action="append", choices=sorted(CASES), help="run only these (repeatable)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if not (DEMO / "bin" / "llama-server").exists():
        raise SystemExit("no .demo/bin/llama-server: run .venv/bin/python -m swapper.demo setup")
    report = {}
    for name in args.case or list(CASES):
        began = time.monotonic()
        report[name] = CASES[name](args.checkout.resolve(), args.client_timeout)
        if not args.json:
            print(f"{name:13} ({time.monotonic() - began:5.1f}s) {json.dumps(report[name])}", flush=True)
    if args.json:
        print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
