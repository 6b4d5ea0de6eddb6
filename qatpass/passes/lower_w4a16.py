"""Inference-mode pass: matmuls on planned parameters become W4A16 ops on packed constants.

Before:                                   After:
    w = placeholder                           w = placeholder              # kept, now unused
    y = linear(x, w, b)                       y = qatpass.w4a16_linear(x, qweight, scales, ...)
    s = w2[ids]; z = bmm(s, h)                z = unsqueeze(qatpass.w4a16_grouped_linear(
                                                      squeeze(h, -1), ..., ids), -1)
    z = grouped_mm(h, w2.transpose(-2, -1),   ids = clamp(searchsorted(offs, arange(rows)))
                   offs=offs)                 z = qatpass.w4a16_grouped_linear(h, ..., ids)

The packed constants are quantized once, here, from the parameter's value (`example_inputs` holds
the real nn.Parameter), and live in `PackedConstant` submodules of a fresh GraphModule (the Dynamo
GraphModule gets no new attributes: Inductor checks its parameters against Dynamo's sources).
(FP4 schemes get `qatpass.fp4_linear` / `fp4_grouped_linear`: `lowering.ops.serving(scheme)`.)
Placeholders keep their number and order. A use no pattern matches (a parameter behind other view
ops, say) gets the training fake quant instead, which computes the same numbers unpacked, so no
planned weight ever runs in high precision. `refresh_compiled()` repacks every lowered constant
in place from its parameter's current value (the RL weight-sync loop).
"""

from __future__ import annotations

import logging
import re
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from qatpass.config import QatConfig
from qatpass.lowering import ops as _ops
from qatpass.lowering.modules import PackedConstant, write_packed_
from qatpass.passes.insert_fake_quant import _EMBEDDING_OPS, insert_fake_quant
from qatpass.passes.plan import GraphWeight
from qatpass.passes.weight_uses import op_name
from qatpass.scheme import PackedWeight, QuantScheme, quantize

__all__ = ["lower_graph", "refresh_compiled", "lowered_fqns"]

log = logging.getLogger("qatpass")

_GROUPED_MM = ("_grouped_mm", "grouped_mm", "transformers::grouped_mm_fallback")
_TRANSPOSES = ("transpose", "mT")


@dataclass
class _LoweredWeight:
    """Weak handles on one lowered weight: its parameter and the packed tensors a graph reads.

    The compiled graph owns the tensors (Inductor keeps the tensors, not the module); the entry
    dies with them.
    """

    fqn: str
    source: weakref.ref
    tensors: dict[str, weakref.ref]
    scheme: QuantScheme
    dim: int

    def qweight(self) -> torch.Tensor | None:
        return self.tensors["qweight"]()

    def repack(self, weight: torch.Tensor) -> None:
        live = {k: r() for k, r in self.tensors.items()}
        if any(t is None for t in live.values()):
            return
        p = quantize(weight.detach().to(live["qweight"].device), self.scheme, self.dim)
        dst = PackedWeight(live["qweight"], live["scales"], live.get("zeros"), p.shape, p.dim,
                           p.dtype, p.scheme, live.get("global_scale"))  # fmt: skip
        write_packed_(dst, p)


# Every weight a live lowered graph holds, weakly (see _LoweredWeight).
_LOWERED: list[_LoweredWeight] = []


def _val(node: Any) -> Any:
    return (
        node.meta.get("example_value", node.meta.get("val")) if isinstance(node, fx.Node) else None
    )


def _arg(node: fx.Node, index: int, name: str) -> Any:
    return node.args[index] if len(node.args) > index else node.kwargs.get(name)


def _is_last_two_transpose(node: Any, ph: fx.Node) -> bool:
    """node is ph with its last two dims swapped (transpose(-2, -1), transpose(1, 2), .mT)."""
    if not isinstance(node, fx.Node) or op_name(node) not in _TRANSPOSES or node.args[0] is not ph:
        return False
    if op_name(node) == "mT":
        return True
    dims = (
        node.args[1:3]
        if len(node.args) >= 3
        else (node.kwargs.get("dim0"), node.kwargs.get("dim1"))
    )
    rank = len(_val(ph).shape) if _val(ph) is not None else 3
    return {d % rank for d in dims if isinstance(d, int)} == {rank - 2, rank - 1}


