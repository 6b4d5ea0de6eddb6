"""The quantization schemes' protocol and the INT4 scheme: every INT4 formula, in one place.

`QuantScheme` is what the pass, the plan, lowering, convert, the exporters and the diff take: a
frozen object with a name, a block size along K and its own quantize / dequantize / fake quant.
`Int4Scheme` (here) and `Fp4Scheme` (NVFP4, MXFP4: `qatpass.scheme_fp4`) implement it; the
module-level `quantize`, `dequantize`, `check_quantizable`, `fake_quantize_values` take any
scheme and call its methods. For INT4, `Int4Scheme` says how a weight is quantized; the
functions below are the only implementation of that math. Fake quant (training), packing (serving), every kernel's reference and every exporter
call them, so a model trained with fake quant is bit for bit the model that is served:

    fake_quantize(w, scheme) == dequantize(quantize(w, scheme))      # exactly, every dtype

Conventions (see DESIGN.md):
- groups of `group_size` consecutive elements along the reduction dim K (-1: one group per row);
- symmetric: scale = amax / divisor, divisor 7 for qrange (-7, 7), 7.5 for (-8, 7);
  asymmetric: scale = (max - min) / (qmax - qmin), integer zero point in qrange;
- scales computed in fp32, clamped into the finite positive range of `scale_dtype`, rounded to
  `scale_dtype`, and that rounded value is what quantizes and dequantizes; round half to even;
- never Inf: codes are clamped so that |(code - zero) * scale| <= the weight dtype's max (only the
  outermost code of a group at the dtype's edge moves, e.g. fp16 weights >= 61440 under (-8, 7));
  a weight beyond what scale_dtype can scale (|w| > 7 * 65504 with fp16 scales) saturates in fake
  quant and is refused by `quantize`;
- packed layout: codes offset by 8 (0..15), packed along K, low nibble first: uint8 [N, K/2]
  viewed as int32 [N, K/8] (compressed-tensors `pack-quantized`, ONNX `MatMulNBits`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = [
    "QuantScheme",
    "Int4Scheme",
    "parse_scheme",
    "scheme_from_dict",
    "pack_nibbles",
    "unpack_nibbles",
    "PackedWeight",
    "round_to_dtype",
    "compute_qparams",
    "quantize_codes",
    "dequantize_codes",
    "fake_quantize_values",
    "pack_int4",
    "unpack_int4",
    "quantize",
    "dequantize",
    "check_quantizable",
    "check_dim",
    "parse_scale_dtype",
]

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_SCALE_DTYPE_NAMES = {str(d).removeprefix("torch."): d for d in _FLOAT_DTYPES}
_DICT_KEYS = ("group_size", "symmetric", "qrange", "scale_dtype")


def check_scheme_dict(d: object, keys: tuple[str, ...], what: str) -> None:
    """Refuse a scheme dict that is not a dict or holds a key outside `keys` (names them)."""
    if not isinstance(d, dict):
        raise TypeError(f"a scheme dict must be a dict, got {type(d).__name__}")
    unknown = sorted(set(d) - set(keys))
    if unknown:
        raise ValueError(f"unknown {what} key(s) {unknown}; known: {list(keys)}")


CODE_OFFSET = 8  # stored nibble = code + 8, so codes in [-8, 7] fit 0..15
_NIBBLE_OFFSETS = -0x77777778  # int32 0x88888888: CODE_OFFSET's bit in each of the 8 nibbles


class QuantScheme:
    """The protocol every scheme implements (subclasses are frozen dataclasses).

    - `name` ("int4", "nvfp4", "mxfp4") and `kernel_family` (which serving ops run it);
    - `group_size_for(k)`: the block along K a scale covers; `check_quantizable(shape, dim)`;
    - `fake_quantize_values(w, dim)` == `dequantize(quantize(w, dim))` bit for bit, no autograd;
    - `quantize(w, dim) -> PackedWeight`, `dequantize(p, dtype) -> Tensor`;
    - `fake_quant_op` (the `torch.ops.qatpass` op name) and `op_kwargs()` (its keyword arguments
      besides `dim`), `to_dict()` / `from_dict()`, `bytes_per_weight(k)`.
    """

    name: str = ""
    kernel_family: str = ""
    fake_quant_op: str = ""

    def group_size_for(self, k: int) -> int:
        raise NotImplementedError

    def check_quantizable(self, shape: torch.Size | tuple[int, ...], dim: int) -> str | None:
        raise NotImplementedError

    def fake_quantize_values(self, w: torch.Tensor, dim: int) -> torch.Tensor:
        raise NotImplementedError

    def quantize(self, w: torch.Tensor, dim: int) -> PackedWeight:
        raise NotImplementedError

    def dequantize(self, p: PackedWeight, dtype: torch.dtype | None = None) -> torch.Tensor:
        raise NotImplementedError

    def op_kwargs(self) -> dict:
        raise NotImplementedError

    def to_dict(self) -> dict:
        raise NotImplementedError

    def bytes_per_weight(self, k: int) -> float:
        """Stored bytes per weight for a reduction dim of length k (codes, scales, zero points,
        the per-tensor scale not counted)."""
        raise NotImplementedError


@dataclass(frozen=True)
class Int4Scheme(QuantScheme):
    """How weights are quantized to INT4. Frozen, hashable, validated on construction."""

    name = "int4"
    kernel_family = "int4"
    fake_quant_op = "fake_quantize_int4"

    group_size: int = 32
    symmetric: bool = True
    qrange: tuple[int, int] = (-7, 7)
    scale_dtype: torch.dtype = torch.bfloat16

    def __post_init__(self) -> None:
        gs = self.group_size
        if not isinstance(gs, int) or isinstance(gs, bool):
            raise TypeError(f"group_size must be an int, got {type(gs).__name__}")
        if gs != -1 and (gs < 8 or gs > 4096 or gs & (gs - 1)):
            raise ValueError(
                f"group_size must be -1 (per channel) or a power of two in [8, 4096], got {gs}"
            )
        qrange = tuple(self.qrange)
        if qrange not in ((-7, 7), (-8, 7)):
            raise ValueError(f"qrange must be (-7, 7) or (-8, 7), got {self.qrange!r}")
        object.__setattr__(self, "qrange", qrange)
        if not isinstance(self.symmetric, bool):
            raise TypeError(
                f"symmetric must be a bool (true/false), got {type(self.symmetric).__name__} {self.symmetric!r}"
            )
        if self.scale_dtype not in _FLOAT_DTYPES:
            raise ValueError(
                f"scale_dtype must be one of float32, bfloat16, float16, got {self.scale_dtype}"
            )

    @property
    def qmin(self) -> int:
        return self.qrange[0]

    @property
    def qmax(self) -> int:
        return self.qrange[1]

    @property
    def divisor(self) -> float:
        """amax / divisor is the symmetric scale: 7 for (-7, 7), 7.5 for (-8, 7)."""
        return 7.0 if self.qrange == (-7, 7) else 7.5

    def group_size_for(self, k: int) -> int:
        """The group size used for a reduction dim of length k (k itself when per channel)."""
        return k if self.group_size == -1 else self.group_size

    def to_dict(self) -> dict:
        return {
            "group_size": self.group_size,
            "symmetric": self.symmetric,
            "qrange": list(self.qrange),
            "scale_dtype": str(self.scale_dtype).removeprefix("torch."),
        }

    @classmethod
    def from_dict(cls, d: dict) -> Int4Scheme:
        """Inverse of to_dict, strict: JSON types exactly (a bool is true/false, never "false")."""
        check_scheme_dict(d, _DICT_KEYS, "scheme")
        qrange = d.get("qrange", (-7, 7))
        if not isinstance(qrange, (list, tuple)) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in qrange
        ):
            raise TypeError(f"qrange must be a list of two ints, got {qrange!r}")
        return cls(
            group_size=d.get("group_size", 32),
            symmetric=d.get("symmetric", True),
            qrange=tuple(qrange),
            scale_dtype=parse_scale_dtype(d.get("scale_dtype", "bfloat16")),
        )

    # --- the QuantScheme protocol: the INT4 functions below -----------------------------

    def check_quantizable(self, shape: torch.Size | tuple[int, ...], dim: int) -> str | None:
        return _int4_check_quantizable(shape, dim, self)

    def fake_quantize_values(self, w: torch.Tensor, dim: int) -> torch.Tensor:
        return _int4_fake_quantize_values(w, self, dim)

    def quantize(self, w: torch.Tensor, dim: int) -> PackedWeight:
        return _int4_quantize(w, self, dim)

    def dequantize(self, p: PackedWeight, dtype: torch.dtype | None = None) -> torch.Tensor:
        return _int4_dequantize(p, dtype)

    def op_kwargs(self) -> dict:
        return {
            "group_size": self.group_size,
            "symmetric": self.symmetric,
            "qmin": self.qmin,
            "qmax": self.qmax,
            "scale_dtype": self.scale_dtype,
        }

    def bytes_per_weight(self, k: int) -> float:
        g = self.group_size_for(k)
        per_group = torch.finfo(self.scale_dtype).bits // 8 + (0 if self.symmetric else 1)
        return 0.5 + per_group / g


def scheme_from_dict(d: dict) -> QuantScheme:
    """The scheme a `to_dict()` dict describes: FP4 dicts carry "format", INT4 dicts do not."""
    if isinstance(d, dict) and "format" in d:
        from qatpass.scheme_fp4 import Fp4Scheme

        return Fp4Scheme.from_dict(d)
    return Int4Scheme.from_dict(d)


def parse_scheme(value: str | dict | QuantScheme, name: str = "scheme") -> QuantScheme:
    """A scheme from an object, a `to_dict()` dict or a name: "int4", "nvfp4", "mxfp4"."""
    if isinstance(value, QuantScheme):
        return value
    if isinstance(value, dict):
        return scheme_from_dict(value)
    if value == "int4":
        return Int4Scheme()
    if value in ("nvfp4", "mxfp4"):
        from qatpass.scheme_fp4 import Fp4Scheme

        return Fp4Scheme(value)
    raise ValueError(
        f"{name} must be a scheme object, a scheme dict or one of 'int4', 'nvfp4', 'mxfp4', "
        f"got {value!r}"
    )


def parse_scale_dtype(value: str | torch.dtype, name: str = "scale_dtype") -> torch.dtype:
    """The torch dtype a scale_dtype names: "float32", "bfloat16", "float16" (or the dtype)."""
    if isinstance(value, torch.dtype):
        return value
    if isinstance(value, str) and value in _SCALE_DTYPE_NAMES:
        return _SCALE_DTYPE_NAMES[value]
    raise ValueError(f"{name} must be one of {sorted(_SCALE_DTYPE_NAMES)}, got {value!r}")


def check_dim(w: torch.Tensor, dim: int) -> int:
    """`dim` as a non-negative index into w's dims; refuses non-matrix tensors and bad dims."""
    if w.dim() < 2:
        raise ValueError(f"a {w.dim()}-d tensor of shape {tuple(w.shape)} is not a matmul weight")
    if not isinstance(dim, int) or isinstance(dim, bool):
        raise TypeError(f"dim must be an int, got {type(dim).__name__}")
    if not -w.dim() <= dim < w.dim():
        raise ValueError(
            f"dim {dim} is out of range for a {w.dim()}-d weight of shape {tuple(w.shape)}"
        )
    return dim % w.dim()


