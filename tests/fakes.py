"""Recording fakes for the pure layers: no event loop, no processes, no sleeps."""

from __future__ import annotations

from dataclasses import dataclass, field

from swapper.config.schema import Config, ModelConfig
from swapper.core.errors import SwapperError
from swapper.planners import PlanView


def model(mid: str, **kw: object) -> ModelConfig:
    return ModelConfig(
        id=mid,
        cmd=("true",),
        cmd_text="true",
        proxy=f"http://127.0.0.1:9/{mid}",
        check_endpoint="/health",
        **kw,  # type: ignore[arg-type]
    )


def config(*models: ModelConfig, **kw: object) -> Config:
    return Config(models={m.id: m for m in models}, **kw)  # type: ignore[arg-type]


@dataclass
class FakeEffects:
    """Records every effect the scheduler asks for, in order."""

    starts: list[tuple[str, int]] = field(default_factory=list)
    stops: list[str] = field(default_factory=list)
    grants: list[int] = field(default_factory=list)
    failures: dict[int, SwapperError] = field(default_factory=dict)
    gone: set[int] = field(default_factory=set)  # requesters that left: grant() returns False
    log: list[str] = field(default_factory=list)

    def start_child(self, model: str, start_id: int) -> None:
        self.starts.append((model, start_id))
        self.log.append(f"start {model}")

    def stop_child(self, model: str, grace: float, *, cut: bool = True) -> None:
        self.stops.append(model)
        self.log.append(f"stop {model}")

    def grant(self, req_id: int, model: str) -> bool:
        if req_id in self.gone:
            return False
        self.grants.append(req_id)
        self.log.append(f"grant {req_id}")
        return True

    def fail(self, req_id: int, error: SwapperError) -> None:
        self.failures[req_id] = error
        self.log.append(f"fail {req_id}")

    def start_id(self, model: str) -> int:
        return [sid for m, sid in self.starts if m == model][-1]


class StubPlanner:
    """Evicts exactly what a table says (default: everything else, one model at a time)."""

    def __init__(self, table: dict[str, frozenset[str]] | None = None) -> None:
        self.table = table
        self.commits: list[tuple[str, frozenset[str]]] = []

    def evict_for(self, target: str, view: PlanView) -> frozenset[str]:
        if self.table is None:
            return view.running - {target}
        return self.table.get(target, frozenset()) & view.running

    def on_commit(self, target: str, evict: frozenset[str]) -> None:
        self.commits.append((target, evict))
