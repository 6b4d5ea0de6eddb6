"""`convert`: a model with packed INT4 modules for serving; `refresh`: repack from new weights.

    qmodel = qatpass.convert(model)               # deepcopy; selected nn.Linear -> W4A16Linear,
                                                  # HF experts -> W4A16Experts; model untouched
    ... optimizer.step() on model ...
    qatpass.refresh(qmodel, model)                # repack in place (RL weight sync)
    packed_weights(qmodel)                        # what exporters write

The selection is `qatpass.selection.select_weights`, the same as training's, so the converted
model computes what the fake-quant training forward computed (up to summation order).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from dataclasses import replace
from typing import NamedTuple

import torch
from torch import nn

from qatpass.config import QatConfig
from qatpass.lowering.modules import W4A16Experts, W4A16Linear
from qatpass.scheme import Int4Scheme, PackedWeight, quantize
from qatpass.selection import select_weights

__all__ = ["PackedModuleWeight", "convert", "install_packed", "packed_weights", "refresh"]

log = logging.getLogger("qatpass")


class PackedModuleWeight(NamedTuple):
    module_name: str  # e.g. "model.layers.0.self_attn.q_proj" or "model.layers.0.mlp.experts"
    attr: str  # "weight" for a linear, the expert parameter name otherwise
    kind: str  # "linear" or "experts"
    packed: PackedWeight
    names: tuple[str, ...]  # the state-dict keys holding it (qweight, scales, zeros)


def _config(
    scheme: Int4Scheme | QatConfig | None,
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
    if scheme is not None and not isinstance(scheme, Int4Scheme):
        raise TypeError(f"scheme must be an Int4Scheme, got {type(scheme).__name__}")
    config = config or QatConfig()
    overrides = {
        k: v
        for k, v in (("scheme", scheme), ("include", include), ("exclude", exclude))
        if v is not None
    }
    return replace(config, **overrides) if overrides else config


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


def install_packed(
    model: nn.Module, weights: Mapping[tuple[str, str], tuple[str, PackedWeight]]
) -> nn.Module:
    """Swap in packed modules, in place: {(module name, attr): (kind, PackedWeight)} -> model.

    kind "linear" replaces the nn.Linear (keeping its bias); kind "experts" replaces the HF
    experts module, all of its packed attrs at once. Returns the model (the root itself when
    the root is the only module converted).
    """
    experts: dict[str, dict[str, PackedWeight]] = {}
    for (mname, attr), (kind, packed) in weights.items():
        if kind == "linear":
            linear = model.get_submodule(mname)
            if not isinstance(linear, nn.Linear) or attr != "weight":
                raise ValueError(f"{mname}.{attr}: not the weight of an nn.Linear")
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
        else:
            raise ValueError(f"{mname}.{attr}: unknown kind {kind!r} (linear or experts)")
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


def convert(
    model: nn.Module,
    scheme: Int4Scheme | QatConfig | None = None,
    include: str | tuple[str, ...] | None = None,
    exclude: str | tuple[str, ...] | None = None,
    inplace: bool = False,
    config: QatConfig | None = None,
) -> nn.Module:
    """A copy of `model` (or `model` itself when inplace) with its selected weights packed.

    Selection, scheme and filters come from `config` (default `QatConfig()`); `scheme`,
    `include`, `exclude` override its fields. Weights are quantized and packed once, here.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    config = _config(scheme, include, exclude, config)
    target = model if inplace else copy.deepcopy(model)
    selected, skipped = select_weights(target, config)
    for s in skipped:
        log.info("convert: left %s in high precision: %s", s.fqn, s.reason)
    params = dict(target.named_parameters(remove_duplicate=False))
    weights: dict[tuple[str, str], tuple[str, PackedWeight]] = {}
    with torch.no_grad():
        for s in selected:
            weights[(s.module_name, s.attr)] = (
                s.kind,
                quantize(params[s.fqn].detach(), config.scheme, dim=s.dim),
            )
    log.info("convert: packed %d weights (%s)", len(weights), config.scheme)
    return install_packed(target, weights)


