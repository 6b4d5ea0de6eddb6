"""`convert`: a model with packed 4-bit weights (INT4, NVFP4, MXFP4) for serving; `refresh`: repack from new weights.

    qmodel = qatpass.convert(model, plan=backend.plan)   # what training with that backend quantized
    qmodel = qatpass.convert(model, example_inputs)       # the plan found by tracing once
    qmodel = qatpass.convert(model)                       # the plan of the modules it can see
    ... optimizer.step() on model ...
    qatpass.refresh(qmodel, model)                        # repack in place (RL weight sync)
    packed_weights(qmodel)                                # what exporters write

Which weights is the plan's decision (`qatpass.passes.plan`), the same plan training used, so the
converted model computes what the fake-quant training forward computed (up to summation order).
Each planned weight is served by what owns it: an nn.Linear or HF Conv1D becomes a `W4A16Linear`,
an HF experts module a `W4A16Experts`, and any other parameter (model code calling
`F.linear(x, self.w)`, `x @ self.w`, `einsum`) becomes a `PackedTensor` in place. Without a plan
or example inputs, `convert(model)` plans from module types alone and logs a WARNING naming any
>= 2-d parameter that only tracing could classify. The model is never modified (unless
`inplace`), and nothing is installed unless every planned weight quantized.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from dataclasses import replace
from typing import Any, NamedTuple

import torch
from torch import nn

from qatpass.config import QatConfig
from qatpass.lowering.modules import W4A16Experts, W4A16Linear, write_packed_
from qatpass.lowering.packed_tensor import PackedTensor
from qatpass.passes.plan import (
    EXPERT_PARAM_NAMES,
    PlannedWeight,
    QuantPlan,
    facts_from_modules,
    is_conv1d,
    is_experts_module,
    plan_for,
    plan_from_facts,
)
from qatpass.scheme import PackedWeight, QuantScheme, parse_scheme, quantize

__all__ = [
    "PackedModuleWeight",
    "ServingTarget",
    "convert",
    "install_packed",
    "module_plan",
    "packed_tensors",
    "packed_weights",
    "refresh",
    "serving_targets",
]

log = logging.getLogger("qatpass")


class PackedModuleWeight(NamedTuple):
    module_name: str  # e.g. "model.layers.0.self_attn.q_proj" or "model.layers.0.mlp.experts"
    attr: str  # "weight" for a linear, the expert parameter name otherwise
    kind: str  # "linear", "experts" or "tensor"
    packed: PackedWeight
    names: tuple[str, ...]  # the state-dict keys holding it (qweight, scales, zeros)


class ServingTarget(NamedTuple):
    """Where a planned weight is served: its owner module, attribute and the kind of server."""

    fqn: str  # the name it is served under (the matmul's owner when the tensor is tied)
    module_name: str
    attr: str
    kind: str  # "linear" (nn.Linear, Conv1D), "experts" (HF experts) or "tensor" (any other)


def _config(
    scheme: QuantScheme | str | QatConfig | None,
    include: str | tuple[str, ...] | None,
    exclude: str | tuple[str, ...] | None,
    config: QatConfig | None,
) -> QatConfig:
    if isinstance(scheme, QatConfig):  # convert(model, config) reads naturally too
        if config is not None:
            raise ValueError("give the QatConfig once (as `config`)")
        scheme, config = None, scheme
    if config is not None and not isinstance(config, QatConfig):
        raise TypeError(f"config must be a QatConfig, got {type(config).__name__}")
    if isinstance(scheme, str):
        scheme = parse_scheme(scheme)
    if scheme is not None and not isinstance(scheme, QuantScheme):
        raise TypeError(
            f"scheme must be a QuantScheme (Int4Scheme, Fp4Scheme) or a name ('int4', 'nvfp4', "
            f"'mxfp4'), got {type(scheme).__name__}"
        )
    config = config or QatConfig()
    overrides = {
        k: v
        for k, v in (("scheme", scheme), ("include", include), ("exclude", exclude))
        if v is not None
    }
    return replace(config, **overrides) if overrides else config


def module_plan(model: nn.Module, config: QatConfig | None = None) -> tuple[QuantPlan, list[str]]:
    """The plan from module types alone, and the >= 2-d parameters no module type explains."""
    facts, unexplained = facts_from_modules(model)
    return plan_from_facts(facts, config or QatConfig()), unexplained


def serving_targets(model: nn.Module, planned: PlannedWeight) -> list[ServingTarget]:
    """Every module that serves a planned weight: each matmul owner of the tensor (tied weights
    have several; an embedding that shares the tensor keeps reading it in high precision)."""
    out = []
    for name in (planned.fqn, *planned.aliases):
        owner_name, _, attr = name.rpartition(".")
        try:
            owner = model.get_submodule(owner_name)
        except AttributeError:
            continue
        if attr not in owner._parameters:
            continue
        if isinstance(owner, nn.Linear) and attr == "weight" and planned.dim == 1:
            out.append(ServingTarget(name, owner_name, attr, "linear"))
        elif is_conv1d(owner) and attr == "weight" and planned.dim == 0:
            out.append(ServingTarget(name, owner_name, attr, "linear"))
        elif is_experts_module(owner) and attr in EXPERT_PARAM_NAMES and len(planned.shape) == 3:
            out.append(ServingTarget(name, owner_name, attr, "experts"))
        elif not isinstance(owner, (nn.Embedding, nn.EmbeddingBag)):
            out.append(ServingTarget(name, owner_name, attr, "tensor"))
    if not out:
        raise ValueError(
            f"convert: the plan names {planned.fqn!r}, which the model has no parameter for "
            "(a plan of another model?)"
        )
    return out


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


def install_packed(
    model: nn.Module, weights: Mapping[tuple[str, str], tuple[str, PackedWeight]]
) -> nn.Module:
    """Swap in packed modules, in place: {(module name, attr): (kind, PackedWeight)} -> model.

    kind "linear" replaces the nn.Linear or Conv1D (keeping its bias); kind "experts" replaces
    the HF experts module, all of its packed attrs at once; kind "tensor" replaces the parameter
    by a `PackedTensor`. Returns the model (the root itself when the root is the only module
    converted).
    """
    experts: dict[str, dict[str, PackedWeight]] = {}
    for (mname, attr), (kind, packed) in weights.items():
        if kind == "linear":
            linear = model.get_submodule(mname)
            if not (isinstance(linear, nn.Linear) or is_conv1d(linear)) or attr != "weight":
                raise ValueError(f"{mname}.{attr}: not the weight of an nn.Linear or Conv1D")
            if tuple(packed.shape) != tuple(linear.weight.shape):
                raise ValueError(
                    f"{mname}: packed shape {tuple(packed.shape)} != weight "
                    f"{tuple(linear.weight.shape)}"
                )
            new = W4A16Linear(packed, linear.bias)
            if not mname:
                return new
            _set_module(model, mname, new)
        elif kind == "experts":
            experts.setdefault(mname, {})[attr] = packed
        elif kind == "tensor":
            owner = model.get_submodule(mname)
            old = owner._parameters.get(attr)
            if old is None or tuple(old.shape) != tuple(packed.shape):
                raise ValueError(f"{mname}.{attr}: no parameter of shape {tuple(packed.shape)}")
            del owner._parameters[attr]
            setattr(owner, attr, PackedTensor(packed))
        else:
            raise ValueError(f"{mname}.{attr}: unknown kind {kind!r} (linear, experts or tensor)")
    for mname, packed in experts.items():
        module = model.get_submodule(mname)
        for attr, p in packed.items():
            w = module.get_parameter(attr)
            if tuple(p.shape) != tuple(w.shape):
                raise ValueError(
                    f"{mname}.{attr}: packed shape {tuple(p.shape)} != parameter {tuple(w.shape)}"
                )
        new = W4A16Experts(module, packed)
        if not mname:
            return new
        _set_module(model, mname, new)
    return model


def _resolve_plan(
    model: nn.Module, example_inputs: Any, plan: QuantPlan | None, config: QatConfig
) -> QuantPlan:
    if plan is not None:
        if not isinstance(plan, QuantPlan):
            raise TypeError(f"plan must be a qatpass QuantPlan, got {type(plan).__name__}")
        if example_inputs is not None:
            raise ValueError("give either a plan or example_inputs to trace one, not both")
        return plan
    if example_inputs is not None:
        return plan_for(model, example_inputs, config)
    found, unexplained = module_plan(model, config)
    if unexplained:
        log.warning(
            "convert: %d parameter(s) belong to no module type convert knows (%s); if model "
            "code uses them as matmul weights, only tracing finds them: pass example_inputs "
            "(convert(model, example_inputs)) or the training backend's plan (plan=b.plan)",
            len(unexplained),
            ", ".join(unexplained[:6]) + (", ..." if len(unexplained) > 6 else ""),
        )
    return found


def convert(
    model: nn.Module,
    example_inputs: Any = None,
    scheme: QuantScheme | str | QatConfig | None = None,
    include: str | tuple[str, ...] | None = None,
    exclude: str | tuple[str, ...] | None = None,
    inplace: bool = False,
    config: QatConfig | None = None,
    *,
    plan: QuantPlan | None = None,
) -> nn.Module:
    """A copy of `model` (or `model` itself when inplace) with its planned weights packed.

    The plan is `plan` (e.g. `backend.plan` after training), else the one found by tracing
    `model` on `example_inputs`, else the one module types give. Scheme and filters come from
    `config` (default `QatConfig()`); `scheme` (an object or "int4", "nvfp4", "mxfp4"),
    `include`, `exclude` override its fields (a given plan carries its own scheme). Weights are quantized and packed once, here.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(example_inputs, (QuantScheme, QatConfig)):  # convert(model, scheme) still works
        if scheme is not None:
            raise ValueError("give the scheme or config once")
        example_inputs, scheme = None, example_inputs
    config = _config(scheme, include, exclude, config)
    plan = _resolve_plan(model, example_inputs, plan, config)
    for s in plan.skipped.values():
        if s.matmul_weight:
            log.info("convert: left %s in high precision: %s", s.fqn, s.reason)
    target = model if inplace else copy.deepcopy(model)
    params = dict(target.named_parameters(remove_duplicate=False))
    weights: dict[tuple[str, str], tuple[str, PackedWeight]] = {}
    with torch.no_grad():  # quantize everything before installing anything
        for planned in plan.weights.values():
            targets = serving_targets(target, planned)
            w = params[targets[0].fqn]
            if tuple(w.shape) != tuple(planned.shape):
                raise ValueError(
                    f"convert: {targets[0].fqn} has shape {tuple(w.shape)}, the plan says "
                    f"{tuple(planned.shape)} (a plan of another model?)"
                )
            try:
                packed = quantize(w.detach(), plan.scheme, dim=planned.dim)
            except (ValueError, TypeError) as e:
                raise type(e)(f"convert: {planned.fqn}: {e}") from e
            for t in targets:
                weights[(t.module_name, t.attr)] = (t.kind, packed)
    log.info("convert: packed %d weights (%s)", len(weights), plan.scheme)
    served = install_packed(target, weights)
    served.qatpass_plan = plan  # what exporters record beside the weights
    return served


