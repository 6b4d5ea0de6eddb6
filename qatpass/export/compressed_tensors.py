"""compressed-tensors `pack-quantized` checkpoints (what vLLM and SGLang load), written and read.

Per quantized linear `<name>`:
    <name>.weight_packed      int32 [N, K/8]   our packed codes, exactly (code + 8, low nibble first)
    <name>.weight_scale       [N, K/G]         scheme.scale_dtype (bf16 by default)
    <name>.weight_shape       int64 [2]        (N, K)
    <name>.weight_zero_point  int32 [ceil(N/8), K/G]   asymmetric only: codes + 8 packed along N
Every other tensor is stored as it is (tied aliases dropped, as HF `save_pretrained` does).
MoE experts stored as 3D parameters (HF transformers 5) are written per expert under the names the
serving engines load: `<experts>.<e>.gate_proj|up_proj|down_proj.*`; the fused `gate_up_proj
[E, 2I, H]` is `cat([gate_proj, up_proj], dim=1)` (transformers' conversion mapping), so it is
split at row I. Splitting packed rows is exact: groups run along K, never across rows.

FP4 schemes write compressed-tensors' own FP4 formats instead (checked against its 0.20.1
decompressor, bit for bit): `nvfp4-pack-quantized` (`weight_packed` uint8 [N, K/2], the same
nibbles; `weight_scale` float8_e4m3fn [N, K/16]; `weight_global_scale` fp32 [1], the element
scale being weight_scale / weight_global_scale) and `mxfp4-pack-quantized` (`weight_packed`;
`weight_scale` uint8 [N, K/32], E8M0 exponents biased by 127). No `weight_shape`: K = 2 *
weight_packed columns.

Scale convention: scales are stored, so any reader dequantizes `(code - zero) * scale` to the same
values whatever the qrange was; the qatpass scheme (qrange (-7, 7): scale = amax / 7) is recorded
under `quantization_config["qatpass"]` and used on load.
"""

from __future__ import annotations

import functools
import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qatpass.config import QatConfig
from qatpass.export.safetensors_io import atomic_dir, read_tensors, write_shards
from qatpass.export.weights import ModelWeights, PackedEntry, collect_weights, drop_tied
from qatpass.passes.plan import EXPERT_PARAM_NAMES, QuantPlan, is_conv1d, is_experts_module
from qatpass.scheme import (
    CODE_OFFSET,
    Int4Scheme,
    PackedWeight,
    QuantScheme,
    pack_int4,
    unpack_int4,
)
from qatpass.scheme_fp4 import Fp4Scheme

__all__ = [
    "save_compressed_tensors",
    "load_compressed_tensors",
    "packed_state_dict",
    "quantization_config",
    "read_checkpoint",
    "pack_zero_points",
    "unpack_zero_points",
]

FORMAT = "pack-quantized"
QUANT_METHOD = "compressed-tensors"
QATPASS_KEY = "qatpass"
_SUFFIXES = (
    "weight_packed",
    "weight_scale",
    "weight_shape",
    "weight_zero_point",
    "weight_global_scale",
)
FP4_FORMATS = {"nvfp4": "nvfp4-pack-quantized", "mxfp4": "mxfp4-pack-quantized"}


# ----------------------------------------------------------------------------- zero points


def pack_zero_points(zeros: torch.Tensor) -> torch.Tensor:
    """int8 zero points [N, K/G] -> int32 [ceil(N/8), K/G], packed along N (compressed-tensors)."""
    n = zeros.shape[0]
    pad = -n % 8
    z = zeros.t()
    if pad:  # compressed-tensors pads with nibble 0, i.e. code -8
        z = torch.cat([z, z.new_full((z.shape[0], pad), -CODE_OFFSET)], dim=1)
    # canonical strides: a [1, N] transpose counts as contiguous but would break the int32 view
    z = torch.empty(z.shape, dtype=z.dtype).copy_(z)
    return pack_int4(z).t().contiguous()


