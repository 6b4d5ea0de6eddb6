"""The weights an exporter writes: packed INT4 weights plus every other tensor, from any model.

Works on a training model (float master weights: selected with `select_weights`, quantized with
`qatpass.quantize`) and on a model returned by `qatpass.convert` (already packed: its packed
weights are taken as they are, never re-quantized). The model is only read.

    ModelWeights.packed   [PackedEntry(module_name, attr, kind, PackedWeight)]   # quantized
    ModelWeights.tensors  {state-dict name: tensor}   # everything else, tied aliases dropped
    ModelWeights.ignore   [module names of matmul layers left in high precision]
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

from qatpass.config import QatConfig
from qatpass.scheme import PackedWeight, QuantScheme, quantize
from qatpass.selection import select_weights

__all__ = ["PackedEntry", "ModelWeights", "collect_weights", "drop_tied", "ROUTER_NAME"]

# Modules that are matmul layers without being nn.Linear: MoE routers (HF Qwen3MoeTopKRouter ...).
ROUTER_NAME = re.compile(r"(^|\.)(gate|router)$")


@dataclass(frozen=True)
class PackedEntry:
    module_name: str  # owning module, e.g. "model.layers.0.self_attn.q_proj" or "...mlp.experts"
    attr: str  # "weight" for a linear; the expert parameter name ("gate_up_proj", ...) otherwise
    kind: str  # "linear" or "experts"
    packed: PackedWeight  # qweight [N, K/8] or, for experts, [E, N, K/8]


@dataclass
class ModelWeights:
    packed: list[PackedEntry]
    tensors: dict[str, torch.Tensor]
    ignore: list[str]
    scheme: QuantScheme
    tied: dict[str, str] = field(default_factory=dict)  # dropped alias -> name kept


def _converted_entries(model: nn.Module) -> list[tuple[PackedEntry, list[str]]]:
    """Packed weights of a `qatpass.convert`-ed model and the state-dict names they replace."""
    try:
        from qatpass.lowering import packed_weights
    except ImportError:
        return []
    entries = []
    for module_name, attr, kind, packed, names in packed_weights(model):
        entries.append((PackedEntry(module_name, attr, kind, packed), list(names)))
    return entries


def _single_scheme(entries: list[PackedEntry], config: QatConfig | None) -> QuantScheme:
    schemes = {e.packed.scheme for e in entries}
    if len(schemes) > 1:
        raise ValueError(
            f"the model's packed weights use {len(schemes)} different schemes "
            f"({sorted(str(s) for s in schemes)}); one checkpoint holds one scheme"
        )
    if schemes:
        scheme = schemes.pop()
        if config is not None and config.scheme != scheme:
            raise ValueError(
                f"the model is already converted with {scheme}, which disagrees with "
                f"config.scheme {config.scheme}; pass config=None to export it as converted"
            )
        return scheme
    return (config or QatConfig()).scheme


def drop_tied(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Keep the first name of tensors that alias one another (as HF save_pretrained does)."""
    kept: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, t in tensors.items():
        if t.device.type == "meta" or t.numel() == 0:
            kept[name] = t
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride())
        if key in seen:
            tied[name] = seen[key]
            continue
        seen[key] = name
        kept[name] = t
    return kept, tied


def _ignored(model: nn.Module, quantized_modules: set[str]) -> list[str]:
    names = []
    for mname, module in model.named_modules():
        if mname in quantized_modules:
            continue
        if isinstance(module, nn.Linear):
            names.append(mname)
        elif ROUTER_NAME.search(mname):
            w = module._parameters.get("weight")
            if w is not None and w.dim() == 2:
                names.append(mname)
    return names


def _refuse_packed_tensors(model: nn.Module) -> None:
    """Checkpoint formats name weights by module (`<module>.weight_packed`): a parameter that model
    code uses directly, served as a PackedTensor, has no such module, so it is refused by name."""
    from qatpass.lowering.convert import packed_tensors

    found = [f"{name}.{attr}" if name else attr for name, attr, _ in packed_tensors(model)]
    if found:
        raise ValueError(
            f"{len(found)} packed weight(s) are parameters model code uses directly ({found[:4]}); "
            "compressed-tensors names packed weights by their Linear module, so these cannot be "
            "written: serve them with qatpass (convert) or move them into nn.Linear modules"
        )


def collect_weights(model: nn.Module, config: QatConfig | None = None) -> ModelWeights:
    """Packed and plain tensors of `model`, packed ones quantized with `config` when needed.

    A converted model's packed weights are exported as they are; its remaining float linears (and
    a training model's) are quantized when `config` selects them.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if config is not None and not isinstance(config, QatConfig):
        raise TypeError(f"config must be a QatConfig, got {type(config).__name__}")
    _refuse_packed_tensors(model)
    state = dict(model.state_dict(keep_vars=False))
    converted = _converted_entries(model)
    scheme = _single_scheme([e for e, _ in converted], config)
    consumed: set[str] = set()
    entries: list[PackedEntry] = []
    for entry, names in converted:
        entries.append(entry)
        consumed.update(names)
    if not converted or config is not None:
        selected, _ = select_weights(model, QatConfig() if config is None else config)
        params = dict(model.named_parameters(remove_duplicate=False))
        for s in selected:
            if s.fqn in consumed:
                continue
            try:
                p = quantize(params[s.fqn].detach(), scheme, dim=s.dim)
            except (ValueError, TypeError) as e:
                raise type(e)(f"{s.fqn}: {e}") from e
            entries.append(PackedEntry(s.module_name, s.attr, s.kind, p))
            consumed.add(s.fqn)
    tensors = {k: v.detach() for k, v in state.items() if k not in consumed}
    tensors, tied = drop_tied(tensors)
    ignore = _ignored(model, {e.module_name for e in entries})
    return ModelWeights(entries, tensors, ignore, scheme, tied)
