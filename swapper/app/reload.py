"""Config reload on SIGHUP or when the file changes (``--watch-config``).

Owns: the reload trigger and the file's last seen content. It loads and validates the new file
off to the side; only a config that loads and whose planner builds reaches the run loop, which
then restarts just the models whose settings changed. An invalid file is logged and the old
config keeps serving.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import structlog

from swapper.app import check
from swapper.app.preload import preload
from swapper.config.schema import ConfigError
from swapper.config.sources import ConfigSources
from swapper.core.states import State
from swapper.runtime.runloop import RunLoop

log = structlog.get_logger("swapper.app.reload")

POLL_SECONDS = 1.0


def _sources(where: Path | ConfigSources) -> ConfigSources:
    return where if isinstance(where, ConfigSources) else ConfigSources(where)


async def reload_once(where: Path | ConfigSources, runloop: RunLoop) -> frozenset[str] | None:
    """Loads the config and hands it to the run loop; returns the restarted models, None if invalid."""
    sources = _sources(where)
    path = sources.describe()
    try:
        config = await asyncio.to_thread(sources.load)
        changed = await runloop.reload(config)
    except (ConfigError, OSError, ValueError) as exc:
        log.error("config reload rejected; the old config keeps serving", path=path, error=str(exc))
        return None
    for warning in check.warnings(config):
        log.warning("config", warning=warning)
    log.info("config reloaded", path=path, restarted=sorted(changed))
    # Pinned services the new config added (or changed, so let go): adopted as at start-up.
    await preload(runloop, [m for m in config.pinned() if runloop.state(m) is State.STOPPED])
    return changed


async def watch_config(
    where: Path | ConfigSources, runloop: RunLoop, hup: asyncio.Event, *, poll: bool
) -> None:
    """Reloads on every ``hup`` and, with ``poll``, whenever the file's content changes.

    Polling the content (not inotify) works on every filesystem, including the bind mounts and
    ConfigMaps where llama-swap users saw events go missing; a whole-file hash ignores editors'
    touch-without-change saves.
    """
    sources = _sources(where)
    seen = sources.digest()
    while True:
        signalled = False
        try:
            async with asyncio.timeout(POLL_SECONDS if poll else None):
                await hup.wait()
            signalled = True
        except TimeoutError:
            pass
        hup.clear()
        current = await asyncio.to_thread(sources.digest)
        if current is None:
            continue  # mid-save or deleted: keep serving the old config
        if signalled or current != seen:
            seen = current
            await reload_once(sources, runloop)
