"""The FP4 schemes, NVFP4 and MXFP4: every FP4 formula qatpass uses, in one place.

Both store E2M1 codes (sign, 2 exponent bits, 1 mantissa bit: magnitudes 0, 0.5, 1, 1.5, 2, 3, 4,
6) as nibbles packed along K exactly like INT4 (`pack_nibbles`: int32 [N, K/8], low nibble =
even k; the same bytes as compressed-tensors' uint8 `weight_packed` [N, K/2]). Code = sign bit 8
| magnitude index 0..7. Rounding onto the grid is to nearest, ties to even code; magnitudes
beyond 6 saturate to 6.

- NVFP4 (compressed-tensors `nvfp4-pack-quantized`, vLLM): one fp32 global scale per matrix
  `gs = 448 * 6 / amax(W)` (1 when that is not finite), one FP8 E4M3 scale per 16 elements along
  K: `s = e4m3(clamp(gs * (amax(block) * fp32(1/6)), 2**-9, 448))` (round to nearest even,
  subnormals included, never 0); the element scale is `s / gs` (fp32 division) and
  `w = e2m1 * (s / gs)`, which is what compressed-tensors' decompressor computes.
- MXFP4 (OCP MX v1.0): one E8M0 scale 2**e per 32 elements along K, stored as uint8 e + 127,
  with the OCP rule `e = floor(log2(amax(block))) - 2` (2 = E2M1's largest exponent), clamped to
  [-127, 127] (a zero block gets -127); `w = e2m1 * 2**e`. (compressed-tensors' own quantizer
  rounds amax to a power of two first; its decompressor only reads e, so it matches either way.)

All math is fp32 and done with integer ops on the bits where it rounds to E4M3 (compilers may
elide a cast pair); `fake_quantize_values(w) == dequantize(quantize(w))` bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qatpass.scheme import (
    PackedWeight,
    QuantScheme,
    check_dim,
    check_finite,
    check_scheme_dict,
    pack_nibbles,
    unpack_nibbles,
)

__all__ = [
    "Fp4Scheme",
    "FP4_FORMATS",
    "E2M1_VALUES",
    "e2m1_round",
    "e2m1_codes",
    "e2m1_decode",
    "e4m3_round",
]

FP4_FORMATS = {"nvfp4": 16, "mxfp4": 32}  # format -> block size along K
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E2M1_MAX = 6.0
E4M3_MAX = 448.0
E4M3_MIN_SUBNORMAL = 2.0**-9
E8M0_BIAS = 127
# amax / 6 is computed as amax * fp32(1/6): a compiler turns a division by a constant into this
# multiplication on some devices (Inductor on CUDA), so writing it so keeps fake == real there
_SIXTH = 1.0 / 6.0
_DICT_KEYS = ("format",)


def e2m1_round(y: torch.Tensor) -> torch.Tensor:
    """|y| (fp32) rounded onto the E2M1 magnitudes, ties to even, saturated at 6."""
    a = y.abs().clamp(max=E2M1_MAX)
    # spacing 0.5 below 2, 1 in [2, 4), 2 in [4, 6]; x2 and /2 are exact in fp32
    return torch.where(
        a < 2.0,
        torch.round(a * 2.0) * 0.5,
        torch.where(a < 4.0, torch.round(a), torch.round(a * 0.5) * 2.0),
    )


def e2m1_codes(y: torch.Tensor) -> torch.Tensor:
    """uint8 E2M1 codes (sign bit 8 | magnitude index) of fp32 y; the sign of -0 is kept."""
    mag = e2m1_round(y)
    index = torch.where(mag < 2.0, mag * 2.0, torch.where(mag < 4.0, mag + 2.0, mag * 0.5 + 4.0))
    return index.to(torch.uint8) | (torch.signbit(y).to(torch.uint8) << 3)


def e2m1_decode(codes: torch.Tensor) -> torch.Tensor:
    """fp32 values of uint8 E2M1 codes (code 8 is -0.0)."""
    table = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=codes.device)
    mag = table[(codes & 7).long()]
    return torch.where((codes & 8) != 0, -mag, mag)


def _decode_packed(qweight: torch.Tensor) -> torch.Tensor:
    """fp32 values [..., K] of int32 packed codes [..., K/8]: one lookup per byte (two codes)."""
    pairs = e2m1_decode(unpack_nibbles(torch.arange(256, dtype=torch.uint8).view(torch.int32)))
    table = pairs.to(qweight.device).reshape(256, 2)  # byte b -> (code b & 15, code b >> 4)
    byte = qweight.contiguous().reshape(-1).view(torch.uint8).reshape(*qweight.shape[:-1], -1)
    return table[byte.int()].flatten(-2)


def e4m3_round(v: torch.Tensor) -> torch.Tensor:
    """fp32 v in [2**-9, 448] rounded to the nearest FP8 E4M3 value (ties to even), as fp32.

    Normal values (>= 2**-6) keep 3 mantissa bits (rounded on the bits); below, the subnormal
    grid is multiples of 2**-9.
    """
    bits = v.view(torch.int32)
    drop = 20
    bits = bits + ((1 << (drop - 1)) - 1) + ((bits >> drop) & 1)
    normal = (bits & ~((1 << drop) - 1)).view(torch.float32)
    subnormal = torch.round(v * 512.0) * (1.0 / 512.0)
    return torch.where(v >= 2.0**-6, normal, subnormal)


def _e8m0_value(e: torch.Tensor) -> torch.Tensor:
    """fp32 2**e for int32 e in [-127, 127], built exactly from the bits."""
    normal = ((e + 127).clamp(min=1) << 23).view(torch.float32)
    return torch.where(e >= -126, normal, torch.full_like(normal, 2.0**-127))


@dataclass(frozen=True)
class Fp4Scheme(QuantScheme):
    """An FP4 scheme: `Fp4Scheme("nvfp4")` or `Fp4Scheme("mxfp4")`. Frozen and hashable."""

    format: str = "nvfp4"

    kernel_family = "fp4"
    fake_quant_op = "fake_quantize_fp4"

    def __post_init__(self) -> None:
        if self.format not in FP4_FORMATS:
            raise ValueError(f"format must be one of {sorted(FP4_FORMATS)}, got {self.format!r}")

    @property
    def name(self) -> str:  # type: ignore[override]
        return self.format

    @property
    def block_size(self) -> int:
        return FP4_FORMATS[self.format]

    @property
    def scale_dtype(self) -> torch.dtype:
        """How block scales are stored: E4M3 for NVFP4, uint8 biased exponents for MXFP4."""
        return torch.float8_e4m3fn if self.format == "nvfp4" else torch.uint8

    @property
    def has_global_scale(self) -> bool:
        return self.format == "nvfp4"

    def group_size_for(self, k: int) -> int:
        return self.block_size

    def check_quantizable(self, shape: torch.Size | tuple[int, ...], dim: int) -> str | None:
        if len(shape) < 2:
            return f"a {len(shape)}-d tensor is not a matmul weight"
        k = shape[dim]
        if k == 0:
            return f"reduction dim {dim} has size 0"
        if k % self.block_size:
            return (
                f"reduction dim {dim} of size {k} is not divisible by the {self.format} block "
                f"size {self.block_size}"
            )
        return None

    def op_kwargs(self) -> dict:
        return {"fmt": self.format}

    def to_dict(self) -> dict:
        return {"format": self.format}

    @classmethod
    def from_dict(cls, d: dict) -> Fp4Scheme:
        check_scheme_dict(d, _DICT_KEYS, "FP4 scheme")
        return cls(d.get("format", "nvfp4"))

    def bytes_per_weight(self, k: int) -> float:
        return 0.5 + 1.0 / self.block_size

    # --- the formulas ----------------------------------------------------------------------

    def _blocks(self, w: torch.Tensor, dim: int) -> torch.Tensor:
        """fp32 w with the reduction dim last, split into blocks: [..., N, K/B, B]."""
        reason = self.check_quantizable(w.shape, dim)
        if reason is not None:
            raise ValueError(f"cannot quantize weight of shape {tuple(w.shape)}: {reason}")
        x = w.movedim(dim, -1).to(torch.float32)
        return x.reshape(*x.shape[:-1], x.shape[-1] // self.block_size, self.block_size)

    def _scales(self, blocks: torch.Tensor):
        """(stored block scales as fp32 values, element scales [..., N, K/B], global scale)."""
        amax = blocks.abs().amax(dim=-1)
        if self.format == "nvfp4":
            tensor_amax = amax.amax(dim=(-2, -1)).clamp(min=torch.finfo(torch.float32).tiny)
            # a true division (`2688 / t` would be reciprocal-then-multiply)
            gs = torch.full_like(tensor_amax, E4M3_MAX * E2M1_MAX) / tensor_amax
            gs = torch.where(torch.isfinite(gs), gs, torch.ones_like(gs))
            g = gs[..., None, None]
            s = e4m3_round(((amax * _SIXTH) * g).clamp(E4M3_MIN_SUBNORMAL, E4M3_MAX))
            return s, s / g, gs
        exponent = ((amax.view(torch.int32) >> 23) & 0xFF) - E8M0_BIAS  # floor(log2), 0 -> -127
        e = (exponent - 2).clamp(-E8M0_BIAS, E8M0_BIAS)
        return e, _e8m0_value(e), None

    def _codes_input(self, blocks: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """blocks in units of their scale: a division (NVFP4, as compressed-tensors), or for MX
        a multiplication by the exact 2**-e (no division to be rewritten)."""
        if self.format == "nvfp4":
            return blocks / scale.unsqueeze(-1)
        e = ((scale.view(torch.int32) >> 23) & 0xFF) - E8M0_BIAS
        inverse = torch.where(e >= -126, _e8m0_value(-e), torch.full_like(scale, 2.0**127))
        return blocks * inverse.unsqueeze(-1)

    def fake_quantize_values(self, w: torch.Tensor, dim: int) -> torch.Tensor:
        dim = check_dim(w, dim)
        blocks = self._blocks(w, dim)
        _, scale, _ = self._scales(blocks)
        y = self._codes_input(blocks, scale)
        mag = e2m1_round(y)
        dq = torch.where(torch.signbit(y), -mag, mag) * scale.unsqueeze(-1)
        moved = w.movedim(dim, -1).shape
        return dq.reshape(moved).to(w.dtype).movedim(-1, dim)

    def quantize(self, w: torch.Tensor, dim: int) -> PackedWeight:
        dim = check_dim(w, dim)
        check_finite(w)
        blocks = self._blocks(w, dim)
        stored, scale, gs = self._scales(blocks)
        codes = e2m1_codes(self._codes_input(blocks, scale))
        if self.format == "nvfp4":
            scales = stored.to(torch.float8_e4m3fn)  # exact: stored is on the E4M3 grid
        else:
            scales = (stored + E8M0_BIAS).to(torch.uint8)
        return PackedWeight(
            qweight=pack_nibbles(codes.reshape(*blocks.shape[:-2], -1)),
            scales=scales.contiguous(),
            zeros=None,
            shape=w.shape,
            dim=dim,
            dtype=w.dtype,
            scheme=self,
            global_scale=None if gs is None else gs.contiguous(),
        )

    def element_scales(self, p: PackedWeight) -> torch.Tensor:
        """fp32 [..., N, K/B]: what each block's codes are multiplied by."""
        if self.format == "nvfp4":
            if p.global_scale is None:
                raise ValueError("an NVFP4 packed weight needs its global_scale")
            return p.scales.float() / p.global_scale.float()[..., None, None]
        return _e8m0_value(p.scales.to(torch.int32) - E8M0_BIAS)

    def dequantize(self, p: PackedWeight, dtype: torch.dtype | None = None) -> torch.Tensor:
        values = _decode_packed(p.qweight)
        b = self.block_size
        values = values.reshape(*values.shape[:-1], values.shape[-1] // b, b)
        dq = values * self.element_scales(p).unsqueeze(-1)
        moved = list(p.shape)
        moved.append(moved.pop(p.dim))
        return dq.reshape(moved).to(dtype or p.dtype).movedim(-1, p.dim)
