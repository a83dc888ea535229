"""What each llama-server child says about its model, for a model list a llama-server client reads.

Why: clients read llama-server's own fields in ``/v1/models`` (``meta.n_ctx_train``, ``n_ctx``,
``n_params``, ``tags``, the ``models`` array), for the context length for example. swapper's list
carries them for every model whose command runs llama-server: learned from the child's own
``/v1/models`` once it is ready, and remembered on disk (``model-info.json``, beside the memory
planner's footprints) so that a client sees them before the model's first load after a restart.

Owns: ``ModelInfo`` owns the learned records (model id → ``Learned``), its fetch tasks and the
file. It is an ``Observer`` on the event bus: ``child_ready`` starts one fetch task (never awaited
by the publisher); the task stores the record and writes the file in a thread. A record is used
only while the model's command is the one it was learned from (``ledger.fingerprint``), so a
changed ``-c`` or model file is never described by an old record.

Must not touch: children, the run loop, scheduling; a fetch is a direct GET to the child, not a
model request (it loads nothing and counts for no TTL).
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import aiohttp
import structlog

from swapper.config.schema import Config, ModelConfig
from swapper.memory.ledger import fingerprint
from swapper.observe.events import Observer

__all__ = ["FILE_NAME", "Learned", "ModelInfo", "default_path", "runs_llama_server"]

log = structlog.get_logger("swapper.observe.modelinfo")

FILE_NAME: Final = "model-info.json"
FETCH_TIMEOUT: Final = 5.0
VERSION: Final = 1


@dataclass(frozen=True, slots=True)
class Learned:
    """A child's ``data[0]`` and ``models[0]`` from its ``/v1/models``, and the command they fit."""

    cmd: str  # ledger.fingerprint of the command
    record: Mapping[str, Any]
    entry: Mapping[str, Any] | None


def default_path() -> Path:
    root = os.environ.get("SWAPPER_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "swapper"
    return base / FILE_NAME


def runs_llama_server(cfg: ModelConfig) -> bool:
    return any(os.path.basename(arg).startswith("llama-server") for arg in cfg.cmd[:2])


class ModelInfo(Observer):
    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.learned: dict[str, Learned] = read(path) if path is not None else {}
        self._config: Callable[[], Config] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def attach(self, config: Callable[[], Config], session: aiohttp.ClientSession) -> None:
        """Starts learning: where the current config is (a reload replaces it) and the session to
        ask children with."""
        self._config, self._session = config, session

    def get(self, model: str, cfg: ModelConfig) -> Learned | None:
        found = self.learned.get(model)
        return found if found is not None and found.cmd == fingerprint(cfg) else None

    def child_ready(self, model: str, load_seconds: float) -> None:
        config, session = self._config, self._session
        cfg = config().models.get(model) if config is not None else None
        if cfg is None or session is None or not runs_llama_server(cfg):
            return
        task = asyncio.get_running_loop().create_task(self._learn(session, model, cfg))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _learn(self, session: aiohttp.ClientSession, model: str, cfg: ModelConfig) -> None:
        url = cfg.proxy.rstrip("/") + "/v1/models"
        try:
            async with session.get(url, timeout=aiohttp.ClientTimeout(total=FETCH_TIMEOUT)) as resp:
                doc = await resp.json(content_type=None) if resp.status == 200 else None
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
            log.debug("model info not fetched", model=model, error=str(exc))
            return
        learned = parse(doc, fingerprint(cfg))
        if learned is None or self.learned.get(model) == learned:
            return
        self.learned[model] = learned
        if self.path is not None:
            try:
                await asyncio.to_thread(write, self.path, dict(self.learned))
            except OSError as exc:
                log.warning("model info not saved", path=str(self.path), error=str(exc))


def parse(doc: object, cmd: str) -> Learned | None:
    """llama-server's ``/v1/models`` answer as a ``Learned``; None for any other shape."""
    if not isinstance(doc, dict):
        return None
    data, models = doc.get("data"), doc.get("models")
    if not isinstance(data, list) or not data or not isinstance(data[0], dict):
        return None
    record = data[0]
    if not isinstance(record.get("meta"), dict):
        return None
    entry = models[0] if isinstance(models, list) and models and isinstance(models[0], dict) else None
    return Learned(cmd, record, entry)


def read(path: Path) -> dict[str, Learned]:
    """Records saved by ``write``; an absent or damaged file is an empty one."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        models = doc["models"] if doc.get("version") == VERSION else {}
        out = {}
        for mid, item in models.items():
            learned = parse({"data": [item["record"]], "models": [item["entry"]]}, str(item["cmd"]))
            if learned is not None:
                out[str(mid)] = learned
        return out
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        log.warning("ignoring unreadable model info file", path=str(path), error=str(exc))
        return {}


def write(path: Path, learned: Mapping[str, Learned]) -> None:
    """Atomically replaces ``path`` (blocking; run it in a thread)."""
    doc = {
        "version": VERSION,
        "models": {
            mid: {"cmd": item.cmd, "record": item.record, "entry": item.entry}
            for mid, item in sorted(learned.items())
        },
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)
