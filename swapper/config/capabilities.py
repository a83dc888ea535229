"""A model's ``capabilities`` (llama-swap's key) and how ``/v1/models`` renders them.

Owns: nothing mutable. ``parse`` decodes the config block; ``render`` gives the record fields
OpenRouter-style clients read (``architecture``, ``capabilities``, ``supported_parameters``,
``context_length``), as llama-swap renders them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

MODALITIES = ("text", "audio", "image")
# Record fields the renderer owns: a model with capabilities drops user metadata of these names.
RENDERED_KEYS = frozenset({"architecture", "capabilities", "supported_parameters", "context_length"})


class CapabilityError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class Capabilities:
    inputs: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    tools: bool = False
    reranker: bool = False
    context: int = 0

    def empty(self) -> bool:
        return self == Capabilities()


def parse(raw: object) -> Capabilities:
    """``capabilities: {in, out, tools, reranker, context}``; raises CapabilityError (key: why)."""
    if raw is None:
        return Capabilities()
    if not isinstance(raw, dict):
        raise CapabilityError("must be a mapping")
    unknown = sorted(str(k) for k in raw if k not in ("in", "out", "tools", "reranker", "context"))
    if unknown:
        raise CapabilityError(f"unknown key '{unknown[0]}'")

    def modalities(key: str) -> tuple[str, ...]:
        value = raw.get(key) or []
        if not isinstance(value, list):
            raise CapabilityError(f"{key}: must be a list")
        for item in value:
            if item not in MODALITIES:
                raise CapabilityError(f"{key}: invalid modality {item!r}, must be one of: text, audio, image")
        return tuple(value)

    def flag(key: str) -> bool:
        value = raw.get(key, False)
        if not isinstance(value, bool):
            raise CapabilityError(f"{key}: must be true or false")
        return value

    context = raw.get("context", 0) or 0
    if isinstance(context, bool) or not isinstance(context, int) or context < 0:
        raise CapabilityError("context: must be an integer >= 0")
    return Capabilities(modalities("in"), modalities("out"), flag("tools"), flag("reranker"), context)


def render(caps: Capabilities) -> dict[str, Any]:
    """The ``/v1/models`` fields for ``caps`` (none for empty capabilities)."""
    out: dict[str, Any] = {}
    ins, outs = caps.inputs, caps.outputs
    if ins or outs:
        arch: dict[str, Any] = {}
        if ins:
            arch["input_modalities"] = list(ins)
        if outs:
            arch["output_modalities"] = list(outs)
        if ins and outs:
            arch["modality"] = "+".join(ins) + "->" + "+".join(outs)
        out["architecture"] = arch
    flags: dict[str, bool] = {}
    if "image" in ins:
        flags["vision"] = True
    if ins and outs:
        pairs = {
            "audio_transcriptions": ("audio", "text"),
            "audio_speech": ("text", "audio"),
            "image_generation": ("text", "image"),
            "image_to_image": ("image", "image"),
        }
        flags.update({name: True for name, (i, o) in pairs.items() if i in ins and o in outs})
    if caps.tools:
        flags["function_calling"] = True
        out["supported_parameters"] = ["tools", "tool_choice"]
    if caps.reranker:
        flags["reranker"] = True
    if ins or outs or caps.tools or caps.reranker:
        out["capabilities"] = flags
    if caps.context > 0:
        out["context_length"] = caps.context
    return out
