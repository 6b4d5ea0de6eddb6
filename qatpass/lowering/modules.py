"""Packed inference modules: `W4A16Linear` (for nn.Linear) and `W4A16Experts` (HF MoE experts).

Each holds the canonical packed buffers only (qweight, scales, zeros, and global_scale for NVFP4:
what exporters and
`packed_weights` read and every kernel runs on; a device repack is the kernels' own cache,
see `qatpass.kernels.cpu`). Forward calls the ops that serve the scheme (`ops.serving`: INT4
or FP4); `repack_` re-quantizes new master
weights into the same tensors, in place, so compiled graphs see them. `weight` is a stand-in
with the original shape, dtype and device (one element, expanded), for model code that reads
`module.weight.dtype` (T5 and many HF models); its values are not the weight's.
"""

from __future__ import annotations

import torch
from torch import nn

from qatpass.kernels.cpu import CPU_PATH_NAMES, cpu_path
from qatpass.kernels.cpu.fp4_native import fp4_kernel_reason
from qatpass.lowering import ops as _ops
from qatpass.scheme import PackedWeight, QuantScheme, quantize

__all__ = ["PackedConstant", "PackedMixin", "W4A16Linear", "W4A16Experts", "write_packed_"]


@torch.no_grad()
def write_packed_(dst: PackedWeight, src: PackedWeight) -> None:
    """Copy src's packed tensors into dst's, in place: readers of dst's tensors (modules, compiled
    graphs, the kernels' repack caches, which follow the version counters) see the new values."""
    src_t, dst_t = src.tensors(), dst.tensors()
    layout = {k: None if t is None else tuple(t.shape) for k, t in src_t.items()}
    if layout != {k: None if t is None else tuple(t.shape) for k, t in dst_t.items()}:
        raise ValueError(
            f"refresh: packed layout changed: {layout} vs "
            f"{ {k: None if t is None else tuple(t.shape) for k, t in dst_t.items()} }"
        )
    for key, t in src_t.items():
        if t is not None:
            dst_t[key].copy_(t)


class PackedMixin:
    """Buffers and bookkeeping shared by the packed modules (one or more packed weights)."""

    scheme: QuantScheme

    def _register_packed(self, prefix: str, p: PackedWeight) -> None:
        for key, t in p.tensors().items():
            self.register_buffer(f"{prefix}{key}", t)
        self.op_kwargs = _ops.serving(p.scheme).kwargs(p)
        if p.scheme.kernel_family != "int4":
            reason = fp4_kernel_reason(p.dtype)
            self.cpu_path = "native" if reason is None else "dequant"
            self.cpu_fast_path_reason = None if reason is None else f"FP4 kernel: {reason}"
            return
        n, k = p.qweight.shape[-2], p.qweight.shape[-1] * 8
        self.cpu_path, self.cpu_fast_path_reason = cpu_path(
            n, k, p.group_size, p.zeros is None, p.scales.dtype, p.dtype
        )

    @property
    def cpu_path_name(self) -> str:
        return CPU_PATH_NAMES[self.cpu_path]

    def _apply(self, fn, recurse=True):
        """.to(dtype) / .half() / .float() must not re-round the scales: they keep their dtype.

        (Devices still move.) A cast model then runs on activations of another dtype through
        the exact fallback.
        """
        keep = {
            name: b
            for name, b in self._buffers.items()
            if b is not None and name.endswith(("scales", "global_scale"))
        }
        # the activation dtype the module now expects (what `weight.dtype` reports)
        probe = fn(torch.empty(0, dtype=self.orig_dtype))
        if probe.dtype.is_floating_point:
            self.orig_dtype = probe.dtype
        out = super()._apply(fn, recurse)
        for name, old in keep.items():
            new = self._buffers[name]
            if new.dtype != old.dtype:
                self._buffers[name] = old.to(new.device)
        return out

    def _packed(self, prefix: str, shape: torch.Size, dim: int) -> PackedWeight:
        return PackedWeight(
            getattr(self, f"{prefix}qweight"),
            getattr(self, f"{prefix}scales"),
            getattr(self, f"{prefix}zeros"),
            shape,
            dim,
            self.orig_dtype,
            self.scheme,
            getattr(self, f"{prefix}global_scale", None),
        )

    def _serve_linear(self, prefix: str, x: torch.Tensor, bias: torch.Tensor | None):
        s = _ops.serving(self.scheme)
        a, b, c = (getattr(self, f"{prefix}{t}") for t in s.tensors)
        return s.linear(x, a, b, c, bias, **self.op_kwargs)

    @torch.no_grad()
    def _repack(self, prefix: str, weight: torch.Tensor, shape: torch.Size, dim: int) -> None:
        if tuple(weight.shape) != tuple(shape):
            raise ValueError(
                f"refresh: new weight has shape {tuple(weight.shape)}, the packed one "
                f"{tuple(shape)}"
            )
        p = quantize(weight.detach().to(getattr(self, f"{prefix}qweight").device), self.scheme, dim)
        write_packed_(self._packed(prefix, shape, dim), p)