def _packed_modules(qmodel: nn.Module):
    for name, module in qmodel.named_modules():
        if isinstance(module, (W4A16Linear, W4A16Experts)):
            yield name, module


def packed_tensors(qmodel: nn.Module):
    """(module name, attribute, PackedTensor) for every parameter served as a PackedTensor."""
    for name, module in qmodel.named_modules():
        for attr, value in vars(module).items():
            if isinstance(value, PackedTensor):
                yield name, attr, value


def _buffer_keys(p: PackedWeight) -> tuple[str, ...]:
    return tuple(k for k, t in p.tensors().items() if t is not None)


def packed_weights(qmodel: nn.Module) -> list[PackedModuleWeight]:
    """The packed weights of a converted model, one entry per packed weight, in module order."""
    out = []
    for name, module in _packed_modules(qmodel):
        prefix = f"{name}." if name else ""
        if isinstance(module, W4A16Linear):
            p = module.packed()
            keys = _buffer_keys(p)
            out.append(
                PackedModuleWeight(name, "weight", "linear", p, tuple(prefix + k for k in keys))
            )
        else:
            for attr, p in module.packed().items():
                keys = _buffer_keys(p)
                names = tuple(f"{prefix}{attr}_{k}" for k in keys)
                out.append(PackedModuleWeight(name, attr, "experts", p, names))
    return out


