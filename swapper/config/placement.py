"""Which GPUs a model lives on, before it ever ran: the memory planner plans each GPU on its own.

Why: with every GPU pooled into one device, a model on GPU 1 evicts a model on GPU 0 for nothing,
and a model that cannot fit on GPU 1 looks as if it fits. A model's GPUs come from, in order:

1. ``memory.devices`` in its config (``[1]``, ``[0, 1]``);
2. ``CUDA_VISIBLE_DEVICES`` in its ``env`` (indices; UUIDs are not understood and skip this step);
3. llama-server's flags: ``--device``/``-dev CUDA1,CUDA0``, ``--tensor-split``/``-ts 3,1`` (the
   GPUs with a share, and their shares), ``--split-mode none`` with ``--main-gpu``/``-mg N`` (that
   one GPU). They index the GPUs the process sees, so under step 2's list they pick from it;
4. after its first load, the GPUs NVML saw its processes hold memory on (``swapper.memory.ledger``).

With none of these, a model is placed on every GPU, split evenly: llama-server's own default
(``--split-mode layer`` over all visible devices), and the safe guess for anything else.

Indices are NVML's. ``CUDA_VISIBLE_DEVICES`` counts in CUDA's order, which is the same only with
``CUDA_DEVICE_ORDER=PCI_BUS_ID`` (set it, or use ``memory.devices``).

Owns: nothing mutable; pure functions of a ``ModelConfig``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

__all__ = ["Placement", "PlacementSource", "configured", "parse_devices", "split"]

PlacementSource = Literal["config", "env", "flags", "observed", "all"]


@dataclass(frozen=True, slots=True)
class Placement:
    """A model's GPUs (NVML indices, ascending) and the share of its footprint on each."""

    gpus: tuple[int, ...]
    weights: tuple[float, ...]  # one per GPU, summing to 1
    source: PlacementSource


def parse_devices(value: object, path: str) -> tuple[int, ...] | None:
    """``memory.devices``: a GPU index or a list of them. Raises ``ValueError`` naming ``path``."""
    if value is None:
        return None
    items = value if isinstance(value, list) else [value]
    out: list[int] = []
    for item in items:
        if isinstance(item, bool) or not isinstance(item, int) or item < 0:
            raise ValueError(f"{path}: must be a GPU index (0, 1, ...) or a list of them, got {item!r}")
        if item not in out:
            out.append(item)
    if not out:
        raise ValueError(f"{path}: must name at least one GPU")
    return tuple(sorted(out))


def configured(
    devices: tuple[int, ...] | None, env: Sequence[tuple[str, str]], argv: Sequence[str]
) -> Placement | None:
    """The placement steps 1-3 give (see the module doc), or None when none applies."""
    if devices:
        return _even(devices, "config")
    visible = _visible(env)
    picked = _from_flags(argv)
    if picked is not None:
        positions, weights = picked
        base = visible if visible is not None else None
        gpus = [base[p] if base is not None and p < len(base) else p for p in positions]
        if base is not None and any(p >= len(base) for p in positions):
            return _even(tuple(base), "env")  # the flags name a GPU the env hides: trust the env
        return _weighted(gpus, weights, "flags")
    if visible is not None:
        return _even(tuple(visible), "env")
    return None


def split(total: int, placement: Placement) -> dict[int, int]:
    """``total`` bytes shared out over the placement's GPUs by their weights."""
    shares = {gpu: int(total * w) for gpu, w in zip(placement.gpus, placement.weights, strict=True)}
    if shares:
        first = placement.gpus[0]
        shares[first] += total - sum(shares.values())  # rounding goes to one GPU
    return shares


def _even(gpus: Sequence[int], source: PlacementSource) -> Placement:
    ordered = tuple(sorted(set(gpus)))
    return Placement(ordered, tuple(1 / len(ordered) for _ in ordered), source)


def _weighted(gpus: Sequence[int], weights: Sequence[float], source: PlacementSource) -> Placement:
    totals: dict[int, float] = {}
    for gpu, w in zip(gpus, weights, strict=True):
        totals[gpu] = totals.get(gpu, 0.0) + w
    ordered = tuple(sorted(totals))
    whole = sum(totals.values())
    return Placement(ordered, tuple(totals[g] / whole for g in ordered), source)


def _visible(env: Sequence[tuple[str, str]]) -> list[int] | None:
    value = None
    for name, text in env:
        if name == "CUDA_VISIBLE_DEVICES":
            value = text
    if value is None:
        return None
    out: list[int] = []
    for part in value.split(","):
        part = part.strip()
        if not part:
            continue
        if not part.isdigit():
            return None  # GPU-... UUIDs or MIG ids: not indices
        out.append(int(part))
    return out or None


def _from_flags(argv: Sequence[str]) -> tuple[list[int], list[float]] | None:
    """(positions among the visible GPUs, their weights) from llama-server's flags, or None."""
    device = argv_option(argv, ("-dev", "--device"))
    if device is not None and device.lower() != "none":
        positions: list[int] = []
        for name in device.split(","):
            digits = name.strip().upper().removeprefix("CUDA")
            if not digits.isdigit():
                positions = []
                break
            positions.append(int(digits))
        if positions:
            return positions, [1.0] * len(positions)
    tensor_split = argv_option(argv, ("-ts", "--tensor-split"))
    if tensor_split is not None:
        try:
            shares = [float(x) for x in tensor_split.replace("/", ",").split(",") if x.strip()]
        except ValueError:
            shares = []
        picked = [(i, s) for i, s in enumerate(shares) if s > 0]
        if picked:
            return [i for i, _ in picked], [s for _, s in picked]
    split_mode = argv_option(argv, ("-sm", "--split-mode"))
    main_gpu = argv_option(argv, ("-mg", "--main-gpu"))
    if split_mode == "none" and main_gpu is not None and main_gpu.isdigit():
        return [int(main_gpu)], [1.0]
    return None


def argv_option(argv: Sequence[str], names: Sequence[str]) -> str | None:
    """The value of the last of ``names`` in ``argv`` (``-x v`` or ``--xx=v``), or None."""
    found = None
    for i, arg in enumerate(argv):
        if arg in names and i + 1 < len(argv):
            found = argv[i + 1]
        else:
            name, eq, value = arg.partition("=")
            if eq and name in names:
                found = value
    return found
