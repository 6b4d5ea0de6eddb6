"""The Triton FP4 kernels (NVFP4, MXFP4) against x @ dequantize(p, float32).T.

conftest sets TRITON_INTERPRET=1 before triton is imported, so on CPU the kernels run in the
interpreter (tiny shapes); on a CUDA machine (QATPASS_TEST_CUDA=1) the compiled kernels. The
sm_90 / sm_100 compile of both kernels runs in a subprocess without the interpreter (Triton's
bundled ptxas: no GPU needed).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from ptx_interp import run_ptx

from qatpass.kernels.triton import fp4, plan
from qatpass.scheme import dequantize, quantize
from qatpass.scheme_fp4 import Fp4Scheme

from conftest import ACCUM

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = pytest.mark.skipif(
    not INTERPRET and not torch.cuda.is_available(),
    reason="needs a CUDA device or TRITON_INTERPRET=1",
)
DEVICE = "cpu" if INTERPRET else "cuda"
N = 40  # not a multiple of any BLOCK_N
F32 = torch.float32


def _weight(fmt: str, n: int, k: int):
    """A packed FP4 weight with a zero block, a block of tiny values (subnormal E4M3 scales)
    and rows of different magnitudes, and its operands on DEVICE."""
    w = torch.randn(n, k) * torch.logspace(-2, 1, n).unsqueeze(-1)
    w[1, :32] = 0.0
    w[2, 32:64] *= 1e-4
    p = quantize(w, Fp4Scheme(fmt))
    gs = None if p.global_scale is None else p.global_scale.to(DEVICE)
    return p, (p.qweight.to(DEVICE), p.scales.to(DEVICE), gs)


def _check(y, x, p):
    """y == x @ dequantize(p, float32).T up to fp32 summation order (and the block scale applied
    to the block's sum): the error bounded relative to sum |x| |w| (the summation's scale)."""
    w = dequantize(p, F32).double()
    want = x.double() @ w.t()
    assert y.dtype == F32 and y.shape == want.shape
    scale = x.double().abs() @ w.abs().t()
    err = (y.cpu().double() - want).abs()
    assert (err <= ACCUM[F32]["rtol"] * scale + 1e-30).all(), (err / (scale + 1e-30)).max()


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("dtype", [F32, torch.bfloat16])
@pytest.mark.parametrize(("k", "block_k", "split_k"), [(96, 128, 1), (160, 32, 2), (288, 128, 3)])
def test_gemv_is_x_at_dequantized_weight(fmt, dtype, k, block_k, split_k):
    """K not a multiple of BLOCK_K (masked tails), forced splits, fp32 and bf16 x."""
    p, (qweight, scales, gs) = _weight(fmt, N, k)
    x = torch.randn(1, k).to(dtype)
    tiles = plan.gemv_tile_plan(1, N, k, 32, block_k, split_k)
    assert tiles.split_k == split_k
    y = fp4.fp4_gemv(x.to(DEVICE), qweight, scales, gs, fmt=fmt, plan=tiles)
    _check(y, x, p)


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_gemv_default_plan_and_rows(fmt):
    """The launcher's own plan (split-K on the interpreter's 4 SMs), and M = 2 rows."""
    p, (qweight, scales, gs) = _weight(fmt, 72, 256)
    x = torch.randn(2, 256, dtype=torch.bfloat16)
    _check(fp4.fp4_gemv(x.to(DEVICE), qweight, scales, gs, fmt=fmt), x, p)


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("dtype", [F32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("m", "k", "split_k"), [(5, 96, 1), (17, 256, 2), (3, 32, None)])
def test_gemm_is_x_at_dequantized_weight(fmt, dtype, m, k, split_k):
    """Both step forms (fused: weights exact in the dot's dtype, several blocks a step; and
    MXFP4 with fp16 x: one block a step, its scale after the dot), forced splits."""
    p, (qweight, scales, gs) = _weight(fmt, N, k)
    x = torch.randn(m, k).to(dtype)
    y = fp4.fp4_gemm(x.to(DEVICE), qweight, scales, gs, fmt=fmt, split_k=split_k)
    _check(y, x, p)


def test_gemm_nvfp4_with_k_of_one_block_and_odd_blocks():
    """K = 16 (a single NVFP4 block) and K = 48 (not a multiple of 32): BLOCK_K falls to 16."""
    for k in (16, 48):
        p, (qweight, scales, gs) = _weight("nvfp4", N, k)
        x = torch.randn(3, k)
        _check(fp4.fp4_gemm(x.to(DEVICE), qweight, scales, gs, fmt="nvfp4"), x, p)


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_fp4_matmul_plans_and_zero_tensor(fmt):
    """fp4_matmul: GEMV at M = 1, GEMM above; an all-zero weight gives exact zeros."""
    from qatpass.kernels.triton.common import capture_launches

    p, (qweight, scales, gs) = _weight(fmt, N, 128)
    for m, kernel in ((1, "fp4_gemv_kernel"), (9, "fp4_gemm_kernel")):
        x = torch.randn(m, 128, dtype=torch.bfloat16)
        _check(fp4.fp4_matmul(x.to(DEVICE), qweight, scales, gs, fmt), x, p)
        with capture_launches(sms=132) as launches:
            fp4.fp4_matmul(x.to(DEVICE), qweight, scales, gs, fmt)
        assert launches[0].kernel.__name__ == kernel
    z = quantize(torch.zeros(N, 64), Fp4Scheme(fmt))
    zgs = None if z.global_scale is None else z.global_scale.to(DEVICE)
    x = torch.randn(4, 64)
    y = fp4.fp4_matmul(x.to(DEVICE), z.qweight.to(DEVICE), z.scales.to(DEVICE), zgs, fmt)
    assert torch.equal(y.cpu(), torch.zeros(4, N))


def test_refusals_name_the_argument():
    p, (qweight, scales, gs) = _weight("nvfp4", N, 64)
    x = torch.randn(1, 64).to(DEVICE)
    with pytest.raises(ValueError, match="global_scale"):
        fp4.fp4_gemv(x, qweight, scales, None, fmt="nvfp4")
    with pytest.raises(ValueError, match="fmt"):
        fp4.fp4_gemv(x, qweight, scales, gs, fmt="fp4")
    bad = plan.GemmPlan(16, 32, 128, 4, 1, 1, (1, 2, 1))  # BLOCK_K 128 > K
    with pytest.raises(ValueError, match="BLOCK_K"):
        fp4.fp4_gemm(x.expand(2, 64), qweight, scales, gs, fmt="nvfp4", plan=bad)


def test_op_on_the_device_uses_the_triton_kernels():
    """qatpass::fp4_linear reaches fp4_matmul on CUDA (bias in fp32, then x.dtype)."""
    if DEVICE != "cuda":
        pytest.skip("the op sends CPU tensors to the CPU kernel")
    p, (qweight, scales, gs) = _weight("nvfp4", N, 128)
    x = torch.randn(3, 128, dtype=torch.bfloat16, device=DEVICE)
    bias = torch.randn(N, device=DEVICE)
    y = torch.ops.qatpass.fp4_linear(x, qweight, scales, gs, bias, fmt="nvfp4")
    ref = (x.float() @ dequantize(p, F32).to(DEVICE).t() + bias).to(torch.bfloat16)
    torch.testing.assert_close(y, ref, **ACCUM[torch.bfloat16])


def _run_decode_ptx(asm: str, word: int, factor: int) -> list[int]:
    """The decode part of fp4._fp4_mma_asm (everything before the first mma), interpreted on
    one word ($1) and bf16 factor pair ($2) (`ptx_interp.run_ptx`). Returns t0..t3."""
    regs = run_ptx(asm.split("mma.sync")[0], {"$1": word, "$2": factor})
    return [int(regs[f"t{j}"]) for j in range(4)]


def test_tensor_core_gemv_decode_ptx_gives_exact_bf16_weights():
    """The tensor-core GEMV's inline PTX decode (interpreted here: the Triton interpreter never
    runs inline PTX): t_j = bf16 pair (value(code j) * f, value(code j + 4) * f), exactly, for
    every code in every nibble position and block factors across E4M3 and E8M0."""
    from qatpass.scheme_fp4 import e2m1_decode

    asm = fp4._fp4_mma_asm()
    factors = [448.0, 1.0, 0.001953125, 0.013671875, 2.0**-127, 2.0**100]
    words = [sum(((c + 3 * j) % 16) << (4 * j) for j in range(8)) for c in range(16)]
    for f in factors:
        fb = torch.tensor([f], dtype=torch.bfloat16)
        assert fb.double().item() == f
        fbits = fb.view(torch.int16).item() & 0xFFFF
        for word in words:
            t = _run_decode_ptx(asm, word, fbits | (fbits << 16))
            for j in range(4):
                for half, nib in ((0, j), (1, j + 4)):
                    code = torch.tensor([(word >> (4 * nib)) & 0xF], dtype=torch.uint8)
                    want = torch.tensor([e2m1_decode(code).item() * f], dtype=torch.bfloat16)
                    got = (t[j] >> (16 * half)) & 0xFFFF
                    assert got == want.view(torch.int16).item() & 0xFFFF, (f, hex(word), j, half)


COMPILE_SCRIPT = textwrap.dedent(
    """
    import torch
    from triton.backends.compiler import GPUTarget
    import triton
    from triton.compiler import ASTSource
    from qatpass.kernels.triton import fp4

    POINTERS = {"x_ptr": "*bf16", "qweight_ptr": "*i32", "qbytes_ptr": "*u8",
                "scales_ptr": "*u8", "gs_ptr": "*fp32", "out_ptr": "*fp32"}
    gemv = {"SPLIT_K": 2, "EVEN_K": False, "EVEN_N": False, "BLOCK_N": 128, "BLOCK_K": 128,
            "UNROLL": 2, "INTERPRET": False}  # bf16 x: the tensor-core path
    gemm = {"SPLIT_K": 2, "DOT_FP32": False, "FUSED": True, "BLOCK_M": 16, "BLOCK_N": 128,
            "BLOCK_K": 64}
    unfused = {**gemm, "FUSED": False, "BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}
    for arch in (90, 100):
        for fmt, block in (("nvfp4", 16), ("mxfp4", 32)):
            todo = [(fp4.fp4_gemv_kernel, gemv, {"maxnreg": 128}), (fp4.fp4_gemm_kernel, gemm, {})]
            POINTERS["x_ptr"] = "*bf16" if fmt == "nvfp4" else "*fp16"
            if fmt == "mxfp4":  # fp16 x: the scale after the dot
                todo.append((fp4.fp4_gemm_kernel, unfused, {}))
            for kernel, meta, opts in todo:
                meta = {**meta, "FMT": fp4.FP4_FORMAT_IDS[fmt], "BLOCK": block}
                if fmt == "mxfp4":
                    meta["gs_ptr"] = None
                sig = {a: "constexpr" if a in meta else POINTERS.get(a, "i32")
                       for a in kernel.arg_names}
                attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(kernel.arg_names)
                         if a in POINTERS and a not in meta}
                src = ASTSource(fn=kernel, signature=sig, constexprs=meta, attrs=attrs)
                out = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=opts)
                assert out.asm["cubin"], (arch, fmt, kernel)
    print("compiled")
    """
)


@pytest.mark.skipif(
    not INTERPRET or importlib.util.find_spec("triton.backends.nvidia") is None,
    reason="needs Triton's NVIDIA backend (it bundles ptxas); a CUDA run compiles anyway",
)
def test_kernels_compile_for_sm90_and_sm100_without_a_gpu():
    """The interpreter never runs Triton's compiler: build the GEMV and the GEMM, both
    formats, for Hopper and Blackwell through the bundled ptxas."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["QATPASS_TEST_CUDA"] = "1"
    done = subprocess.run(
        [sys.executable, "-c", COMPILE_SCRIPT], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-3000:]