def unpack_zero_points(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of pack_zero_points: int32 [ceil(N/8), K/G] -> int8 [N, K/G]."""
    return unpack_int4(packed.t().contiguous())[:, :n].t().contiguous()


# ----------------------------------------------------------------------------- names


def _expert_parts(attr: str, packed: PackedWeight) -> list[tuple[str, slice]]:
    """(per-expert projection name, row slice of the [N, K/8] rows) for an expert parameter."""
    n = packed.qweight.shape[-2]
    if attr == "gate_up_proj":
        if n % 2:
            raise ValueError(f"gate_up_proj has an odd number of rows ({n}); cannot split it")
        return [("gate_proj", slice(0, n // 2)), ("up_proj", slice(n // 2, n))]
    return [(attr, slice(0, n))]


def _module_tensors(name: str, qweight, scales, zeros, k: int) -> dict[str, torch.Tensor]:
    out = {
        f"{name}.weight_packed": qweight.contiguous().clone(),
        f"{name}.weight_scale": scales.contiguous().clone(),
        f"{name}.weight_shape": torch.tensor([qweight.shape[0], k], dtype=torch.int64),
    }
    if zeros is not None:
        out[f"{name}.weight_zero_point"] = pack_zero_points(zeros)
    return out


def _fp4_module_tensors(name: str, qweight, scales, global_scale) -> dict[str, torch.Tensor]:
    # the int32 words' bytes are the nibbles in k order: compressed-tensors' uint8 [N, K/2]
    out = {
        f"{name}.weight_packed": qweight.contiguous().view(torch.uint8).clone(),
        f"{name}.weight_scale": scales.contiguous().clone(),
    }
    if global_scale is not None:
        out[f"{name}.weight_global_scale"] = global_scale.reshape(1).float().clone()
    return out


def _entry_tensors(entry: PackedEntry) -> dict[str, torch.Tensor]:
    p = entry.packed
    k = p.shape[p.dim]
    fp4 = isinstance(p.scheme, Fp4Scheme)

    def tensors(name: str, lead: tuple, rows: slice) -> dict[str, torch.Tensor]:
        if fp4:
            gs = None if p.global_scale is None else p.global_scale[lead]
            return _fp4_module_tensors(name, p.qweight[lead][rows], p.scales[lead][rows], gs)
        zeros = None if p.zeros is None else p.zeros[lead][rows]
        return _module_tensors(name, p.qweight[lead][rows], p.scales[lead][rows], zeros, k)

    if entry.kind == "linear":
        return tensors(entry.module_name, (), slice(None))
    out: dict[str, torch.Tensor] = {}
    for e in range(p.qweight.shape[0]):
        for proj, rows in _expert_parts(entry.attr, p):
            out |= tensors(f"{entry.module_name}.{e}.{proj}", (e,), rows)
    return out


def _state_dict(weights: ModelWeights) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for entry in weights.packed:
        out |= _entry_tensors(entry)
    for name, t in weights.tensors.items():
        if name in out:
            raise ValueError(f"tensor name {name!r} collides with a packed weight's name")
        out[name] = t
    return out


def packed_state_dict(model: nn.Module, config: QatConfig | None = None) -> dict[str, torch.Tensor]:
    """The tensors of the compressed-tensors checkpoint, in memory (no files).

    For an inference engine's update-weights-from-tensors API; names as in the checkpoint.
    """
    _check_finite(model)
    return _state_dict(collect_weights(model, config))


# ----------------------------------------------------------------------------- config


def _fp4_weights(scheme: Fp4Scheme) -> dict[str, Any]:
    """compressed-tensors' NVFP4A16 / MXFP4A16 weight args (as its presets serialize them)."""
    nv = scheme.format == "nvfp4"
    return {
        "num_bits": 4,
        "type": "float",
        "symmetric": True,
        "group_size": scheme.block_size,
        "strategy": "tensor_group" if nv else "group",
        "dynamic": False,
        "scale_dtype": "torch.float8_e4m3fn" if nv else "torch.uint8",
        "zp_dtype": "torch.float8_e4m3fn" if nv else "torch.uint8",
        "actorder": None,
        "block_structure": None,
        "observer": "minmax",
        "observer_kwargs": {},
    }


def quantization_config(scheme: QuantScheme, ignore: list[str]) -> dict[str, Any]:
    """The `quantization_config` entry of config.json for a qatpass scheme."""
    if isinstance(scheme, Fp4Scheme):
        return _config_dict(FP4_FORMATS[scheme.format], _fp4_weights(scheme), scheme, ignore)
    per_channel = scheme.group_size == -1
    weights = {
        "num_bits": 4,
        "type": "int",
        "symmetric": scheme.symmetric,
        "strategy": "channel" if per_channel else "group",
        "group_size": None if per_channel else scheme.group_size,
        "dynamic": False,
        "actorder": None,
        "block_structure": None,
        "observer": "minmax",
        "observer_kwargs": {},
    }
    return _config_dict(FORMAT, weights, scheme, ignore)


def _config_dict(fmt: str, weights: dict, scheme: QuantScheme, ignore: list[str]) -> dict:
    return {
        "quant_method": QUANT_METHOD,
        "format": fmt,
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": weights,
                "input_activations": None,
                "output_activations": None,
                "format": fmt,
            }
        },
        "ignore": list(ignore),
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "sparsity_config": {},
        "transform_config": {},
        QATPASS_KEY: {"scheme": scheme.to_dict(), "format_version": 1},
    }