def _plain_pairs(qmodel: nn.Module, model: nn.Module):
    """(name, qmodel tensor, model tensor) for every tensor qmodel holds unpacked."""
    source = dict(model.named_parameters(remove_duplicate=False))
    source.update(model.named_buffers(remove_duplicate=False))
    packed = {n for e in packed_weights(qmodel) for n in e.names}
    persistent = set(qmodel.state_dict().keys())
    targets = dict(qmodel.named_parameters(remove_duplicate=False))
    targets.update(qmodel.named_buffers(remove_duplicate=False))
    for name, t in targets.items():
        if name not in packed and name in persistent:
            yield name, t, source.get(name)


def _check_plain_tensors(qmodel: nn.Module, model: nn.Module) -> None:
    for name, t, s in _plain_pairs(qmodel, model):
        if s is None:
            raise ValueError(f"refresh: model has no tensor {name!r} (converted from another?)")
        if s.shape != t.shape:
            raise ValueError(
                f"refresh: {name!r} has shape {tuple(s.shape)} in model, {tuple(t.shape)} in qmodel"
            )


def _sync_plain_tensors(qmodel: nn.Module, model: nn.Module) -> None:
    """Copy every tensor qmodel holds unpacked (embeddings, norms, biases, ...) from model."""
    for _, t, s in _plain_pairs(qmodel, model):
        if s is not t:
            t.copy_(s.detach())


