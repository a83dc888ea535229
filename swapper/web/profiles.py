"""llama-swap's profile routes: ``GET /api/profiles`` and ``PUT /api/profiles/active``.

Owns nothing: the active profile lives in the run loop's ``Selection``; a switch is announced on
the bus (``profile_changed``), which ``/api/events`` streams as ``profileChanged``.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from swapper.core.errors import BadRequest, NotFound
from swapper.observe.events import EVENTS
from swapper.web.appkeys import RUNLOOP
from swapper.web.routes import error_response


async def handle_profiles(request: web.Request) -> web.Response:
    runloop = request.app[RUNLOOP]
    profiles = runloop.config.fleet.profiles
    listed = [
        {"id": p.id, "description": p.description, "pins": dict(p.pins)}
        for p in sorted(profiles.values(), key=lambda p: p.id)
    ]
    active = runloop.selection.active if runloop.selection.active in profiles else None
    return web.json_response({"active": active, "profiles": listed})


async def handle_set_active(request: web.Request) -> web.Response:
    runloop = request.app[RUNLOOP]
    try:
        body: Any = json.loads(await request.read() or b"null")
    except (ValueError, UnicodeDecodeError):
        return error_response(BadRequest("invalid profile request"))
    if not isinstance(body, dict):
        return error_response(BadRequest("invalid profile request"))
    if "name" not in body:
        return error_response(BadRequest("profile name is required"))
    name = body["name"]
    if name is not None and not isinstance(name, str):
        return error_response(BadRequest("profile name must be a string or null"))
    if name == "":
        name = None
    if name is not None and name not in runloop.config.fleet.profiles:
        return error_response(NotFound(f'profile "{name}" not found'))
    runloop.selection.active = name
    request.app[EVENTS].profile_changed(name)
    return web.json_response({"active": name})


def add_profile_routes(app: web.Application) -> None:
    app.router.add_get("/api/profiles", handle_profiles)
    app.router.add_put("/api/profiles/active", handle_set_active)