def _model_config(model: nn.Module) -> dict[str, Any]:
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(cfg, "to_dict"):
        return {}
    d = cfg.to_dict()
    if not d.get("architectures"):
        d["architectures"] = [type(model).__name__]
    if d.get("dtype") is None:
        floats = [p.dtype for p in model.parameters() if p.is_floating_point()]
        if floats:
            d["dtype"] = str(floats[0]).removeprefix("torch.")
    return d


def _finite(t: torch.Tensor) -> torch.Tensor:
    # isfinite has no float8 kernel: FP8 values are finite exactly when their float32 values are
    return torch.isfinite(t.float() if t.element_size() == 1 else t)


def _check_finite(model: nn.Module) -> None:
    """Refuse a model with a NaN/Inf in any float parameter or buffer, naming the first one."""
    if not isinstance(model, nn.Module):
        return  # collect_weights says what is wrong
    named = [*model.named_parameters(remove_duplicate=True), *model.named_buffers()]
    for name, t in named:
        if t.is_floating_point() and t.device.type != "meta" and not bool(_finite(t).all()):
            bad = int((~_finite(t)).sum())
            raise ValueError(
                f"{name} (shape {list(t.shape)}) has {bad} non-finite values (NaN/Inf); "
                "nothing is exported"
            )


def save_compressed_tensors(
    model: nn.Module,
    out_dir: str | os.PathLike,
    config: QatConfig | None = None,
    overwrite: bool = False,
    max_shard_size: int | str = "5GB",
) -> Path:
    """Write `model` as a compressed-tensors `pack-quantized` checkpoint directory.

    `model` is a training model (float weights, quantized here with `config`) or a converted
    model (packed weights written as they are). Writes safetensors (sharded with
    `model.safetensors.index.json` above `max_shard_size`) and config.json (the HF model config,
    when the model has one, plus `quantization_config`). All or nothing: the directory appears
    only when complete. Returns the directory.
    """
    _check_finite(model)
    weights = collect_weights(model, config)
    if not weights.packed:
        raise ValueError("no weight of the model is quantized under this config; nothing to pack")
    tensors = _state_dict(weights)
    cfg = _model_config(model)
    cfg["quantization_config"] = quantization_config(weights.scheme, weights.ignore)
    cfg["quantization_config"][QATPASS_KEY]["plan"] = _plan_of(model, config).to_dict()
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        write_shards(tensors, tmp, max_shard_size)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return Path(out_dir)


def _plan_of(model: nn.Module, config: QatConfig | None) -> QuantPlan:
    """The plan the written weights follow: a converted model's own, else the module plan."""
    plan = getattr(model, "qatpass_plan", None)
    if isinstance(plan, QuantPlan):
        return plan
    from qatpass.lowering.convert import module_plan

    return module_plan(model, config)[0]


# ----------------------------------------------------------------------------- load


def _read_config(path: Path) -> dict[str, Any]:
    cfile = path / "config.json"
    if not cfile.is_file():
        raise FileNotFoundError(f"{path} has no config.json")
    try:
        cfg = json.loads(cfile.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{cfile} is not UTF-8 text: {e}") from e
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfile} is not valid JSON: {e}") from e
    if not isinstance(cfg, dict):
        raise ValueError(f"{cfile} must hold a JSON object")
    return cfg


