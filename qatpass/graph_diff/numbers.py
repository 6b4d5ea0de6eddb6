"""Per-layer numbers: how much accuracy each quantized parameter loses, and fake == real.

For every quantized parameter w (reduction dim d, the scheme's formulas from qatpass.scheme):
- weight SQNR (dB) and max |w - fake_quantize(w)|;
- fake-vs-real weight mismatch max |fake_quantize(w) - dequantize(quantize(w))| (must be 0);
- for nn.Linear weights, on the inputs the layer saw in one eager run of the model (forward hooks,
  removed after): output SQNR of F.linear with the fake-quant weight and of the real W4A16 path
  (`qatpass::w4a16_linear` on the packed weight when the op is registered, else F.linear on
  `dequantize(quantize(w))`, labelled as such) against F.linear in fp32, and the max
  |fake - real| between the two quantized outputs;
- for MoE experts' 3D parameters: output SQNR of the experts module on the calls it saw, with that
  one parameter fake-quantized (torch.func.functional_call; no real-path column).
SQNR = 10 log10(sum ref^2 / sum (ref - test)^2), accumulated in float64 over all calls; inf when
the two agree exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.utils._pytree import tree_map

from qatpass.fake_quant import fake_quantize
from qatpass.graph_diff.capture import call_model
from qatpass.report import QuantizedParam
from qatpass.scheme import PackedWeight, QuantScheme, dequantize, quantize

__all__ = ["LayerNumbers", "sqnr_db", "real_path", "real_linear", "layer_numbers"]

DEQUANT_PATH = "F.linear(x, dequantize(quantize(w)))"
KERNEL_PATH = "qatpass::w4a16_linear"


@dataclass
class LayerNumbers:
    """The numbers of one quantized parameter."""

    fqn: str
    kind: str  # "linear" (nn.Linear weight), "experts" (MoE 3D parameter) or "other" (weight only)
    shape: tuple[int, ...]
    dim: int
    group_size: int
    weight_sqnr_db: float
    weight_max_abs_err: float
    fake_vs_real_max_abs: float  # max |fake_quantize(w) - dequantize(quantize(w))|, must be 0
    output_sqnr_fake_db: float | None = None
    output_sqnr_real_db: float | None = None
    output_fake_vs_real_max_abs: float | None = None
    calls: int = 0  # how many times the layer ran during the eager run
    # the code behind the real output column, e.g. "aten int4pack (CPU)"
    real_kernel: str | None = None

    @property
    def sort_key(self) -> tuple[int, float]:
        """Worst first: layers with output numbers by output SQNR, then the rest by weight SQNR."""
        if self.output_sqnr_fake_db is not None:
            return 0, self.output_sqnr_fake_db
        return 1, self.weight_sqnr_db


def _energy(ref: torch.Tensor, test: torch.Tensor) -> tuple[float, float]:
    r = ref.detach().to(torch.float64)
    return float(r.square().sum()), float((r - test.detach().to(torch.float64)).square().sum())


def _db(signal: float, noise: float) -> float:
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def sqnr_db(ref: torch.Tensor, test: torch.Tensor) -> float:
    """Signal to quantization noise ratio of test against ref, in dB (inf when equal)."""
    if ref.shape != test.shape:
        raise ValueError(
            f"sqnr_db needs equal shapes, got {tuple(ref.shape)} and {tuple(test.shape)}"
        )
    return _db(*_energy(ref, test))


def real_path() -> str:
    """KERNEL_PATH when `qatpass::w4a16_linear` is registered (by qatpass.lowering), else DEQUANT_PATH."""
    try:
        import qatpass.lowering  # noqa: F401  (registers qatpass::w4a16_linear when present)
    except ImportError:
        pass
    return KERNEL_PATH if hasattr(torch.ops.qatpass, "w4a16_linear") else DEQUANT_PATH


def real_linear(
    packed: PackedWeight, bias: torch.Tensor | None, like: torch.Tensor, path: str
) -> tuple[Callable[[torch.Tensor], torch.Tensor], str]:
    """The real W4A16 linear x -> y of one layer for inputs like `like`, prepared once as a
    converted model would be (`kernels.cpu.cpu_path`); and what runs."""
    if path != KERNEL_PATH:
        return lambda x: F.linear(x, dequantize(packed, x.dtype), bias), DEQUANT_PATH
    if packed.scheme.kernel_family != "int4":  # FP4: its serving op, dequantize + linear inside
        from qatpass.lowering.ops import serving

        s = serving(packed.scheme)
        a, b, c = (getattr(packed, t) for t in s.tensors)
        kwargs = s.kwargs(packed)
        return lambda x: s.linear_op(x, a, b, c, bias, **kwargs), f"qatpass::fp4_linear ({kwargs})"
    g = packed.group_size
    if like.device.type == "cuda":
        how = "triton (CUDA)"
    else:
        from qatpass.kernels.cpu import CPU_PATH_NAMES, cpu_path

        n, k = packed.qweight.shape[-2], packed.qweight.shape[-1] * 8
        path, reason = cpu_path(n, k, g, packed.zeros is None, packed.scales.dtype, like.dtype)
        how = CPU_PATH_NAMES[path] + (f": {reason}" if reason else "")

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.ops.qatpass.w4a16_linear(
            x, packed.qweight, packed.scales, packed.zeros, bias, group_size=g
        )

    return run, how


def _resolve(model: nn.Module, fqn: str) -> tuple[nn.Module, str] | None:
    owner, _, attr = fqn.rpartition(".")
    try:
        module = model.get_submodule(owner)
    except AttributeError:
        return None
    return module, attr


def _kind(model: nn.Module, q: QuantizedParam) -> str:
    from qatpass.selection import is_experts_module

    found = _resolve(model, q.fqn)
    if found is None:
        return "other"
    module, attr = found
    if isinstance(module, nn.Linear) and attr == "weight" and q.dim == 1:
        return "linear"
    if is_experts_module(module) and len(q.shape) == 3:
        return "experts"
    return "other"


def _capture_calls(
    model: nn.Module, module_names: Iterable[str], example_inputs
) -> dict[str, list[tuple[tuple, dict]]]:
    """module name -> the (args, kwargs) of each call during one eager run (hooks removed after)."""
    calls: dict[str, list[tuple[tuple, dict]]] = {name: [] for name in module_names}
    handles = []

    def keep(x):
        return x.detach().clone() if isinstance(x, torch.Tensor) else x

    def hook_for(name: str):
        def hook(module, args, kwargs, output):
            calls[name].append((tree_map(keep, args), tree_map(keep, kwargs)))

        return hook

    try:
        for name in calls:
            module = model.get_submodule(name)
            handles.append(module.register_forward_hook(hook_for(name), with_kwargs=True))
        with torch.no_grad():
            call_model(model, example_inputs)
    finally:
        for h in handles:
            h.remove()
    return calls


def _first_tensor(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"cannot compare module outputs of type {type(out).__name__}")


def _linear_outputs(row, calls, module, w, fq, packed, path) -> None:
    """Output numbers of an nn.Linear: high precision vs fake quant vs the real W4A16 path."""
    bias = module.bias
    xs = [args[0] if args else kwargs["input"] for args, kwargs in calls]
    real, row.real_kernel = real_linear(packed, bias, xs[0], path)
    sig = noise_fake = noise_real = worst = 0.0
    for x in xs:
        ref = F.linear(x.float(), w.float(), None if bias is None else bias.float())
        y_fake = F.linear(x, fq, bias)
        y_real = real(x)
        s, n = _energy(ref, y_fake)
        sig, noise_fake = sig + s, noise_fake + n
        noise_real += _energy(ref, y_real)[1]
        worst = max(worst, float((y_fake.float() - y_real.float()).abs().max()))
    row.output_sqnr_fake_db = _db(sig, noise_fake)
    row.output_sqnr_real_db = _db(sig, noise_real)
    row.output_fake_vs_real_max_abs = worst


def _module_outputs(row, calls, module, attr, fq) -> None:
    """Output SQNR of a whole module (MoE experts) with one parameter fake-quantized."""
    sig = noise = 0.0
    for args, kwargs in calls:
        ref = _first_tensor(module(*args, **kwargs))
        test = _first_tensor(functional_call(module, {attr: fq}, args, kwargs))
        s, n = _energy(ref, test)
        sig, noise = sig + s, noise + n
    row.output_sqnr_fake_db = _db(sig, noise)


def layer_numbers(
    model: nn.Module, quantized: Iterable[QuantizedParam], scheme: QuantScheme, example_inputs
) -> tuple[list[LayerNumbers], str]:
    """Numbers for each quantized parameter (once per fqn), worst first; and the real path's label."""
    params = dict(model.named_parameters(remove_duplicate=False))
    unique = {q.fqn: q for q in quantized}
    missing = sorted(f for f in unique if f not in params)
    if missing:
        raise ValueError(f"quantized parameters not found in the model: {missing}")
    kinds = {f: _kind(model, q) for f, q in unique.items()}
    owners = {f: f.rpartition(".")[0] for f in unique}
    calls = _capture_calls(
        model, sorted({owners[f] for f, k in kinds.items() if k != "other"}), example_inputs
    )
    label = real_path()
    rows = []
    with torch.no_grad():
        for fqn, q in unique.items():
            w = params[fqn].detach()
            fq = fake_quantize(w, scheme, q.dim)
            packed = quantize(w, scheme, q.dim)
            dq = dequantize(packed)
            err = (w.float() - fq.float()).abs()
            row = LayerNumbers(
                fqn=fqn,
                kind=kinds[fqn],
                shape=tuple(q.shape),
                dim=q.dim,
                group_size=q.group_size,
                weight_sqnr_db=sqnr_db(w, fq),
                weight_max_abs_err=float(err.max()) if err.numel() else 0.0,
                fake_vs_real_max_abs=float((fq.float() - dq.float()).abs().max()),
            )
            mine = calls.get(owners[fqn], [])
            row.calls = len(mine)
            if mine and row.kind == "linear":
                module = model.get_submodule(owners[fqn])
                _linear_outputs(row, mine, module, w, fq, packed, label)
            elif mine and row.kind == "experts":
                module = model.get_submodule(owners[fqn])
                _module_outputs(row, mine, module, fqn.rpartition(".")[2], fq)
            rows.append(row)
    rows.sort(key=lambda r: r.sort_key)
    return rows, label
