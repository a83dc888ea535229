"""``GET /v1/models``: local models (and their aliases), peer models, selectors and the active
profile's pins, in llama-swap's record shape.

Owns: nothing mutable; a function of the config, the run loop's advisory states and the active
profile. Each record carries ``meta.llamaswap`` (llama-swap's clients read it) and the same under
``meta.swapper``; ``capabilities`` render as llama-swap renders them, ``context_length`` included.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final

from swapper.config import capabilities
from swapper.core.states import State

if TYPE_CHECKING:
    from swapper.config.schema import ModelConfig
    from swapper.observe.modelinfo import Learned, ModelInfo
    from swapper.runtime.runloop import RunLoop

# llama-server's ``models`` entry for a model it has not described (yet): its shape, no facts.
_BLANK_ENTRY: Final = {
    "modified_at": "",
    "size": "",
    "digest": "",
    "type": "model",
    "description": "",
    "tags": [""],
    "capabilities": ["completion"],
    "parameters": "",
    "details": {
        "parent_model": "",
        "format": "gguf",
        "family": "",
        "families": [""],
        "parameter_size": "",
        "quantization_level": "",
    },
}


def _record(
    rid: str,
    now: int,
    status: str,
    internal: Mapping[str, Any],
    *,
    name: str = "",
    description: str = "",
    metadata: Mapping[str, Any] | None = None,
    caps: capabilities.Capabilities | None = None,
) -> dict[str, Any]:
    record: dict[str, Any] = {"id": rid, "object": "model", "created": now, "owned_by": "swapper"}
    if name.strip():
        record["name"] = name.strip()
    if description.strip():
        record["description"] = description.strip()
    user = dict(metadata or {})
    if caps is not None and not caps.empty():
        record.update(capabilities.render(caps))
        user = {k: v for k, v in user.items() if k not in capabilities.RENDERED_KEYS}
    meta_inner = {**user, **internal}
    meta: dict[str, Any] = {"llamaswap": meta_inner, "swapper": meta_inner}
    if "context_length" in record:
        meta["n_ctx"] = record["context_length"]
    record["meta"] = meta
    record["status"] = {"value": status}
    return record


def _with_facts(record: dict[str, Any], cfg: ModelConfig, learned: Learned | None) -> dict[str, Any]:
    """llama-server's fields for a local model (what its child said, ``modelinfo``) under ours."""
    facts = learned.record if learned is not None else {}
    meta = {**(facts.get("meta") or {}), **record["meta"]}
    tags = list(facts.get("tags") or [])
    return {**facts, **record, "aliases": list(cfg.aliases), "tags": tags, "meta": meta}


def model_list(runloop: RunLoop, info: ModelInfo | None = None) -> dict[str, Any]:
    """The body of ``GET /v1/models``, sorted by id: llama-server's shape (``data`` with ``aliases``,
    ``tags``, ``meta``; the ``models`` array), its facts from ``info`` (what each child said)."""
    config = runloop.config
    fleet = config.fleet
    states = {m: snap.status.state for m, snap in runloop.snapshot().items()}
    now = int(time.time())
    data: list[dict[str, Any]] = []
    entries: list[dict[str, Any]] = []
    taken: set[str] = set()
    for mid, cfg in config.models.items():
        taken.add(mid)
        taken.update(cfg.aliases)
        if cfg.unlisted:
            continue
        status = "unloaded" if states.get(mid, State.STOPPED) is State.STOPPED else "loaded"
        learned = info.get(mid, cfg) if info is not None else None
        entry = learned.entry if learned is not None and learned.entry is not None else _BLANK_ENTRY
        entries.append({**entry, "name": mid, "model": mid})
        for rid, internal in [(mid, {"type": "model", "aliases": list(cfg.aliases)})] + (
            [(alias, {"type": "alias", "modelID": mid}) for alias in cfg.aliases]
            if config.include_aliases_in_list
            else []
        ):
            record = _record(
                rid,
                now,
                status,
                internal,
                name=cfg.name,
                description=cfg.description,
                metadata=cfg.metadata,
                caps=cfg.capabilities,
            )
            data.append(_with_facts(record, cfg, learned))
    for pm in fleet.peer_models():
        taken.add(pm.fqn)
        if fleet.peer_model(pm.model) == pm:
            taken.add(pm.model)
        peer_meta = {"type": "peer", "peerID": pm.peer, "modelID": pm.model}
        data.append(_record(pm.fqn, now, "unloaded", peer_meta, name=f"{pm.peer}: {pm.model}"))
    for sel in fleet.selectors.values():
        taken.add(sel.id)
        if sel.unlisted:
            continue
        status = "unloaded"
        for target in sel.targets:
            if states.get(config.resolve(target) or "") in (State.READY, State.STARTING):
                status = "loaded"
            if sel.strategy == "pin" or status == "loaded":
                break
        sel_meta: dict[str, Any] = {
            "type": "selector",
            "strategy": sel.strategy,
            "targets": list(sel.targets),
        }
        if sel.strategy == "spillover":
            sel_meta["spillover"] = sel.spillover
        data.append(
            _record(
                sel.id,
                now,
                status,
                sel_meta,
                name=sel.name,
                description=sel.description,
                metadata=sel.metadata,
            )
        )
    profile = runloop.selection.profile(config)
    if profile is not None:
        for pin, target in profile.pins.items():
            if target and pin not in taken:
                data.append(_record(pin, now, "unloaded", {"type": "profile"}))
    data.sort(key=lambda r: str(r["id"]))
    entries.sort(key=lambda e: str(e["name"]))
    return {"models": entries, "object": "list", "data": data}
