"""A small interpreter for the straight-line PTX the Triton kernels inline before their mma (the
packed dequant and the FP4 decode): the Triton interpreter never runs inline PTX, so the tests
run it here, on 32-bit registers held as Python ints or int64 tensors (one register per element).

Integer ops (shl, shr, and, lop3 0xea, mov) act on 32 bits; the packed 16-bit float ops
(sub.rn / mul.rn on bf16x2 / f16x2) compute each half exactly in float64 and round once to the
16-bit type, so a kernel that rounded twice would show up as a mismatch.
"""

from __future__ import annotations

import torch

_PACKED = {"bf16x2": torch.bfloat16, "f16x2": torch.float16}


def bits16(t: torch.Tensor) -> torch.Tensor:
    """16-bit floats' bits as int64 in [0, 2**16)."""
    return t.view(torch.int16).to(torch.int64) & 0xFFFF


def _halves(r, dtype: torch.dtype) -> list[torch.Tensor]:
    """The two 16-bit floats (low, high) of 32-bit registers r, as float64."""
    r = torch.as_tensor(r, dtype=torch.int64)
    return [((r >> sh) & 0xFFFF).to(torch.int16).view(dtype).double() for sh in (0, 16)]


def run_ptx(asm: str, regs: dict) -> dict:
    """Run `asm` on `regs` ({"$1": word, ...}: ints or int64 tensors); returns every register
    afterwards. Declarations and braces are skipped; any other instruction fails the test."""
    regs = dict(regs)

    def val(a: str):
        if a in regs:
            return regs[a]
        return int(a[2:], 16) if a.startswith("0f") else int(a, 0)

    for ins in asm.split(";"):
        ins = ins.strip().lstrip("{").strip()
        if not ins or ins == "}" or ins.startswith(".reg"):
            continue
        op, _, rest = ins.partition(" ")
        out, *args = [a.strip() for a in rest.split(",")]
        a = [val(x) for x in args]
        if op == "shl.b32":
            regs[out] = (a[0] << a[1]) & 0xFFFFFFFF
        elif op == "shr.u32":
            regs[out] = a[0] >> a[1]
        elif op == "and.b32":
            regs[out] = a[0] & a[1]
        elif op == "lop3.b32":
            assert a[3] == 0xEA, f"lop3 table {a[3]:#x}"  # (a & b) | c
            regs[out] = (a[0] & a[1]) | a[2]
        elif op in ("mov.b32", "mov.f32"):
            regs[out] = a[0]
        elif op.startswith(("sub.rn.", "mul.rn.")) and op[7:] in _PACKED:
            dtype = _PACKED[op[7:]]
            f = (lambda u, v: u - v) if op.startswith("sub") else (lambda u, v: u * v)
            pairs = zip(_halves(a[0], dtype), _halves(a[1], dtype), strict=True)
            lo, hi = (bits16(f(u, v).to(dtype)) for u, v in pairs)
            regs[out] = lo | (hi << 16)
        else:
            raise AssertionError(f"unexpected PTX {ins!r}")
    return regs
