"""Which parameters of an eager nn.Module are quantized, without tracing it.

`qatpass.convert` and the exporters work on modules, not graphs. They use this selection, which
agrees with the graph pass on the models it knows: `nn.Linear` weights (reduction dim 1) and HF
transformers MoE experts' 3D parameters (`gate_up_proj`, `up_proj`, `down_proj`, [E, N, K], or
[E, K, N] when the experts module sets `is_transposed`). The same filters (include/exclude) and
shape checks apply; every skip has a reason.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from qatpass.config import QatConfig
from qatpass.scheme import check_quantizable

__all__ = [
    "SelectedWeight",
    "SkippedWeight",
    "EXPERT_PARAM_NAMES",
    "is_experts_module",
    "select_weights",
]

EXPERT_PARAM_NAMES = ("gate_up_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class SelectedWeight:
    fqn: str  # parameter name, e.g. "model.layers.0.mlp.experts.down_proj"
    module_name: str  # owning module, e.g. "model.layers.0.mlp.experts"
    attr: str  # parameter attribute on that module, e.g. "down_proj" or "weight"
    dim: int  # reduction dim (non-negative)
    kind: str  # "linear" or "experts"


@dataclass(frozen=True)
class SkippedWeight:
    fqn: str
    reason: str


def is_experts_module(module: nn.Module) -> bool:
    """An HF transformers MoE experts container: 3D expert parameters owned by one module."""
    params = dict(module.named_parameters(recurse=False))
    return any(name in params and params[name].dim() == 3 for name in EXPERT_PARAM_NAMES)


def _candidates(model: nn.Module):
    for mname, module in model.named_modules():
        prefix = f"{mname}." if mname else ""
        if isinstance(module, nn.Linear):
            yield prefix + "weight", mname, "weight", 1, "linear"
        elif is_experts_module(module):
            transposed = bool(getattr(module, "is_transposed", False))
            for attr, p in module.named_parameters(recurse=False):
                if attr in EXPERT_PARAM_NAMES and p.dim() == 3:
                    yield prefix + attr, mname, attr, 1 if transposed else 2, "experts"


def select_weights(
    model: nn.Module, config: QatConfig | None = None
) -> tuple[list[SelectedWeight], list[SkippedWeight]]:
    """The weights of `model` that qatpass quantizes under `config`, and those it leaves alone."""
    config = config or QatConfig()
    params = dict(model.named_parameters(remove_duplicate=False))
    selected: list[SelectedWeight] = []
    skipped: list[SkippedWeight] = []
    seen: set[int] = set()
    for fqn, mname, attr, dim, kind in _candidates(model):
        p = params.get(fqn)
        if p is None:
            continue
        reason = config.selects(fqn)
        if reason is None and p.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            reason = f"dtype {p.dtype} is not a float type"
        if reason is None:
            reason = check_quantizable(p.shape, dim, config.scheme)
        if reason is None and id(p) in seen:
            reason = "shares its tensor with a weight already selected (tied)"
        if reason is not None:
            skipped.append(SkippedWeight(fqn, reason))
            continue
        seen.add(id(p))
        selected.append(SelectedWeight(fqn, mname, attr, dim, kind))
    return selected, skipped