class W4A16Linear(PackedMixin, nn.Module):
    """nn.Linear (or HF's Conv1D) with 4-bit packed weights (INT4 or FP4) and 16-bit (or fp32)
    activations.

    y = x @ W.T + bias with W [N, K] packed. An nn.Linear weight is [N, K] reduced along dim 1;
    a Conv1D weight is [K, N] reduced along dim 0: both pack to the same [N, K/8] buffers and
    `packed()` reports the original shape and dim.
    """

    def __init__(self, packed: PackedWeight, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        if packed.qweight.dim() != 2 or len(packed.shape) != 2:
            raise ValueError(
                f"W4A16Linear needs a packed 2-d weight, got qweight "
                f"{tuple(packed.qweight.shape)} for a weight of shape {tuple(packed.shape)}"
            )
        self.weight_shape = torch.Size(packed.shape)
        self.weight_dim = packed.dim
        self.in_features = int(packed.shape[packed.dim])
        self.out_features = int(packed.shape[1 - packed.dim])
        self.scheme = packed.scheme
        self.group_size = packed.group_size
        self.orig_dtype = packed.dtype
        self._register_packed("", packed)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme: QuantScheme) -> W4A16Linear:
        return cls(quantize(linear.weight.detach(), scheme, dim=1), linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scheme.kernel_family == "int4":  # the decode hot path: no lookups
            b = self._buffers  # (nn.Module.__getattr__ costs ~0.6 us a buffer)
            return _ops.linear(
                x, b["qweight"], b["scales"], b["zeros"], b["bias"], group_size=self.group_size
            )
        return self._serve_linear("", x, self.bias)

    @property
    def weight(self) -> torch.Tensor:
        """A stand-in with the original weight's shape, dtype and device (not its values)."""
        device = self.qweight.device
        return torch.zeros((), dtype=self.orig_dtype, device=device).expand(self.weight_shape)

    def packed(self) -> PackedWeight:
        return self._packed("", self.weight_shape, self.weight_dim)

    def repack_(self, weight: torch.Tensor) -> None:
        """Re-quantize from new master weights (the original shape), in place."""
        self._repack("", weight, self.weight_shape, self.weight_dim)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, {_scheme_repr(self.scheme)}, "
            f"cpu_fast_path={self.cpu_fast_path_reason is None}"
        )


def _scheme_repr(scheme: QuantScheme) -> str:
    if scheme.kernel_family == "int4":
        return f"group_size={scheme.group_size}, symmetric={scheme.symmetric}"
    return f"scheme={scheme.name}"


