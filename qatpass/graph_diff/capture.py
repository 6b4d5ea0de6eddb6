"""Capture the Dynamo graphs of a model as the qat4 backend sees them, before and after the pass.

`capture_graphs` runs `torch.compile(model, backend=recorder)` once on the example inputs. For each
Dynamo graph the recorder keeps the code and nodes, runs `QatBackend(config).transform` (the very
rewrite the backend does), keeps the code, nodes and GraphSummary after, and returns the rewritten
graph's forward (run eagerly, nothing is compiled). Graph breaks are read from Dynamo's counters.
Dynamo is reset before and after, so cached graphs of earlier compiles are neither reused nor kept;
the model itself is not modified.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch.fx as fx
from torch import nn

from qatpass.backend import QatBackend
from qatpass.config import QatConfig
from qatpass.graph_diff.structure import NodeSnapshot, snapshot
from qatpass.passes.weight_uses import param_fqn
from qatpass.report import GraphSummary
from qatpass.tracing import call_model, run_with_backend

__all__ = ["CapturedGraph", "GraphBreak", "Capture", "capture_graphs", "call_model"]


@dataclass
class CapturedGraph:
    """One Dynamo graph before and after the pass."""

    summary: GraphSummary
    before_code: str
    after_code: str
    before: list[NodeSnapshot]
    after: list[NodeSnapshot]
    params_before: dict[str, str]  # placeholder name -> parameter fqn
    params_after: dict[str, str]


@dataclass
class GraphBreak:
    reason: str  # first line of Dynamo's message
    count: int
    detail: str  # the whole message


@dataclass
class Capture:
    graphs: list[CapturedGraph] = field(default_factory=list)
    breaks: list[GraphBreak] = field(default_factory=list)

    @property
    def break_count(self) -> int:
        return sum(b.count for b in self.breaks)


def _placeholder_params(
    gm: fx.GraphModule, example_inputs: Sequence[Any], names: Mapping[int, str]
) -> dict[str, str]:
    """Placeholder name -> fqn, for the placeholders that are parameters of the model."""
    out = {}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for ph, example in zip(placeholders, example_inputs, strict=False):
        if isinstance(example, nn.Parameter):
            out[ph.name] = names.get(id(example)) or param_fqn(ph)
    return out


class _Recorder:
    """A torch.compile backend that applies the pass to each graph and records what it did."""

    def __init__(self, config: QatConfig, names: Mapping[int, str]) -> None:
        self.backend = QatBackend(config)
        self.names = names
        self.graphs: list[CapturedGraph] = []

    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence[Any]):
        before_code = gm.print_readable(print_output=False)
        before = snapshot(gm)
        params_before = _placeholder_params(gm, example_inputs, self.names)
        gm, summary = self.backend.transform(gm, example_inputs)
        self.graphs.append(
            CapturedGraph(
                summary=summary,
                before_code=before_code,
                after_code=gm.print_readable(print_output=False),
                before=before,
                after=snapshot(gm),
                params_before=params_before,
                params_after=_placeholder_params(gm, example_inputs, self.names),
            )
        )
        return gm.forward


def capture_graphs(model: nn.Module, example_inputs: Any, config: QatConfig) -> Capture:
    """Every graph Dynamo captures from one call of model on example_inputs, with the pass applied."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    names: dict[int, str] = {}
    for fqn, p in model.named_parameters(remove_duplicate=True):
        names.setdefault(id(p), fqn)
    recorder = _Recorder(config, names)
    breaks = run_with_backend(model, example_inputs, recorder)
    return Capture(
        graphs=recorder.graphs,
        breaks=[
            GraphBreak(reason=msg.strip().splitlines()[0], count=n, detail=msg.strip())
            for msg, n in breaks.items()
        ],
    )
