"""Train-mode pass: fake-quantize every selected matmul weight right after its placeholder.

Before:                                   After:
    w = placeholder                           w = placeholder
    y = linear(x, w, b)                       w_fq = qatpass.fake_quantize_int4(w, group_size=32, dim=1, ...)
    z = bmm(h, w2[idx].transpose(1, 2))       y = linear(x, w_fq, b)   # every use of w reads w_fq

Placeholders keep their number and order; a parameter used by several ops (tied weights) gets one
node. `plan_weights` decides what is quantized (shared with the inference lowering and the diff).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensor

from qatpass.config import QatConfig
from qatpass.fake_quant import scheme_kwargs
from qatpass.passes.weight_uses import ParamInfo, find_weight_uses
from qatpass.report import GraphSummary, QuantizedParam, SkippedParam, next_graph_id
from qatpass.scheme import check_quantizable

__all__ = ["PlannedWeight", "plan_weights", "insert_fake_quant"]

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


@dataclass
class PlannedWeight:
    info: ParamInfo
    dim: int

    @property
    def fqn(self) -> str:
        return self.info.fqn


def _check_finite(info: ParamInfo, example: object) -> None:
    if isinstance(example, torch.Tensor) and not isinstance(example, FakeTensor):
        if example.device.type != "meta" and not bool(torch.isfinite(example.detach()).all()):
            bad = int((~torch.isfinite(example.detach())).sum())
            raise ValueError(
                f"qat4: parameter {info.fqn} {tuple(info.shape)} has {bad} non-finite value(s) "
                "(NaN/Inf); refusing to fake-quantize it (the whole group would turn NaN)"
            )


def plan_weights(
    gm: fx.GraphModule,
    example_inputs: Sequence[object] | None,
    config: QatConfig,
    mode: str | None = None,
) -> tuple[list[PlannedWeight], GraphSummary]:
    """Which parameters of gm to quantize, along which dim; a summary with every skip's reason."""
    summary = GraphSummary(graph_id=next_graph_id(), mode=mode or config.mode)
    planned: list[PlannedWeight] = []
    examples = list(example_inputs) if example_inputs is not None else []
    for info in find_weight_uses(gm, example_inputs):
        shape = info.shape
        if not info.uses:
            why = "not a matmul weight" + (
                f" (used by {', '.join(info.other_uses)})" if info.other_uses else ""
            )
            summary.skipped.append(SkippedParam(info.fqn, shape, why, matmul_weight=False))
            continue
        reason = config.selects(info.fqn)
        if reason is None and len(info.dims) > 1:
            reason = f"used with different reduction dims {sorted(info.dims)}"
        if reason is None and info.dtype not in _FLOATS:
            reason = f"dtype {info.dtype} is not a float type"
        dim = next(iter(info.dims))
        if reason is None:
            reason = check_quantizable(shape, dim, config.scheme)
        if reason is not None:
            summary.skipped.append(SkippedParam(info.fqn, shape, reason, matmul_weight=True))
            continue
        if info.index < len(examples):
            _check_finite(info, examples[info.index])
        planned.append(PlannedWeight(info, dim))
        summary.quantized.append(
            QuantizedParam(
                info.fqn,
                shape,
                dim,
                config.scheme.group_size_for(shape[dim]),
                sorted({u.op for u in info.uses}),
            )
        )
    return planned, summary


def _fake_meta(node: fx.Node, fn, *args, **kwargs):
    """Run fn on the fake values of args to fill a new node's meta (None when unavailable)."""
    vals = [
        a.meta.get("example_value", a.meta.get("val")) if isinstance(a, fx.Node) else a
        for a in args
    ]
    fakes = [v for v in vals if isinstance(v, FakeTensor)]
    if not fakes:
        return None
    mode = fakes[0].fake_mode
    with mode:
        return fn(*vals, **kwargs)


def insert_fake_quant(
    gm: fx.GraphModule, planned: Sequence[PlannedWeight], config: QatConfig
) -> int:
    """Insert one fake-quant node per planned parameter; returns how many were inserted."""
    if not planned:
        return 0
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    op = torch.ops.qatpass.fake_quantize_int4.default
    kwargs_base = scheme_kwargs(config.scheme)
    with gm.graph.inserting_after(placeholders[-1]):
        for p in reversed(planned):
            ph = p.info.placeholder
            kwargs = {**kwargs_base, "dim": p.dim}
            fq = gm.graph.create_node("call_function", op, (ph,), kwargs, name=f"{ph.name}_fq")
            ph.replace_all_uses_with(fq, delete_user_cb=lambda user, fq=fq: user is not fq)
            val = _fake_meta(fq, op, ph, **kwargs)
            if val is not None:
                fq.meta["example_value"] = val
                fq.meta["val"] = val
    gm.graph.lint()
    gm.recompile()
    return len(planned)
