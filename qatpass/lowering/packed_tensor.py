"""`PackedTensor`: a planned weight that no serving module owns, packed in place of the parameter.

Model code that uses a bare `nn.Parameter` directly (`F.linear(x, self.w)`, `x @ self.w`,
`torch.einsum("bk,nk->bn", x, self.w)`) keeps working after `convert`: the parameter is replaced
by a tensor subclass with the original shape, dtype and device that holds the canonical packed
buffers. Through `__torch_function__`:
- `F.linear(x, w, b)` with w reduced along dim 1, and `x @ w` / `torch.matmul(x, w)` with w
  [K, N] reduced along dim 0, run the scheme's serving op (`qatpass::w4a16_linear`, `fp4_linear`) on the packed buffers;
- every other use (einsum, bmm, arithmetic, printing, `.to()`) sees the dequantized weight,
  `scheme.dequantize`, which is bit for bit the fake-quantized weight training used.
So no use of a planned weight ever runs in high precision, and the fast uses run packed.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_map

from qatpass.lowering import ops as _ops
from qatpass.scheme import PackedWeight, dequantize

__all__ = ["PackedTensor"]


class PackedTensor(torch.Tensor):
    """A weight stored packed (see the module docstring); `.packed` is its PackedWeight."""

    packed: PackedWeight

    @staticmethod
    def __new__(cls, packed: PackedWeight) -> PackedTensor:
        t = torch.Tensor._make_wrapper_subclass(
            cls,
            tuple(packed.shape),
            dtype=packed.dtype,
            device=packed.qweight.device,
            requires_grad=False,
        )
        t.packed = packed
        return t

    def __repr__(self, *, tensor_contents: Any = None) -> str:
        p = self.packed
        return (
            f"PackedTensor(shape={tuple(p.shape)}, dim={p.dim}, dtype={p.dtype}, "
            f"scheme={p.scheme}, group_size={p.group_size})"
        )

    def __deepcopy__(self, memo: dict) -> PackedTensor:
        p = self.packed
        t = {k: None if v is None else v.clone() for k, v in p.tensors().items()}
        return PackedTensor(
            PackedWeight(
                t["qweight"], t["scales"], t["zeros"], p.shape, p.dim, p.dtype, p.scheme,
                t["global_scale"],
            )
        )  # fmt: skip

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize(self.packed, dtype)

    def _linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        p = self.packed
        s = _ops.serving(p.scheme)
        a, b, c = (getattr(p, t) for t in s.tensors)
        return s.linear(x, a, b, c, bias, **s.kwargs(p))

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        fast = _fast_path(func, args, kwargs)
        if fast is not None:
            return fast
        with torch._C.DisableTorchFunctionSubclass():
            return func(*tree_map(_dequantized, args), **tree_map(_dequantized, kwargs))

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return func(*tree_map(_dequantized, args), **tree_map(_dequantized, kwargs or {}))


def _dequantized(a: Any) -> Any:
    return a.dequantize() if isinstance(a, PackedTensor) else a


_MATMULS = (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__)


def _fast_path(func, args, kwargs) -> torch.Tensor | None:
    """The packed W4A16 call for linear / matmul uses that match the packed layout, else None."""
    if func is F.linear:
        x = args[0] if args else kwargs.get("input")
        w = args[1] if len(args) > 1 else kwargs.get("weight")
        b = args[2] if len(args) > 2 else kwargs.get("bias")
        if _plain(x) and isinstance(w, PackedTensor) and w.packed.dim == 1 and _plain(b, True):
            return w._linear(x, b)
    elif func in _MATMULS and len(args) == 2 and not kwargs:
        x, w = args
        if _plain(x) and isinstance(w, PackedTensor) and w.packed.dim == 0 and x.dim() >= 1:
            return w._linear(x, None)
    return None


def _plain(t: Any, optional: bool = False) -> bool:
    if t is None:
        return optional
    return isinstance(t, torch.Tensor) and not isinstance(t, PackedTensor)