def _default_gate(module: nn.Module, gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return module.act_fn(gate) * up


class W4A16Experts(PackedMixin, nn.Module):
    """HF transformers MoE experts (3D expert weights) with INT4 packed weights.

    Same forward as the module it replaces, `(hidden_states [T, H], top_k_index [T, k],
    top_k_weights [T, k]) -> [T, H]`, computed like transformers' batched_mm implementation (rows
    repeated per selected expert, routing weights applied, fp32 sum over the k experts) with
    `qatpass::w4a16_grouped_linear`. Keeps the original's act_fn, gate function, biases and post
    norm; expert parallelism sentinels are not supported.
    """

    def __init__(self, experts: nn.Module, packed: dict[str, PackedWeight]) -> None:
        super().__init__()
        if not packed:
            raise ValueError("W4A16Experts needs at least one packed expert weight")
        schemes = {p.scheme for p in packed.values()}
        if len(schemes) != 1:
            raise ValueError(f"W4A16Experts: expert weights use different schemes {schemes}")
        self.scheme = schemes.pop()
        self.orig_dtype = next(iter(packed.values())).dtype
        self.num_experts = int(next(iter(packed.values())).shape[0])
        self.has_gate = bool(getattr(experts, "has_gate", hasattr(experts, "gate_up_proj")))
        self.is_transposed = bool(getattr(experts, "is_transposed", False))
        self.has_bias = bool(getattr(experts, "has_bias", False))
        self.has_post_expert_norm = bool(getattr(experts, "has_post_expert_norm", False))
        if getattr(experts, "_is_expert_parallel", False):
            raise ValueError("W4A16Experts: expert-parallel experts modules are not supported")
        # plain attributes a custom gate function may read (alpha, limit, ...)
        for key, value in vars(experts).items():
            if not key.startswith("_") and isinstance(value, (bool, int, float, str)):
                self.__dict__.setdefault(key, value)
        for name, child in experts.named_children():
            self.add_module(name, child)
        gate_fn = getattr(type(experts), "_apply_gate", None)
        self._gate_fn = gate_fn if gate_fn is not None else _default_gate
        self.shapes: dict[str, torch.Size] = {}
        self.dims: dict[str, int] = {}
        self.group_sizes: dict[str, int] = {}
        self.op_kwargs_by_attr: dict[str, dict] = {}
        for attr, p in packed.items():
            self._register_packed(f"{attr}_", p)
            self.shapes[attr] = torch.Size(p.shape)
            self.dims[attr] = p.dim
            self.group_sizes[attr] = p.group_size
            self.op_kwargs_by_attr[attr] = self.op_kwargs
        # every other parameter (biases, unquantized experts) is kept as it was
        for name, param in experts.named_parameters(recurse=False):
            if name not in packed:
                self.register_parameter(name, param)
        self.up_name = "gate_up_proj" if self.has_gate else "up_proj"

    def _project(self, attr: str, x: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        bias = getattr(self, f"{attr}_bias", None) if self.has_bias else None
        if attr not in self.shapes:  # left in high precision (excluded): gather, as batched_mm
            w = getattr(self, attr)[expert_ids]
            w = w if self.is_transposed else w.transpose(-2, -1)
            y = torch.bmm(x.unsqueeze(1), w).squeeze(1)
            return y if bias is None else y + bias[expert_ids]
        s = _ops.serving(self.scheme)
        a, b, c = (getattr(self, f"{attr}_{t}") for t in s.tensors)
        return s.grouped_op(x, a, b, expert_ids, c, bias, **self.op_kwargs_by_attr[attr])

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        num_tokens, hidden_dim = hidden_states.shape
        top_k = top_k_index.shape[-1]
        expert_ids = top_k_index.reshape(-1)
        x = hidden_states.repeat_interleave(top_k, dim=0)
        h = self._project(self.up_name, x, expert_ids)
        h = self._gate_fn(self, h) if self.has_gate else self.act_fn(h)
        y = self._project("down_proj", h, expert_ids)
        if self.has_post_expert_norm:
            y = self.post_expert_norm(y)
        y = y * top_k_weights.reshape(-1, 1)
        return y.view(num_tokens, top_k, hidden_dim).sum(dim=1).to(hidden_states.dtype)

    def packed(self) -> dict[str, PackedWeight]:
        return {a: self._packed(f"{a}_", s, self.dims[a]) for a, s in self.shapes.items()}

    def repack_(self, weights: dict[str, torch.Tensor]) -> None:
        """Re-quantize from new master expert weights {attr: [E, N, K] tensor}, in place."""
        for attr, w in weights.items():
            if attr not in self.shapes:
                raise KeyError(f"W4A16Experts has no packed weight {attr!r}")
            self._repack(f"{attr}_", w, self.shapes[attr], self.dims[attr])

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, packed={sorted(self.shapes)}, "
            f"{_scheme_repr(self.scheme)}"
        )


class PackedConstant(PackedMixin, nn.Module):
    """One packed weight as buffers, no forward: the constants of a lowered graph."""

    def __init__(self, packed: PackedWeight) -> None:
        super().__init__()
        self.scheme = packed.scheme
        self.orig_dtype = packed.dtype
        self.shape = torch.Size(packed.shape)
        self.dim = packed.dim
        self.group_size = packed.group_size
        self._register_packed("", packed)

    def packed(self) -> PackedWeight:
        return self._packed("", self.shape, self.dim)

    def repack_(self, weight: torch.Tensor) -> None:
        self._repack("", weight, self.shape, self.dim)