def _packed_modules(qmodel: nn.Module):
    for name, module in qmodel.named_modules():
        if isinstance(module, (W4A16Linear, W4A16Experts)):
            yield name, module


def packed_weights(qmodel: nn.Module) -> list[PackedModuleWeight]:
    """The packed weights of a converted model, one entry per packed weight, in module order."""
    out = []
    for name, module in _packed_modules(qmodel):
        prefix = f"{name}." if name else ""
        if isinstance(module, W4A16Linear):
            p = module.packed()
            keys = ("qweight", "scales") + (("zeros",) if p.zeros is not None else ())
            out.append(
                PackedModuleWeight(name, "weight", "linear", p, tuple(prefix + k for k in keys))
            )
        else:
            for attr, p in module.packed().items():
                keys = ("qweight", "scales") + (("zeros",) if p.zeros is not None else ())
                names = tuple(f"{prefix}{attr}_{k}" for k in keys)
                out.append(PackedModuleWeight(name, attr, "experts", p, names))
    return out


def _sync_plain_tensors(qmodel: nn.Module, model: nn.Module) -> None:
    """Copy every tensor qmodel holds unpacked (embeddings, norms, biases, ...) from model."""
    source = dict(model.named_parameters(remove_duplicate=False))
    source.update(model.named_buffers(remove_duplicate=False))
    packed = {n for e in packed_weights(qmodel) for n in e.names}
    persistent = set(qmodel.state_dict().keys())
    targets = dict(qmodel.named_parameters(remove_duplicate=False))
    targets.update(qmodel.named_buffers(remove_duplicate=False))
    for name, t in targets.items():
        if name in packed or name not in persistent:  # packed, or a CPU repack cache
            continue
        s = source.get(name)
        if s is None:
            raise ValueError(f"refresh: model has no tensor {name!r} (converted from another?)")
        if s.shape != t.shape:
            raise ValueError(
                f"refresh: {name!r} has shape {tuple(s.shape)} in model, {tuple(t.shape)} in qmodel"
            )
        if s is not t:
            t.copy_(s.detach())


def refresh(qmodel: nn.Module, model: nn.Module) -> nn.Module:
    """Sync `qmodel` to `model`'s current weights, in place: repack the packed ones, copy the rest.

    `qmodel` is what `convert(model)` returned. No module is created: the packed buffers (and
    CPU repacks) and the plain tensors are overwritten, so a torch.compile'd `qmodel` sees the
    new weights. A model compiled with the qat4 backend in inference mode (no packed modules)
    has its graphs' packed constants repacked instead (`refresh_compiled(model)`). Returns
    qmodel.
    """
    if not isinstance(model, nn.Module) or not isinstance(qmodel, nn.Module):
        raise TypeError("refresh(qmodel, model) takes two nn.Modules")
    modules = dict(model.named_modules())
    found = 0
    with torch.no_grad():
        for name, packed_module in _packed_modules(qmodel):
            source = modules.get(name)
            if source is None:
                raise ValueError(f"refresh: model has no module {name!r} (converted from another?)")
            if isinstance(packed_module, W4A16Linear):
                if not isinstance(source, nn.Linear):
                    raise TypeError(f"refresh: {name!r} in model is {type(source).__name__}")
                packed_module.repack_(source.weight)
            else:
                packed_module.repack_({a: source.get_parameter(a) for a in packed_module.shapes})
            found += 1
        if found:
            _sync_plain_tensors(qmodel, model)
    if not found:
        from qatpass.passes.lower_w4a16 import refresh_compiled

        if refresh_compiled(model) == 0:
            raise ValueError(
                "refresh: qmodel has no packed modules and no graph compiled in inference mode "
                "holds model's weights; convert it (or compile it with mode='inference') first"
            )
    return qmodel
