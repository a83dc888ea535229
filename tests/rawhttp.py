"""Raw HTTP/1.1 over asyncio streams, for tests that need the bytes under their control: reading
one request (scripted test upstreams), and a raw client (requests built by hand, pipelining,
reading answers one by one)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp.test_utils import TestClient


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes] | None:
    """Returns (head incl. the blank line, body by Content-Length), or None once the peer left."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    return head, await reader.readexactly(length)


def chat(model: str = "m", *, stream: bool = False, extra_headers: str = "", **fields: Any) -> bytes:
    body = json.dumps(
        {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": stream, **fields}
    )
    return (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{extra_headers}"
        f"Content-Length: {len(body)}\r\n\r\n{body}"
    ).encode()


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One response: status, headers (lower-case names; a repeated name keeps its last value), body."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    if status == 100:
        return await read_response(reader)
    if "content-length" in headers:
        return status, headers, await reader.readexactly(int(headers["content-length"]))
    assert headers.get("transfer-encoding") == "chunked", headers
    body = b""
    while True:
        size = int((await reader.readuntil(b"\r\n")).strip(), 16)
        data = await reader.readexactly(size + 2)
        if size == 0:
            return status, headers, body
        body += data[:-2]


class Conn:
    """A raw client connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, client: TestClient[Any, Any]) -> Conn:
        return cls(*await asyncio.open_connection("127.0.0.1", client.port))

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def ask(self, data: bytes) -> tuple[int, dict[str, str], bytes]:
        await self.send(data)
        return await read_response(self.reader)

    def close(self) -> None:
        self.writer.close()