def _fp4_scheme_from(qc: dict, where: Path, scale_dtype: torch.dtype | None) -> Fp4Scheme:
    """The FP4 scheme of an `nvfp4-pack-quantized` / `mxfp4-pack-quantized` config."""
    fmt = next(f for f, name in FP4_FORMATS.items() if name == qc.get("format"))
    scheme = Fp4Scheme(fmt)
    groups = qc.get("config_groups") or {}
    if len(groups) != 1:
        raise ValueError(f"{where}: expected exactly one config group, got {len(groups)}")
    (group,) = groups.values()
    w = group.get("weights") or {}
    want = (4, "float", scheme.block_size, True)
    got = (w.get("num_bits"), w.get("type"), w.get("group_size"), w.get("symmetric", True))
    if got != want:
        raise ValueError(
            f"{where}: {fmt} weights must be (num_bits, type, group_size, symmetric) = {want}, "
            f"got {got}"
        )
    if group.get("input_activations") is not None:
        raise ValueError(f"{where}: activation quantization is not supported (W4A16 only)")
    if scale_dtype is not None and scale_dtype != scheme.scale_dtype:
        raise ValueError(
            f"{where}: {fmt} weight_scale tensors must be {scheme.scale_dtype}, got {scale_dtype}"
        )
    return scheme


def _scheme_from(qc: Any, where: Path, scale_dtype: torch.dtype | None) -> QuantScheme:
    """The qatpass scheme a quantization_config describes; refuses what qatpass cannot run."""
    if not isinstance(qc, dict):
        raise ValueError(f"{where} has no quantization_config")
    if qc.get("quant_method") == QUANT_METHOD and qc.get("format") in FP4_FORMATS.values():
        return _fp4_scheme_from(qc, where, scale_dtype)
    if qc.get("quant_method") != QUANT_METHOD or qc.get("format") != FORMAT:
        raise ValueError(
            f"{where}: quantization_config is {qc.get('quant_method')!r}/{qc.get('format')!r}, "
            f"expected {QUANT_METHOD!r}/{FORMAT!r}"
        )
    groups = qc.get("config_groups") or {}
    if len(groups) != 1:
        raise ValueError(f"{where}: expected exactly one config group, got {len(groups)}")
    (group,) = groups.values()
    w = group.get("weights") or {}
    if w.get("num_bits") != 4 or w.get("type") != "int":
        raise ValueError(
            f"{where}: weights must be 4-bit int, got {w.get('num_bits')} {w.get('type')}"
        )
    if group.get("input_activations") is not None:
        raise ValueError(f"{where}: activation quantization is not supported (W4A16 only)")
    strategy = w.get("strategy")
    if strategy == "group":
        group_size = w.get("group_size")
    elif strategy == "channel":
        group_size = -1
    else:
        raise ValueError(f"{where}: weight strategy {strategy!r} is not 'group' or 'channel'")
    symmetric = w.get("symmetric", True)
    record = qc.get(QATPASS_KEY) or {}
    if not isinstance(record, dict):
        raise ValueError(f"{where}: quantization_config[{QATPASS_KEY!r}] must be an object")
    saved = record.get("scheme")
    try:
        # without a qatpass record: compressed-tensors' own convention, scale = amax / 7.5
        recorded = Int4Scheme.from_dict(saved) if saved is not None else None
        scheme = Int4Scheme(
            group_size=group_size,
            symmetric=symmetric,
            qrange=recorded.qrange if recorded else (-8, 7),
            scale_dtype=scale_dtype or (recorded.scale_dtype if recorded else torch.bfloat16),
        )
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: quantization_config is not runnable by qatpass: {e}") from e
    if recorded and scale_dtype is not None and recorded.scale_dtype != scale_dtype:
        raise ValueError(
            f"{where}: the recorded qatpass scheme has scale_dtype "
            f"{str(recorded.scale_dtype).removeprefix('torch.')}, but the checkpoint's "
            f"weight_scale tensors are {str(scale_dtype).removeprefix('torch.')}"
        )
    if recorded and (recorded.group_size, recorded.symmetric) != (group_size, symmetric):
        raise ValueError(
            f"{where}: weights (group_size {group_size}, symmetric={symmetric}) disagree with the "
            f"recorded qatpass scheme (group_size {recorded.group_size}, "
            f"symmetric={recorded.symmetric})"
        )
    return scheme