class _Lowering:
    """State of one graph's lowering: the new root module and the constants made so far."""

    def __init__(self, gm: fx.GraphModule, config: QatConfig) -> None:
        self.gm = gm
        self.graph = gm.graph
        self.config = config
        self.root = nn.Module()
        self.count = 0

    def constant(self, p: GraphWeight, value: torch.Tensor) -> tuple[str, PackedConstant]:
        packed = quantize(value.detach(), self.config.scheme, dim=p.dim)
        holder = PackedConstant(packed)
        name = "qatpass_" + re.sub(r"\W", "_", p.fqn)
        self.root.add_module(name, holder)
        tensors = {
            k: weakref.ref(t)
            for k in ("qweight", "scales", "zeros", "global_scale")
            if (t := getattr(holder, k)) is not None
        }
        _LOWERED.append(_LoweredWeight(p.fqn, weakref.ref(value), tensors, packed.scheme, p.dim))
        return name, holder

    def attrs(self, name: str, holder: PackedConstant) -> list[Any]:
        """get_attr nodes for the serving op's three tensor arguments (None stays None)."""
        out: list[Any] = []
        for key in _ops.serving(holder.scheme).tensors:
            if getattr(holder, key) is None:
                out.append(None)
            else:
                # create_node, not get_attr: the target exists on the rebuilt module only
                out.append(self.graph.create_node("get_attr", f"{name}.{key}"))
        return out

    def call(self, target: Any, args: tuple, kwargs: dict, like: Any = None) -> fx.Node:
        node = self.graph.call_function(target, args, kwargs)
        if like is not None:
            node.meta["example_value"] = like
        return node

    def linear(self, node: fx.Node, name: str, holder: PackedConstant) -> None:
        x, bias = _arg(node, 0, "input"), _arg(node, 2, "bias")
        with self.graph.inserting_before(node):
            new = self.packed_linear(x, bias, name, holder, _val(node))
        node.replace_all_uses_with(new)
        self.graph.erase_node(node)

    def addmm(self, node: fx.Node, name: str, holder: PackedConstant) -> None:
        """addmm(bias, x, w) with w [K, N] reduced along dim 0: x @ W.T + bias, W = w.T."""
        bias, x = node.args[0], node.args[1]
        if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
            return
        with self.graph.inserting_before(node):
            new = self.packed_linear(x, bias, name, holder, _val(node))
        node.replace_all_uses_with(new)
        self.graph.erase_node(node)

    def packed_linear(self, x: Any, bias: Any, name: str, holder: PackedConstant, like: Any):
        s = _ops.serving(holder.scheme)
        a, b, c = self.attrs(name, holder)
        return self.call(s.linear_op, (x, a, b, c, bias), dict(holder.op_kwargs), like)

    def grouped(self, x: Any, ids: Any, name: str, holder: PackedConstant) -> fx.Node:
        s = _ops.serving(holder.scheme)
        a, b, c = self.attrs(name, holder)
        return self.call(s.grouped_op, (x, a, b, ids, c, None), dict(holder.op_kwargs))

    def bmm(self, node: fx.Node, ph: fx.Node, p: GraphWeight, name: str, holder) -> bool:
        """bmm(w[ids], x.unsqueeze(-1)) (w [E, N, K]) or bmm(x.unsqueeze(1), w[ids]) ([E, K, N])."""
        lhs, rhs = node.args[0], node.args[1]
        for sel, other, squeeze, want_dim in ((lhs, rhs, -1, 2), (rhs, lhs, 1, 1)):
            if not (isinstance(sel, fx.Node) and op_name(sel) == "getitem" and sel.args[0] is ph):
                continue
            ids, ov = sel.args[1], _val(other)
            if p.dim != want_dim or not isinstance(ids, fx.Node) or ov is None:
                return False
            iv = _val(ids)
            if iv is None or iv.dim() != 1 or iv.dtype not in (torch.int32, torch.int64):
                return False
            if ov.dim() != 3 or ov.shape[squeeze] != 1:
                return False
            with self.graph.inserting_before(node):
                x = self.call(torch.squeeze, (other, squeeze), {})
                y = self.grouped(x, ids, name, holder)
                new = self.call(torch.unsqueeze, (y, squeeze), {}, _val(node))
            node.replace_all_uses_with(new)
            self.graph.erase_node(node)
            return True
        return False

    def grouped_mm(self, node: fx.Node, ph: fx.Node, p: GraphWeight, name: str, holder) -> bool:
        """grouped_mm(x, w.transpose(-2, -1) or w, offs): rows sorted by expert, offsets given."""
        x, w, offs = node.args[0], node.args[1], _arg(node, 2, "offs")
        if node.kwargs.get("bias") is not None or node.kwargs.get("out_dtype") is not None:
            return False
        layout_ok = (w is ph and p.dim == 1) or (_is_last_two_transpose(w, ph) and p.dim == 2)
        xv = _val(x)
        if not layout_ok or not isinstance(offs, fx.Node) or xv is None or xv.dim() != 2:
            return False
        num_experts = _val(ph).shape[0]
        with self.graph.inserting_before(node):
            rows = self.call(torch.ops.aten.sym_size.int, (x, 0), {})
            ov = _val(offs)
            arange = self.call(
                torch.arange,
                (rows,),
                {"device": xv.device, "dtype": ov.dtype if ov is not None else torch.int32},
            )
            ids = self.call(torch.searchsorted, (offs, arange), {"right": True})
            ids = self.call(torch.clamp, (ids,), {"max": num_experts - 1})
            new = self.grouped(x, ids, name, holder)
            new.meta["example_value"] = _val(node)
        node.replace_all_uses_with(new)
        self.graph.erase_node(node)
        return True