def _staged_repacks(qmodel: nn.Module, model: nn.Module) -> list[tuple[Any, str, PackedWeight]]:
    """(server, attr, new PackedWeight) for every packed weight of qmodel, from model's values.

    Quantizes everything first, so a bad weight (NaN, a wrong shape) raises naming the
    parameter before anything is overwritten.
    """
    modules = dict(model.named_modules())
    params = dict(model.named_parameters(remove_duplicate=False))
    staged = []

    def stage(server: Any, attr: str, fqn: str, old: PackedWeight) -> None:
        source = params.get(fqn)
        if source is None:
            raise ValueError(f"refresh: model has no parameter {fqn!r} (converted from another?)")
        if tuple(source.shape) != tuple(old.shape):
            raise ValueError(
                f"refresh: {fqn} has shape {tuple(source.shape)} in model, the packed weight "
                f"{tuple(old.shape)}"
            )
        device = old.qweight.device
        try:
            new = quantize(source.detach().to(device), old.scheme, dim=old.dim)
        except (ValueError, TypeError) as e:
            raise type(e)(f"refresh: {fqn}: {e}") from e
        staged.append((server, attr, new))

    for name, module in _packed_modules(qmodel):
        if name not in modules:
            raise ValueError(f"refresh: model has no module {name!r} (converted from another?)")
        prefix = f"{name}." if name else ""
        if isinstance(module, W4A16Linear):
            stage(module, "weight", prefix + "weight", module.packed())
        else:
            for attr, old in module.packed().items():
                stage(module, attr, prefix + attr, old)
    for name, attr, tensor in packed_tensors(qmodel):
        stage(tensor, attr, f"{name}.{attr}" if name else attr, tensor.packed)
    return staged


def refresh(qmodel: nn.Module, model: nn.Module) -> nn.Module:
    """Sync `qmodel` to `model`'s current weights, in place: repack the packed ones, copy the rest.

    `qmodel` is what `convert(model)` returned. All or nothing: every weight is quantized before
    any is written, and an error names the parameter. No module is created: the packed buffers
    and the plain tensors are overwritten, so a torch.compile'd `qmodel` sees the new weights. A
    model compiled with the qat4 backend in inference mode (no packed modules) has its graphs'
    packed constants repacked instead (`refresh_compiled(model)`). Returns qmodel.
    """
    if not isinstance(model, nn.Module) or not isinstance(qmodel, nn.Module):
        raise TypeError("refresh(qmodel, model) takes two nn.Modules")
    with torch.no_grad():
        staged = _staged_repacks(qmodel, model)
        if staged:
            _check_plain_tensors(qmodel, model)
            for server, attr, new in staged:
                _write_packed(server, attr, new)
            _sync_plain_tensors(qmodel, model)
    if not staged:
        from qatpass.passes.lower_w4a16 import refresh_compiled

        if refresh_compiled(model) == 0:
            raise ValueError(
                "refresh: qmodel has no packed modules and no graph compiled in inference mode "
                "holds model's weights; convert it (or compile it with mode='inference') first"
            )
    return qmodel


def _write_packed(server: Any, attr: str, new: PackedWeight) -> None:
    """Copy a new PackedWeight into the live buffers of its server (module or PackedTensor)."""
    if isinstance(server, PackedTensor):
        old = server.packed
    elif isinstance(server, W4A16Linear):
        old = server.packed()
    else:
        old = server.packed()[attr]
    write_packed_(old, new)