def check_quantizable(
    shape: torch.Size | tuple[int, ...], dim: int, scheme: QuantScheme
) -> str | None:
    """Why a weight of this shape cannot be quantized along `dim`, or None when it can."""
    return scheme.check_quantizable(shape, dim)


def _int4_check_quantizable(
    shape: torch.Size | tuple[int, ...], dim: int, scheme: Int4Scheme
) -> str | None:
    if len(shape) < 2:
        return f"a {len(shape)}-d tensor is not a matmul weight"
    k = shape[dim]
    if k == 0:
        return f"reduction dim {dim} has size 0"
    g = scheme.group_size_for(k)
    if k % g:
        return f"reduction dim {dim} of size {k} is not divisible by group_size {g}"
    if k % 8:
        return f"reduction dim {dim} of size {k} is not divisible by 8 (int32 packing)"
    return None


def _grouped(w: torch.Tensor, dim: int, scheme: Int4Scheme) -> torch.Tensor:
    """fp32 view of w with the reduction dim last, split into groups: [..., K/G, G]."""
    reason = scheme.check_quantizable(w.shape, dim)
    if reason is not None:
        raise ValueError(f"cannot quantize weight of shape {tuple(w.shape)}: {reason}")
    x = w.movedim(dim, -1).to(torch.float32)
    g = scheme.group_size_for(x.shape[-1])
    return x.reshape(*x.shape[:-1], x.shape[-1] // g, g)


_MANTISSA_BITS = {torch.float32: 23, torch.bfloat16: 7, torch.float16: 10}


def round_to_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp32 x rounded to the nearest `dtype` value (ties to even), still as fp32.

    Done with integer ops on the bits, not `.to(dtype).to(float32)`: compilers may elide that cast
    pair (Inductor does), which would silently change every scale. Valid for x in the normal range
    of `dtype`, which `compute_qparams` guarantees by clamping first.
    """
    drop = 23 - _MANTISSA_BITS[dtype]
    if drop == 0:
        return x
    bits = x.view(torch.int32)
    bits = bits + ((1 << (drop - 1)) - 1) + ((bits >> drop) & 1)
    return (bits & ~((1 << drop) - 1)).view(torch.float32)


def _raw_scales(groups: torch.Tensor, scheme: Int4Scheme) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp32 scales before clamping and rounding, each group's low end) of fp32 groups [..., G]."""
    if scheme.symmetric:
        return groups.abs().amax(dim=-1) / scheme.divisor, groups.new_zeros(())
    lo = groups.amin(dim=-1).clamp(max=0.0)
    hi = groups.amax(dim=-1).clamp(min=0.0)
    return (hi - lo) / float(scheme.qmax - scheme.qmin), lo


def compute_qparams(
    groups: torch.Tensor, scheme: Int4Scheme
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scales and integer zero points (or None) of fp32 groups [..., G], both as fp32 tensors.

    The scales hold values exactly representable in scale_dtype (storing them is lossless).
    """
    return _qparams_from_raw(*_raw_scales(groups, scheme), scheme)


def _qparams_from_raw(
    raw: torch.Tensor, lo: torch.Tensor, scheme: Int4Scheme
) -> tuple[torch.Tensor, torch.Tensor | None]:
    info = torch.finfo(scheme.scale_dtype)
    scales = round_to_dtype(raw.clamp(min=info.tiny, max=info.max), scheme.scale_dtype)
    if scheme.symmetric:
        return scales, None
    zeros = (scheme.qmin - torch.round(lo / scales)).clamp(scheme.qmin, scheme.qmax)
    return scales, zeros


def quantize_codes(
    groups: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    scheme: Int4Scheme,
    dtype: torch.dtype | None = torch.float32,
) -> torch.Tensor:
    """Integer codes (as fp32) in [qmin, qmax] of fp32 groups [..., G], for weights of `dtype`.

    Codes are also clamped so that |(code - zero) * scale| <= finfo(dtype).max: dequantizing to
    the weight dtype never overflows to Inf (an fp16 group whose amax is >= 61440 under (-8, 7)
    would otherwise dequantize its -amax to -8 * amax / 7.5). `dtype=None` skips that clamp, for
    a caller that checked it changes nothing (`_dtype_clamp_is_noop`).
    """
    s = scales.float().unsqueeze(-1)
    q = groups / s
    q.round_()
    z = 0.0 if zeros is None else zeros.float().unsqueeze(-1)
    if zeros is not None:
        q.add_(z)
    q.clamp_(scheme.qmin, scheme.qmax)
    if dtype is None:
        return q
    # as many steps of `scale` as fit in the dtype's range (inf for small scales: no clamp)
    span = torch.floor(torch.finfo(dtype).max / s)
    return torch.minimum(torch.maximum(q, z - span), z + span)


def dequantize_codes(
    codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None
) -> torch.Tensor:
    """fp32 values of codes [..., K/G, G]: (code - zero) * scale, computed in fp32."""
    c = codes.float()
    if zeros is not None:
        c = c - zeros.float().unsqueeze(-1)
    return c * scales.float().unsqueeze(-1)


def fake_quantize_values(w: torch.Tensor, scheme: QuantScheme, dim: int = -1) -> torch.Tensor:
    """dequantize(quantize(w)) computed without packing; same shape and dtype as w. No autograd."""
    return scheme.fake_quantize_values(w, check_dim(w, dim))


def _int4_fake_quantize_values(w: torch.Tensor, scheme: Int4Scheme, dim: int) -> torch.Tensor:
    groups = _grouped(w, dim, scheme)
    scales, zeros = compute_qparams(groups, scheme)
    codes = quantize_codes(groups, scales, zeros, scheme, w.dtype)
    dq = dequantize_codes(codes, scales, zeros)
    moved = w.movedim(dim, -1).shape
    return dq.reshape(moved).to(w.dtype).movedim(-1, dim)


def pack_nibbles(u: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit values [..., K] (uint8, 0..15) to int32 [..., K/8], low nibble = lower k."""
    if u.shape[-1] % 8:
        raise ValueError(f"last dim {u.shape[-1]} is not divisible by 8")
    # each pair of bytes as one little-endian int16 (low byte = even k): contiguous 16-bit ops,
    # about 1.7x faster than combining the strided even and odd bytes
    u = u.contiguous() if u.storage_offset() % 2 == 0 else u.clone()  # dtype views need it
    pairs = u.reshape(-1).view(torch.int16)
    byte = ((pairs & 0xF) | ((pairs >> 4) & 0xF0)).to(torch.uint8)
    return byte.view(torch.int32).reshape(*u.shape[:-1], -1)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_nibbles: int32 [..., K/8] -> uint8 [..., K] in 0..15."""
    if packed.dtype != torch.int32:
        raise TypeError(f"packed weights must be int32, got {packed.dtype}")
    byte = packed.contiguous().reshape(-1).view(torch.uint8).reshape(*packed.shape[:-1], -1)
    return torch.stack((byte & 0xF, byte >> 4), dim=-1).flatten(-2)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Pack integer codes [..., K] in [-8, 7] to int32 [..., K/8], low nibble = lower k."""
    if codes.shape[-1] % 8:
        raise ValueError(f"last dim {codes.shape[-1]} is not divisible by 8")
    return pack_nibbles((codes.to(torch.int16) + CODE_OFFSET).to(torch.uint8))


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_int4: int32 [..., K/8] -> int8 codes [..., K] in [-8, 7]."""
    return unpack_nibbles(packed).to(torch.int8) - CODE_OFFSET


@dataclass
class PackedWeight:
    """A weight in the canonical packed format.

    qweight: int32 [..., N, K/8] (4-bit codes, low nibble first); scales [..., N, K/G] in the
    scheme's scale storage dtype; zeros: int8 [..., N, K/G] (INT4 asymmetric only); global_scale:
    fp32 [...] (NVFP4 only: one per matrix, so [E] for experts). `shape`/`dim`/`dtype` describe
    the original tensor: K = shape[dim].
    """

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    shape: torch.Size
    dim: int
    dtype: torch.dtype
    scheme: QuantScheme = field(default_factory=Int4Scheme)
    global_scale: torch.Tensor | None = None

    @property
    def group_size(self) -> int:
        return self.scheme.group_size_for(self.shape[self.dim])

    def tensors(self) -> dict[str, torch.Tensor | None]:
        """The packed tensors by field name (None where the scheme has none)."""
        return {
            "qweight": self.qweight,
            "scales": self.scales,
            "zeros": self.zeros,
            "global_scale": self.global_scale,
        }

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values() if t is not None)


def _check_scalable(
    raw: torch.Tensor, groups: torch.Tensor, shape: torch.Size, scheme: Int4Scheme
) -> None:
    """Refuse groups whose raw scale would saturate at scale_dtype's max (codes would clip)."""
    info = torch.finfo(scheme.scale_dtype)
    if bool((raw > info.max).any()):
        if scheme.symmetric:
            fits = f"|w| <= {scheme.divisor * info.max:.6g}"
        else:
            fits = f"max - min <= {(scheme.qmax - scheme.qmin) * info.max:.6g} per group"
        raise ValueError(
            f"weight of shape {tuple(shape)} has values up to {float(groups.abs().amax()):.6g}, "
            f"beyond what {str(scheme.scale_dtype).removeprefix('torch.')} scales represent "
            f"(scale <= {info.max:.6g}: {fits}); "
            + (
                "use scale_dtype bfloat16 or float32"
                if scheme.scale_dtype == torch.float16
                else "the weight's range overflows float32"
            )
        )


def quantize(w: torch.Tensor, scheme: QuantScheme | None = None, dim: int = -1) -> PackedWeight:
    """Quantize and pack w along its reduction dim `dim` (last by default, as for nn.Linear)."""
    scheme = scheme or Int4Scheme()
    if w.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"can only quantize float32/bfloat16/float16 weights, got {w.dtype}")
    # each scheme refuses NaN/Inf (`check_finite`; the native INT4 kernel in its one pass)
    return scheme.quantize(w.detach(), check_dim(w, dim))


def check_finite(w: torch.Tensor) -> None:
    """Refuse a weight holding NaN or Inf (ValueError naming how many)."""
    # one pass without allocation: NaN and Inf propagate through a sum; only a non-finite sum
    # (a bad value, or a finite overflow) pays for the elementwise check
    if not bool(torch.isfinite(w.sum(dtype=torch.float32))) and not bool(torch.isfinite(w).all()):
        bad = int((~torch.isfinite(w)).sum())
        raise ValueError(f"weight of shape {tuple(w.shape)} has {bad} non-finite values (NaN/Inf)")


def _dtype_clamp_is_noop(scales: torch.Tensor, scheme: Int4Scheme, dtype: torch.dtype) -> bool:
    """True when no group's codes can reach finfo(dtype).max: quantize_codes' clamp does nothing."""
    span = torch.floor(torch.finfo(dtype).max / scales)
    return bool((span >= scheme.qmax - scheme.qmin).all())


def _int4_quantize_native(w: torch.Tensor, scheme: Int4Scheme, dim: int) -> PackedWeight | None:
    """`_int4_quantize` by the C kernel (`kernels.cpu.quant_native`: these formulas, bit for bit,
    in one pass), or None where it does not apply: the torch formulas below run."""
    if w.device.type != "cpu" or scheme.check_quantizable(w.shape, dim) is not None:
        return None
    from qatpass.kernels.cpu.quant_native import quantize_int4_native

    out = quantize_int4_native(w.movedim(dim, -1).contiguous(), scheme, w.shape)
    if out is None:
        return None
    qweight, scales, zeros = out
    return PackedWeight(qweight, scales, zeros, w.shape, dim, w.dtype, scheme)


def _int4_quantize(w: torch.Tensor, scheme: Int4Scheme, dim: int) -> PackedWeight:
    native = _int4_quantize_native(w, scheme, dim)
    if native is not None:
        return native
    check_finite(w)
    groups = _grouped(w, dim, scheme)
    raw, lo = _raw_scales(groups, scheme)
    _check_scalable(raw, groups, w.shape, scheme)
    scales, zeros = _qparams_from_raw(raw, lo, scheme)
    clamp_dtype = None if _dtype_clamp_is_noop(scales, scheme, w.dtype) else w.dtype
    codes = quantize_codes(groups, scales, zeros, scheme, clamp_dtype)
    codes = codes.reshape(*groups.shape[:-2], -1)
    return PackedWeight(
        # nibble = code + 8 = (code & 0xF) ^ 8 for codes in [-8, 7]: the offset as one XOR on the
        # packed words instead of a pass over every code
        qweight=pack_nibbles(codes.to(torch.int8).view(torch.uint8)).bitwise_xor_(_NIBBLE_OFFSETS),
        scales=scales.to(scheme.scale_dtype).contiguous(),
        zeros=None if zeros is None else zeros.to(torch.int8).contiguous(),
        shape=w.shape,
        dim=dim,
        dtype=w.dtype,
        scheme=scheme,
    )


def dequantize(p: PackedWeight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The weight a packed weight stands for, in its original shape and dtype (or `dtype`)."""
    return p.scheme.dequantize(p, dtype)


def _int4_dequantize(p: PackedWeight, dtype: torch.dtype | None = None) -> torch.Tensor:
    codes = unpack_int4(p.qweight)
    g = p.group_size
    codes = codes.reshape(*codes.shape[:-1], codes.shape[-1] // g, g)
    dq = dequantize_codes(codes, p.scales, p.zeros)
    moved = list(p.shape)
    moved.append(moved.pop(p.dim))
    return dq.reshape(moved).to(dtype or p.dtype).movedim(-1, p.dim)