def lower_graph(
    gm: fx.GraphModule,
    example_inputs: Sequence[Any],
    planned: Sequence[GraphWeight],
    config: QatConfig,
) -> fx.GraphModule:
    """A new GraphModule computing gm with the planned weights' matmuls on packed constants."""
    lowering = _Lowering(gm, config)
    examples = list(example_inputs)
    leftovers: list[GraphWeight] = []
    for p in planned:
        ph = p.info.placeholder
        value = examples[p.info.index] if p.info.index < len(examples) else None
        if not isinstance(value, torch.Tensor) or _is_fake(value):
            log.warning("qat4 inference: %s has no real value at compile time; fake quant", p.fqn)
            leftovers.append(p)
            continue
        name, holder = lowering.constant(p, value)
        for user in list(ph.users):
            kind = op_name(user) if user.op in ("call_function", "call_method") else None
            if kind == "linear" and _arg(user, 1, "weight") is ph and p.dim == 1:
                lowering.linear(user, name, holder)
            elif kind == "addmm" and len(user.args) == 3 and user.args[2] is ph and p.dim == 0:
                lowering.addmm(user, name, holder)  # HF Conv1D: addmm(bias, x, w [K, N])
            elif kind == "getitem":
                for mm in list(user.users):
                    if op_name(mm) == "bmm":
                        lowering.bmm(mm, ph, p, name, holder)
                if not user.users:
                    lowering.graph.erase_node(user)
            elif kind in _TRANSPOSES:
                for mm in list(user.users):
                    if op_name(mm) in _GROUPED_MM:
                        lowering.grouped_mm(mm, ph, p, name, holder)
                if not user.users:
                    lowering.graph.erase_node(user)
            elif kind in _GROUPED_MM:
                lowering.grouped_mm(user, ph, p, name, holder)
        if any(op_name(u) not in _EMBEDDING_OPS for u in ph.users):
            log.info(
                "qat4 inference: %s still has uses %s; they get fake quant",
                p.fqn,
                sorted(op_name(u) for u in ph.users),
            )
            leftovers.append(p)
        else:
            lowering.count += 1
    new = _rebuild(gm, lowering.root)
    if leftovers:
        insert_fake_quant(new, leftovers, config)
    new.meta["qatpass_lowering"] = {"packed": lowering.count, "fake_quant": len(leftovers)}
    return new


def _is_fake(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor) or t.device.type == "meta"


def _rebuild(gm: fx.GraphModule, root: nn.Module) -> fx.GraphModule:
    """A fresh GraphModule over gm's graph: gm's own attributes plus the packed constants."""
    for node in gm.graph.nodes:
        if node.op in ("get_attr", "call_module") and not node.target.startswith("qatpass_"):
            _copy(gm, root, node.target)
    new = fx.GraphModule(root, gm.graph, class_name="QatInferenceGraph")
    new.graph.lint()
    # without "dynamo_compile_id" AOTAutograd does not match the new buffers to Dynamo sources
    new.meta.update({k: v for k, v in gm.meta.items() if k != "dynamo_compile_id"})
    new.recompile()
    return new


def _copy(src: nn.Module, dst: nn.Module, target: str) -> None:
    *path, leaf = target.split(".")
    for part in path:
        src = getattr(src, part)
        if not hasattr(dst, part):
            dst.add_module(part, nn.Module())
        dst = getattr(dst, part)
    value = getattr(src, leaf)
    if isinstance(value, nn.Module):
        dst.add_module(leaf, value)
    elif isinstance(value, nn.Parameter):
        dst.register_parameter(leaf, value)
    elif isinstance(value, torch.Tensor):
        dst.register_buffer(leaf, value)
    else:
        setattr(dst, leaf, value)


def _alive() -> list[_LoweredWeight]:
    alive = [e for e in _LOWERED if e.qweight() is not None]
    _LOWERED[:] = alive
    return alive


def lowered_fqns() -> list[str]:
    """Names of the parameters whose packed constants a live compiled graph holds."""
    return [e.fqn for e in _alive()]


def refresh_compiled(model: nn.Module | None = None) -> int:
    """Repack lowered graphs' constants from their parameters' current values, in place.

    With `model`, only the constants of its parameters. Returns how many were repacked.
    """
    wanted = None if model is None else {id(p) for p in model.parameters()}
    count = 0
    with torch.no_grad():
        for entry in _alive():
            source = entry.source()
            if source is None or (wanted is not None and id(source) not in wanted):
                continue
            entry.repack(source)
            count += 1
    return count
