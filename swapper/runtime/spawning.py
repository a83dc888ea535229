"""What the run loop's start tasks need beside the loop: stopping a child that may not have
spawned, and a child's health URL.

Owns: nothing.
"""

from __future__ import annotations

from swapper.runtime.children import Child
from swapper.runtime.services import Service


async def _stop_if_spawned(child: Child | Service, grace: float) -> None:
    # A binary that is missing or not executable never spawned: ``Child.stop`` would raise, and
    # the start would then never report ``Started`` (its waiters hung, the model stuck starting).
    if isinstance(child, Service):
        child.forget()  # a service that did not come up is not stopped: it may be coming up still
    elif child.pid is not None:
        await child.stop(grace=grace)


def _health_url(child: Child | Service) -> str | None:
    endpoint = child.model.check_endpoint
    return None if endpoint is None else child.model.proxy + endpoint
