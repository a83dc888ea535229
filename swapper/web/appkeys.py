"""The aiohttp app's keys for the parts every handler reads: the config, the run loop, the
upstream session and the children's model facts.

Owns: nothing mutable (``app.server`` sets the values once, at start-up).
"""

from __future__ import annotations

import aiohttp
from aiohttp import web

from swapper.config.schema import Config
from swapper.observe.modelinfo import ModelInfo
from swapper.runtime.runloop import RunLoop

__all__ = ["CONFIG", "MODEL_INFO", "RUNLOOP", "SESSION"]

CONFIG = web.AppKey("config", Config)
RUNLOOP = web.AppKey("runloop", RunLoop)
SESSION = web.AppKey("session", aiohttp.ClientSession)
MODEL_INFO = web.AppKey("model_info", ModelInfo)
