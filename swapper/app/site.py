"""The listening site that puts the front door on a socket (``FrontSite``) and the aiohttp
runner options it needs.

Owns: the listening socket, from ``start`` to ``stop``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from typing import cast

from aiohttp import web

from swapper.web.front import Front


class FrontSite(web.BaseSite):
    """A TCP site whose connections start on the front door (``Front``), not on aiohttp.

    ``stop()`` stops listening, closes idle fast-path connections, and waits up to ``grace``
    seconds for fast requests in service to finish, before the runner drains aiohttp's own.
    """

    __slots__ = ("_front", "_grace", "_host", "_listener", "_port")

    def __init__(
        self,
        runner: web.AppRunner,
        host: str,
        port: int,
        *,
        grace: float,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        super().__init__(runner, ssl_context=ssl_context)
        self._host = host
        self._port = port
        self._grace = grace
        self._front: Front | None = None
        self._listener: asyncio.Server | None = None

    @property
    def name(self) -> str:
        scheme = "https" if self._ssl_context is not None else "http"
        return f"{scheme}://{self._host}:{self._port}"

    @property
    def front(self) -> Front:
        assert self._front is not None, "start() first"
        return self._front

    @property
    def port(self) -> int:
        """The bound port (useful with port 0)."""
        assert self._listener is not None and self._listener.sockets, "start() first"
        return int(self._listener.sockets[0].getsockname()[1])

    async def start(self) -> None:
        await super().start()
        runner = cast(web.AppRunner, self._runner)
        server = runner.server
        assert server is not None
        self._front = Front(runner.app, server)
        self._front.sweep()
        self._listener = await asyncio.get_running_loop().create_server(
            self._front,
            self._host or None,  # "" (Go's ":8080") binds every interface
            self._port,
            reuse_address=True,
            backlog=self._backlog,
            ssl=self._ssl_context,
        )
        self._server = self._listener

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        if self._front is not None:
            self._front.begin_shutdown()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._grace):
                    await self._front.wait_drained()
            self._front.abort_idle()
        await super().stop()
