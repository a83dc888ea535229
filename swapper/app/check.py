"""A loaded config described for an operator: ``swapper check``'s report, every warning, and the
start-up line's summary.

Owns nothing mutable. It reads a ``Config`` and what a start would read besides: each model's
program on disk or on ``PATH``, and for the memory planner the state file, the model files'
headers and one memory sample (``MemoryMonitor.open``, as the run loop does before its first
decision). It binds no port and starts no child.

``warnings`` is the one list a start logs, a reload logs and ``check`` prints, so the three never
disagree; ``summary`` is the start-up line's content and the head of ``check``'s report.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from swapper.config.schema import Config, ModelConfig
from swapper.memory.ledger import human
from swapper.memory.monitor import load_ledger
from swapper.planners import Planner
from swapper.planners.build import make_planner

if TYPE_CHECKING:
    from swapper.planners.memory import MemoryPlanner


def warnings(config: Config) -> list[str]:
    """The config's own warnings (unsupported or unknown keys), then every program not found."""
    return [*config.warnings, *program_warnings(config)]


def program_warnings(config: Config) -> list[str]:
    """One line per model whose ``cmd`` (or ``cmdStop``) program cannot be run from here."""
    found = []
    for model_id, model in config.models.items():
        programs = [("cmd", model.cmd[0])] if model.cmd else []
        programs += [("cmdStop", model.cmd_stop[0])] if model.cmd_stop else []
        if model.service is not None:  # a service's own start and stop commands
            programs += [
                (key, argv[0])
                for key, argv in (("start", model.service.start), ("stop", model.service.stop))
                if argv
            ]
        for key, program in programs:
            problem = _program_problem(program, dict(model.env))
            if problem:
                found.append(f"models.{model_id}.{key}: program '{program}' {problem}")
    return found


def _program_problem(program: str, env: Mapping[str, str]) -> str | None:
    """Why ``program`` would not start, looked up as the child's exec does, or None."""
    if os.sep not in program:
        # The child searches its own PATH: the model's env may set one.
        path = env.get("PATH", os.environ.get("PATH", os.defpath))
        return None if shutil.which(program, path=path) else "not found on PATH"
    if not os.path.exists(program):
        # A relative path resolves against the directory swapper starts in (a unit's
        # WorkingDirectory), which is where this check looks too.
        where = "" if os.path.isabs(program) else f" (relative to {os.getcwd()})"
        return f"not found{where}"
    if os.path.isdir(program) or not os.access(program, os.X_OK):
        return "is not executable"
    return None


def summary(config: Config) -> dict[str, Any]:
    """What the start-up line says about ``config``: planner, how many models, auth."""
    return {
        "planner": config.routing.use,
        "models": len(config.models),
        "auth": "on" if config.api_keys else "off",
    }


def report(config: Config, path: str) -> str:
    """``swapper check``'s text: the summary, each model and its placement, every warning."""
    ledger = load_ledger(config) if config.routing.use == "memory" else None
    planner = make_planner(config, ledger=ledger)
    placement = _placement(config, planner)
    head = summary(config)
    lines = [
        f"config {path}: OK",
        f"planner: {head['planner']}" + placement.pop("", ""),
        f"auth: {head['auth']}" + _count(len(config.api_keys), "API key"),
        f"default model: {config.default_model or '(none)'}",
        f"preload: {', '.join(config.preload) or '(none)'}",
        f"models ({head['models']}):",
    ]
    for model_id, model in config.models.items():
        lines += _model_lines(model, placement.get(model_id, ""))
    lines += _fleet_lines(config)
    found = warnings(config)
    lines.append(f"warnings ({len(found)}):" if found else "warnings: none")
    lines += [f"  {w}" for w in found]
    return "\n".join(lines) + "\n"


def _fleet_lines(config: Config) -> list[str]:
    """Peers, selectors and profiles, when the config has any (the key is never shown)."""
    fleet, lines = config.fleet, []
    if fleet.peers:
        lines.append(f"peers ({len(fleet.peers)}):")
        for peer in fleet.peers.values():
            key = ", API key set" if peer.api_key else ""
            lines.append(f"  {peer.id}: {peer.proxy}{key}")
            lines.append(f"    models: {', '.join(peer.models)}")
    if fleet.selectors:
        lines.append(f"selectors ({len(fleet.selectors)}):")
        for sel in fleet.selectors.values():
            extra = f" (spillover {sel.spillover})" if sel.strategy == "spillover" else ""
            lines.append(f"  {sel.id}: {sel.strategy}{extra} over {', '.join(sel.targets)}")
    if fleet.profiles:
        lines.append(f"profiles ({len(fleet.profiles)}):")
        for profile in fleet.profiles.values():
            pins = ", ".join(f"{name} -> {target or '(disabled)'}" for name, target in profile.pins.items())
            lines.append(f"  {profile.id}: {pins}")
    return lines