def _split_name(name: str) -> tuple[str, str]:
    module, _, suffix = name.rpartition(".")
    return module, suffix


def _check_fp4_module(module: str, parts: dict[str, torch.Tensor], scheme: Fp4Scheme) -> int:
    """Validate one FP4 module's tensors against each other and the scheme; return K."""
    need = ("weight_packed", "weight_scale") + (
        ("weight_global_scale",) if scheme.has_global_scale else ()
    )
    for suffix in need:
        if suffix not in parts:
            raise ValueError(f"{module}: {suffix} is missing from the checkpoint")
    extra = sorted(set(parts) - set(need))
    if extra:
        raise ValueError(f"{module}: {extra} have no meaning in {scheme.format}")
    packed, scales = parts["weight_packed"], parts["weight_scale"]
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError(
            f"{module}.weight_packed must be uint8 [N, K/2], got {packed.dtype} {list(packed.shape)}"
        )
    n, k = packed.shape[0], 2 * packed.shape[1]
    b = scheme.block_size
    if k % b or scales.dtype != scheme.scale_dtype or tuple(scales.shape) != (n, k // b):
        raise ValueError(
            f"{module}.weight_scale must be {scheme.scale_dtype} [{n}, {k // b}] for K={k} "
            f"(a multiple of {b}), got {scales.dtype} {list(scales.shape)}"
        )
    if scheme.has_global_scale:
        gs = parts["weight_global_scale"]
        if gs.dtype != torch.float32 or gs.numel() != 1 or not bool(torch.isfinite(gs).all()):
            raise ValueError(f"{module}.weight_global_scale must be one finite float32 value")
        if float(gs) <= 0:
            raise ValueError(f"{module}.weight_global_scale must be positive, got {float(gs)}")
    return k


def _check_module(module: str, parts: dict[str, torch.Tensor], scheme: QuantScheme) -> int:
    """Validate one module's packed tensors against each other and the scheme; return K."""
    if isinstance(scheme, Fp4Scheme):
        return _check_fp4_module(module, parts, scheme)
    for suffix in ("weight_packed", "weight_scale", "weight_shape"):
        if suffix not in parts:
            raise ValueError(f"{module}: {suffix} is missing from the checkpoint")
    if ("weight_zero_point" in parts) == scheme.symmetric:
        what = "has" if scheme.symmetric else "lacks"
        raise ValueError(
            f"{module} {what} weight_zero_point but config.json says symmetric={scheme.symmetric}"
        )
    qweight, scales, shape = parts["weight_packed"], parts["weight_scale"], parts["weight_shape"]
    if qweight.dtype != torch.int32 or qweight.dim() != 2:
        raise ValueError(
            f"{module}.weight_packed must be int32 [N, K/8], got {qweight.dtype} {list(qweight.shape)}"
        )
    if shape.dtype not in (torch.int64, torch.int32) or shape.shape != (2,):
        raise ValueError(f"{module}.weight_shape must be an int tensor of 2 values")
    n, k = (int(v) for v in shape.tolist())
    if qweight.shape != (n, k // 8) or k % 8:
        raise ValueError(
            f"{module}.weight_packed has shape {list(qweight.shape)}, but weight_shape "
            f"{[n, k]} needs [{n}, {k // 8}]"
        )
    g = scheme.group_size_for(k)
    if k % g:
        raise ValueError(f"{module}: K={k} is not divisible by config.json's group_size {g}")
    if not scales.is_floating_point() or scales.shape != (n, k // g):
        raise ValueError(
            f"{module}.weight_scale has shape {list(scales.shape)} ({scales.dtype}), but "
            f"config.json's group_size {scheme.group_size} needs float [{n}, {k // g}]"
        )
    if "weight_zero_point" in parts:
        zp = parts["weight_zero_point"]
        if zp.dtype != torch.int32 or zp.shape != (-(-n // 8), k // g):
            raise ValueError(
                f"{module}.weight_zero_point must be int32 [{-(-n // 8)}, {k // g}], "
                f"got {zp.dtype} {list(zp.shape)}"
            )
    return k


def _check_scale_values(fpath: Path, name: str, scales: torch.Tensor) -> None:
    """Scales must be finite and positive: anything else dequantizes to wrong, finite logits.

    (MXFP4's uint8 E8M0 exponents are checked for 255, the format's NaN.)"""
    if scales.dtype == torch.uint8:
        if bool((scales == 255).any()):
            raise ValueError(f"{fpath}: {name} has E8M0 exponents 255 (NaN)")
        return
    if not scales.is_floating_point():
        raise ValueError(f"{fpath}: {name} must be a float tensor, got {scales.dtype}")
    s = scales.float()
    for what, bad in (("NaN/Inf", ~torch.isfinite(s)), ("zero or negative", s <= 0)):
        if bool(bad.any()):
            raise ValueError(
                f"{fpath}: {name} has {int(bad.sum())} {what} scales (scales must be finite "
                "and positive)"
            )


def read_checkpoint(
    path: str | os.PathLike,
) -> tuple[dict[str, Any], QuantScheme, dict[str, PackedWeight], dict[str, torch.Tensor]]:
    """(config.json, scheme, {module name: 2D PackedWeight}, {other tensors}) of a checkpoint.

    Every packed module is validated against config.json (shapes, dtypes, group size).
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory")
    cfg = _read_config(path)
    files: dict[str, str] = {}

    def check(fname: str, name: str, t: torch.Tensor) -> None:
        files[name] = fname
        if _split_name(name)[1] == "weight_scale":
            _check_scale_values(path / fname, name, t)

    tensors = read_tensors(path, check)
    modules: dict[str, dict[str, torch.Tensor]] = {}
    plain: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        module, suffix = _split_name(name)
        if suffix in _SUFFIXES:
            modules.setdefault(module, {})[suffix] = t
        else:
            plain[name] = t
    scale_dtypes = {
        parts["weight_scale"].dtype for parts in modules.values() if "weight_scale" in parts
    }
    if len(scale_dtypes) > 1:
        by_dtype = {
            str(parts["weight_scale"].dtype): path / files[f"{m}.weight_scale"]
            for m, parts in modules.items()
            if "weight_scale" in parts
        }
        raise ValueError(f"{path}: weight_scale tensors have mixed dtypes, e.g. in {by_dtype}")
    scale_dtype = scale_dtypes.pop() if scale_dtypes else None
    scheme = _scheme_from(cfg.get("quantization_config"), path / "config.json", scale_dtype)
    fp4 = isinstance(scheme, Fp4Scheme)
    int4_scale_dtypes = (torch.float32, torch.bfloat16, torch.float16)
    if not fp4 and scale_dtype is not None and scale_dtype not in int4_scale_dtypes:
        raise ValueError(f"{path}: weight_scale dtype {scale_dtype} is not a float type")
    dtype = getattr(torch, str(cfg.get("dtype") or cfg.get("torch_dtype") or ""), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        dtype = torch.bfloat16 if fp4 else scheme.scale_dtype
    packed: dict[str, PackedWeight] = {}
    for module, parts in modules.items():
        where = path / files[f"{module}.{next(iter(parts))}"]
        try:
            k = _check_module(module, parts, scheme)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from e
        n = parts["weight_packed"].shape[0]
        if fp4:
            gs = parts.get("weight_global_scale")
            packed[module] = PackedWeight(
                qweight=parts["weight_packed"].contiguous().view(torch.int32),
                scales=parts["weight_scale"],
                zeros=None,
                shape=torch.Size([n, k]),
                dim=1,
                dtype=dtype,
                scheme=scheme,
                global_scale=None if gs is None else gs.reshape(()),
            )
            continue
        zp = parts.get("weight_zero_point")
        packed[module] = PackedWeight(
            qweight=parts["weight_packed"],
            scales=parts["weight_scale"],
            zeros=None if zp is None else unpack_zero_points(zp, n),
            shape=torch.Size([n, k]),
            dim=1,
            dtype=dtype,
            scheme=scheme,
        )
    return cfg, scheme, packed, plain


_EXPERT_RE = re.compile(r"^(?P<experts>.+)\.(?P<e>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)$")


@functools.cache
def _model_classes() -> frozenset[str]:
    """Names of the model classes transformers' auto mappings list (what `architectures` holds)."""
    from transformers.models.auto import modeling_auto

    names: set[str] = set()
    for key, mapping in vars(modeling_auto).items():
        if (
            key.startswith("MODEL_")
            and key.endswith("_MAPPING_NAMES")
            and isinstance(mapping, dict)
        ):
            for value in mapping.values():
                names.update([value] if isinstance(value, str) else value)
    return frozenset(names)


def _model_class(cfg: dict[str, Any], cfile: Path) -> type:
    """The transformers model class config.json's `architectures[0]` names, refused unless it is a
    PreTrainedModel subclass listed in transformers' auto mappings (never any other attribute)."""
    try:
        import transformers
    except ImportError as e:
        raise ImportError("loading without a model skeleton needs transformers") from e
    archs = cfg.get("architectures")
    if not isinstance(archs, list) or not archs or not isinstance(archs[0], str):
        raise ValueError(f"{cfile} names no transformers architecture ({archs!r}); pass model=")
    name = archs[0]
    cls = getattr(transformers, name, None) if name in _model_classes() else None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise ValueError(
            f"{cfile}: architectures[0] {name!r} is not a transformers model class; pass model="
        )
    return cls


def _build_model(cfg: dict[str, Any], path: Path) -> nn.Module:
    """An HF transformers model from config.json (random weights, replaced on load)."""
    import transformers

    cfile = path / "config.json"
    cls = _model_class(cfg, cfile)
    d = {k: v for k, v in cfg.items() if k != "quantization_config"}
    model_type = d.pop("model_type", None)
    if not isinstance(model_type, str):
        raise ValueError(f"{cfile} has no model_type (needed to build {cls.__name__}); pass model=")
    expected = getattr(getattr(cls, "config_class", None), "model_type", model_type)
    if model_type != expected:
        raise ValueError(
            f"{cfile}: architectures[0] {cls.__name__} is a {expected!r} model, but model_type is "
            f"{model_type!r}"
        )
    try:
        hf_config = transformers.AutoConfig.for_model(model_type, **d)
        model = cls(hf_config)
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise ValueError(f"{cfile}: transformers cannot build {cls.__name__} from it: {e}") from e
    dtype = cfg.get("dtype") or cfg.get("torch_dtype")
    if isinstance(dtype, str) and isinstance(getattr(torch, dtype, None), torch.dtype):
        model = model.to(getattr(torch, dtype))
    return model.eval()


def _gather(
    model: nn.Module, packed: dict[str, PackedWeight]
) -> dict[tuple[str, str], tuple[str, PackedWeight]]:
    """{(module name, attr): (kind, PackedWeight)} in the model's layout: experts re-stacked."""
    modules = dict(model.named_modules())
    params = dict(model.named_parameters(remove_duplicate=False))
    out: dict[tuple[str, str], tuple[str, PackedWeight]] = {}
    experts: dict[tuple[str, str], dict[int, PackedWeight]] = {}
    for name, p in packed.items():
        module = modules.get(name)
        m = _EXPERT_RE.match(name)
        if isinstance(module, nn.Linear) or is_conv1d(module):
            w = module.weight  # nn.Linear [N, K] reduced along 1; Conv1D [K, N] along 0
            dim = 0 if is_conv1d(module) else 1
            if (w.shape[1 - dim], w.shape[dim]) != tuple(p.shape):
                raise ValueError(
                    f"{name}: checkpoint weight_shape {list(p.shape)} != model's "
                    f"{[w.shape[1 - dim], w.shape[dim]]} (N, K)"
                )
            out[(name, "weight")] = ("linear", _with(p, w.shape, dim, w.dtype))
        elif m and is_experts_module(modules.get(m["experts"], nn.Module())):
            attr = "gate_up_proj" if m["proj"] in ("gate_proj", "up_proj") else m["proj"]
            if f"{m['experts']}.{attr}" not in params:
                attr = m["proj"]
            experts.setdefault((m["experts"], f"{attr}:{m['proj']}"), {})[int(m["e"])] = p
        else:
            raise ValueError(f"checkpoint module {name!r} is not a linear or expert of the model")
    stacked: dict[tuple[str, str], dict[str, list[PackedWeight]]] = {}
    for (mname, key), by_e in experts.items():
        attr, proj = key.split(":")
        w = params.get(f"{mname}.{attr}")
        if w is None or attr not in EXPERT_PARAM_NAMES:
            raise ValueError(f"{mname}.{proj}: the model has no expert parameter {attr!r}")
        if sorted(by_e) != list(range(w.shape[0])):
            raise ValueError(
                f"{mname}.{proj}: checkpoint has experts {sorted(by_e)}, model {w.shape[0]}"
            )
        parts = [by_e[e] for e in range(w.shape[0])]
        stacked.setdefault((mname, attr), {})[proj] = parts
    for (mname, attr), projs in stacked.items():
        w = params[f"{mname}.{attr}"]
        order = ["gate_proj", "up_proj"] if attr == "gate_up_proj" else [attr]
        if sorted(projs) != sorted(order):
            raise ValueError(f"{mname}.{attr}: checkpoint has {sorted(projs)}, needs {order}")
        # per expert, its projections in row order (gate rows before up rows)
        rows = [[projs[proj][e] for proj in order] for e in range(w.shape[0])]
        qweight = torch.stack([torch.cat([p.qweight for p in r]) for r in rows])
        scales = torch.stack([torch.cat([p.scales for p in r]) for r in rows])
        zeros = None
        if rows[0][0].zeros is not None:
            zeros = torch.stack([torch.cat([p.zeros for p in r]) for r in rows])
        global_scale = None
        if rows[0][0].global_scale is not None:
            for e, r in enumerate(rows):
                if len({float(p.global_scale) for p in r}) != 1:
                    raise ValueError(
                        f"{mname}.{attr}: expert {e}'s {order} have different "
                        "weight_global_scale values; qatpass packs them as one matrix"
                    )
            global_scale = torch.stack([r[0].global_scale for r in rows])
        dim = 1 if getattr(modules[mname], "is_transposed", False) else 2
        n_k = (w.shape[2], w.shape[1]) if dim == 1 else (w.shape[1], w.shape[2])
        if tuple(qweight.shape[1:]) != (n_k[0], n_k[1] // 8):
            raise ValueError(
                f"{mname}.{attr}: checkpoint experts pack to {list(qweight.shape)}, model "
                f"parameter {list(w.shape)} needs [{w.shape[0]}, {n_k[0]}, {n_k[1] // 8}]"
            )
        p0 = rows[0][0]
        out[(mname, attr)] = (
            "experts",
            PackedWeight(qweight, scales, zeros, w.shape, dim, w.dtype, p0.scheme, global_scale),
        )
    return out


def _with(p: PackedWeight, shape, dim: int, dtype: torch.dtype) -> PackedWeight:
    return PackedWeight(
        p.qweight, p.scales, p.zeros, torch.Size(shape), dim, dtype, p.scheme, p.global_scale
    )


def load_compressed_tensors(path: str | os.PathLike, model: nn.Module | None = None) -> nn.Module:
    """A qatpass inference model (packed W4A16 modules) from a `pack-quantized` checkpoint.

    `model`: a skeleton with the checkpoint's architecture (left untouched: a copy is filled);
    None builds the HF transformers model from config.json. Outputs equal `qatpass.convert` of
    the model that was saved.
    """
    import copy

    from qatpass.lowering import install_packed

    path = Path(path)
    cfg, _, packed, plain = read_checkpoint(path)
    model = _build_model(cfg, path) if model is None else copy.deepcopy(model)
    weights = _gather(model, packed)
    replaced = {f"{m}.{a}" for m, a in weights}
    state = model.state_dict()
    expected = {k for k in state if k not in replaced}
    _, tied = drop_tied(dict(state))
    missing = sorted(k for k in expected - set(plain) if k not in tied)
    unexpected = sorted(set(plain) - expected)
    if missing or unexpected:
        raise ValueError(
            f"{path} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    for name, t in plain.items():
        if state[name].shape != t.shape:
            raise ValueError(
                f"{path}: tensor {name!r} has shape {list(t.shape)}, model {list(state[name].shape)}"
            )
    model.load_state_dict(plain, strict=False)
    served = install_packed(model, weights)
    ours = cfg.get("quantization_config", {}).get(QATPASS_KEY)
    recorded = ours.get("plan") if isinstance(ours, dict) else None
    if recorded is not None:
        try:
            served.qatpass_plan = QuantPlan.from_dict(recorded)
        except ValueError as e:
            raise ValueError(f"{path / 'config.json'}: the recorded qatpass plan: {e}") from e
    return served
