"""An aiohttp test server that listens through swapper's front door, as ``swapper`` does."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp.test_utils import TestServer
from yarl import URL

from swapper.app.site import FrontSite
from swapper.web.front import runner_options


class FrontTestServer(TestServer):
    """aiohttp's TestServer, listening through the front door (``FrontSite``) like ``serve``."""

    async def start_server(self, loop: asyncio.AbstractEventLoop | None = None, **kwargs: Any) -> None:
        if self.runner:
            return
        self._loop = loop
        self.runner = await self._make_runner(**{**runner_options(), **kwargs})
        await self.runner.setup()
        site = FrontSite(self.runner, "127.0.0.1", 0, grace=5.0)
        await site.start()
        self.front_site = site
        self.port = site.port
        self.scheme = "http"
        self._root = URL(f"http://127.0.0.1:{self.port}")