def _count(n: int, what: str) -> str:
    return f" ({n} {what}{'' if n == 1 else 's'})" if n else ""


def _model_lines(model: ModelConfig, placement: str) -> list[str]:
    title = f"  {model.id}" + (f" ({model.name})" if model.name else "")
    svc = model.service
    lines = [
        title,
        f"    cmd: {model.cmd_text}"
        if svc is None
        else "    service: not run by swapper"
        + (", swappable" if svc.swappable else ", pinned (never stopped)"),
        f"    proxy: {model.proxy}" + (f" (port {model.port})" if model.port is not None else ""),
    ]
    if svc is not None:
        lines += [
            f"    {key}: {' '.join(argv)}" for key, argv in (("start", svc.start), ("stop", svc.stop)) if argv
        ]
    if model.aliases:
        lines.append(f"    aliases: {', '.join(model.aliases)}")
    if model.cmd_stop:
        lines.append(f"    cmdStop: {' '.join(model.cmd_stop)}")
    if model.ttl:
        lines.append(f"    ttl: {model.ttl:g} s")
    if placement:
        lines.append(f"    {placement}")
    return lines


def _placement(config: Config, planner: Planner) -> dict[str, str]:
    """Per model id, where the planner puts it; key "" is a note for the planner line."""
    from swapper.planners import Pinning
    from swapper.planners.group import GroupPlanner
    from swapper.planners.matrix import MatrixPlanner
    from swapper.planners.memory import MemoryPlanner

    if isinstance(planner, Pinning):
        placed = _placement(config, planner.inner)
        return placed | {
            m: f"{placed[m]}; never evicted" if m in placed else "never evicted" for m in planner.pinned
        }
    if isinstance(planner, GroupPlanner):
        out = {}
        for model_id in config.models:
            group = planner.group_of(model_id)
            flags = (("swap", group.swap), ("exclusive", group.exclusive), ("persistent", group.persistent))
            said = ", ".join(f"{flag}: {'yes' if on else 'no'}" for flag, on in flags)
            out[model_id] = f"group: {group.name} ({said})"
        return out
    if isinstance(planner, MatrixPlanner):
        matrix = planner.matrix
        out = {}
        for model_id in config.models:
            sets = [name for name in matrix.order if matrix.mentions(name, model_id)]
            where = ", ".join(sets) if sets else "(none: runs alone)"
            out[model_id] = f"matrix sets: {where}; evict cost {matrix.cost(model_id)}"
        return out
    if isinstance(planner, MemoryPlanner):
        return _memory_placement(planner, config)
    return {}


def _memory_placement(planner: MemoryPlanner, config: Config) -> dict[str, str]:
    from swapper.memory.gpu import SystemSampler
    from swapper.memory.monitor import MemoryMonitor

    sampler = SystemSampler()
    # The sample a start takes before its first decision decides "auto" devices (GPU or RAM);
    # this monitor shares the planner's ledger but never persists anything.
    try:
        asyncio.run(MemoryMonitor(planner.ledger, sampler, None).open(lambda: {}))
    finally:
        sampler.close()
    status = planner.ledger.status()
    out = {"": _memory_note(status, config.routing.memory.gpu_budget is not None)}
    for model_id, m in status["models"].items():
        source = m["source"] if m["source"] == "measured" else f"{m['source']}: {m['estimate_detail']}"
        out[model_id] = f"memory: {m['device']}, footprint {human(m['footprint'])} ({source})"
    return out


def _memory_note(status: Mapping[str, Any], gpu_budget: bool) -> str:
    if status["nvml"]:
        gpus = ", ".join(f"{g['name']} {human(g['total'])}" for g in status["gpus"] if g["name"] is not None)
        return f" (GPUs: {gpus})"
    reason = status["nvml_unavailable_reason"]
    if gpu_budget:
        return f" ({reason}; GPU models are planned against gpuBudget)"
    return f" ({reason}; every model is accounted in system RAM)"
