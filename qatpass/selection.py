"""Which parameters of an eager nn.Module are quantized, without tracing it.

A view of the plan that module types alone give (`qatpass.lowering.convert.module_plan`, the
policy of `qatpass.passes.plan`): nn.Linear and HF Conv1D weights and HF MoE experts' 3D
parameters, with the serving target of each. For weights only a graph shows (model code calling
`F.linear(x, self.w)`), trace: `qatpass.plan_for(model, example_inputs)`.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from qatpass.config import QatConfig
from qatpass.passes.plan import EXPERT_PARAM_NAMES, is_experts_module

__all__ = [
    "SelectedWeight",
    "SkippedWeight",
    "EXPERT_PARAM_NAMES",
    "is_experts_module",
    "select_weights",
]


@dataclass(frozen=True)
class SelectedWeight:
    fqn: str  # parameter name, e.g. "model.layers.0.mlp.experts.down_proj"
    module_name: str  # owning module, e.g. "model.layers.0.mlp.experts"
    attr: str  # parameter attribute on that module, e.g. "down_proj" or "weight"
    dim: int  # reduction dim (non-negative)
    kind: str  # "linear" (nn.Linear, Conv1D), "experts" or "tensor"


@dataclass(frozen=True)
class SkippedWeight:
    fqn: str
    reason: str


def select_weights(
    model: nn.Module, config: QatConfig | None = None
) -> tuple[list[SelectedWeight], list[SkippedWeight]]:
    """The weights of `model` that qatpass quantizes under `config`, and those it leaves alone."""
    from qatpass.lowering.convert import module_plan, serving_targets

    plan, _ = module_plan(model, config)
    selected = []
    for planned in plan.weights.values():
        for t in serving_targets(model, planned):
            selected.append(SelectedWeight(t.fqn, t.module_name, t.attr, planned.dim, t.kind))
    skipped = [SkippedWeight(s.fqn, s.reason) for s in plan.skipped.values()]
    return selected, skipped
