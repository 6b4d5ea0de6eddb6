"""Train-mode pass: fake-quantize every planned matmul weight right after its placeholder.

Before:                                   After:
    w = placeholder                           w = placeholder
    y = linear(x, w, b)                       w_fq = qatpass.fake_quantize_int4(w, group_size=32, dim=1, ...)
    z = bmm(h, w2[idx].transpose(1, 2))       y = linear(x, w_fq, b)   # every use of w reads w_fq
    e = embedding(ids, w3)                    e = embedding(ids, w3)   # (when w3 is planned)

Placeholders keep their number and order; a parameter used by several ops (tied weights) gets one
node. Every use of a planned weight reads the fake-quantized value except an embedding lookup:
serving packs the matmul, not the table, so the lookup stays high precision in both. Which
weights, along which dim, is the plan's decision (`passes/plan.py`); the op and its arguments
are the scheme's (`fake_quant_call`: `fake_quantize_fp4(w, fmt="nvfp4", dim=1)` for FP4).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensor

from qatpass.config import QatConfig
from qatpass.fake_quant import fake_quant_call
from qatpass.passes.plan import GraphWeight
from qatpass.passes.weight_uses import op_name

__all__ = ["insert_fake_quant"]

_EMBEDDING_OPS = ("embedding", "embedding_bag", "_embedding_bag")


def _fake_meta(fn, *args, **kwargs):
    """Run fn on the fake values of args to fill a new node's meta (None when unavailable)."""
    vals = [
        a.meta.get("example_value", a.meta.get("val")) if isinstance(a, fx.Node) else a
        for a in args
    ]
    fakes = [v for v in vals if isinstance(v, FakeTensor)]
    if not fakes:
        return None
    with fakes[0].fake_mode:
        return fn(*vals, **kwargs)


def _keeps_raw(user: fx.Node, fq: fx.Node) -> bool:
    return user is fq or (
        user.op in ("call_function", "call_method") and op_name(user) in _EMBEDDING_OPS
    )


def insert_fake_quant(gm: fx.GraphModule, targets: Sequence[GraphWeight], config: QatConfig) -> int:
    """Insert one fake-quant node per planned weight of gm; returns how many were inserted."""
    if not targets:
        return 0
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    op, kwargs_base = fake_quant_call(config.scheme)
    with gm.graph.inserting_after(placeholders[-1]):
        for t in reversed(targets):
            ph = t.info.placeholder
            kwargs = {**kwargs_base, "dim": t.dim}
            fq = gm.graph.create_node("call_function", op, (ph,), kwargs, name=f"{ph.name}_fq")
            ph.replace_all_uses_with(fq, delete_user_cb=lambda u, fq=fq: not _keeps_raw(u, fq))
            val = _fake_meta(op, ph, **kwargs)
            if val is not None:
                fq.meta["example_value"] = val
                fq.meta["val"] = val
    gm.graph.lint()
    gm.recompile()
    return len(targets)
