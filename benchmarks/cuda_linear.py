"""W4A16 linear on one CUDA GPU: the op the modules call, against bf16 cuBLAS and other int4 kernels.

    python benchmarks/cuda_linear.py [--out results.json] [--quick]

One command, about 6-7 minutes on an H200. For each weight shape N x K, batch M, group size and
symmetric / asymmetric (zeros) weights it times `torch.ops.qatpass.w4a16_linear` (what
`W4A16Linear` runs) with `triton.testing.do_bench_cudagraph` (device time of a CUDA-graph
replay: no host overhead, L2 cleared between replays), next to bf16 `F.linear` (cuBLAS) and,
where importable, tinygemm (`aten._weight_int4pack_mm`), GemLite (an int zero point of 8, as
qatpass's codes) and vLLM's Marlin. Each row has the launch plan qatpass chose, the bytes moved,
the achieved bandwidth against both the datasheet (4.8 TB/s on H200) and the bandwidth a device
copy reaches in the same run, and the max abs difference of every kernel from the same
dequantized reference (a layout mistake shows). Host overhead is reported separately: the wall
time per eager call of the op on a tiny shape, where the GPU is never the bottleneck.

Without a CUDA device (or with TRITON_INTERPRET=1) it exits with status 2 and says why.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

SHAPES = ((4096, 4096), (4096, 14336), (14336, 4096), (8192, 28672))  # (N, K)
MS = (1, 16, 64, 512, 2048)  # 2048: the dequantize + cuBLAS path (plan.DEQUANT_MATMUL_MIN_M)
GROUPS = (32, 128)
# Datasheet HBM bandwidth in bytes/s, by a substring of torch.cuda.get_device_name().
PEAK_BANDWIDTH = {"H200": 4.8e12, "H100": 3.35e12}


def peak_bandwidth(device_name: str) -> float | None:
    for key, value in PEAK_BANDWIDTH.items():
        if key in device_name:
            return value
    return None


def device_time_ms(fn: Callable[[], object]) -> float:
    """Median device time of one call, replayed in a CUDA graph (compiles outside it)."""
    import triton.testing

    fn()
    torch.cuda.synchronize()
    return float(triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median"))


def copy_bandwidth(nbytes: int = 2 << 30) -> float:
    """Bytes/s a device-to-device copy reaches (read + write), the achievable denominator."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = device_time_ms(lambda: dst.copy_(src))
    return 2 * nbytes / (ms * 1e-3)


def host_overhead_us(op: Callable[[], object], calls: int = 2000) -> float:
    """Wall time per eager call on a tiny shape (the GPU finishes each launch long before the
    next one is issued), synchronising only at the end."""
    for _ in range(50):
        op()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        op()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / calls * 1e6


def _tinygemm(x, codes, scales, zeros, group_size):
    """aten._weight_int4pack_mm on the same weights: (q - 8) * scale + zero with q = code + 8
    in 0..15, so zero = -zero_code * scale; packed [N, K/2] uint8, even k in the high nibble."""
    q = (codes.to(torch.int16) + 8).to(torch.uint8)
    packed = torch.ops.aten._convert_weight_to_int4pack((q[:, ::2] << 4) | q[:, 1::2], 8)
    zero = torch.zeros_like(scales, dtype=torch.float32)
    if zeros is not None:
        zero = -zeros.float() * scales.float()
    sz = torch.stack((scales.float(), zero), dim=-1).transpose(0, 1).contiguous()
    sz = sz.to(torch.bfloat16)
    return lambda: torch.ops.aten._weight_int4pack_mm(x, packed, group_size, sz)


def _gemlite(x, codes, scales, zeros, group_size):
    """GemLite's W4A16 layer on the same weights: (q - zero_point) * scale with q = code + 8
    and an integer zero point of 8 (+ zero code when asymmetric)."""
    from gemlite.core import DType, GemLiteLinearTriton

    n, k = codes.shape
    layer = GemLiteLinearTriton(
        W_nbits=4,
        group_size=group_size,
        in_features=k,
        out_features=n,
        input_dtype=DType.BF16,
        output_dtype=DType.BF16,
    )
    q = (codes.to(torch.int16) + 8).to(torch.uint8)
    zp = torch.full_like(scales, 8, dtype=torch.bfloat16)
    if zeros is not None:
        zp = zp + zeros.to(torch.bfloat16)
    layer.pack(q, scales.to(torch.bfloat16), zp)
    return lambda: layer(x)


def _marlin(x, codes, scales, zeros, group_size):
    """vLLM's Marlin GPTQ kernel (symmetric uint4b8) on the same weights."""
    if zeros is not None:
        raise NotImplementedError("asymmetric weights: not set up for Marlin here")
    from vllm.model_executor.layers.quantization.utils import marlin_utils_test as mt

    n, k = codes.shape
    w = (codes.float() * scales.float().repeat_interleave(group_size, dim=1)).t()
    packed = mt.marlin_quantize(w.to(torch.float16), mt.scalar_types.uint4b8, group_size, False)
    _, q, s, g_idx, sort_idx, _ = packed
    ws = mt.marlin_make_workspace(n, x.device)
    return lambda: mt.ops.gptq_marlin_gemm(
        x.half(), None, q, None, s, None, None, g_idx, sort_idx, ws,
        mt.scalar_types.uint4b8, x.shape[0], n, k, is_k_full=True,
    )  # fmt: skip


BASELINES = {"tinygemm": _tinygemm, "gemlite": _gemlite, "marlin": _marlin}


def _baseline(name: str, make: Callable, args: tuple, ref: torch.Tensor) -> dict:
    """Time a third-party kernel; any failure (not importable, unsupported) is recorded."""
    try:
        fn = make(*args)
        err = (fn().float() - ref).abs().max().item()
        return {f"{name}_ms": device_time_ms(fn), f"{name}_max_abs_err": err}
    except Exception as e:  # optional baselines: record why and move on
        return {f"{name}_error": f"{type(e).__name__}: {e}"[:300]}


def run(shapes, ms, groups, zero_modes) -> dict:
    import qatpass
    from qatpass.kernels.triton import plan_linear
    from qatpass.kernels.triton.common import num_sms

    device = torch.device("cuda")
    name = torch.cuda.get_device_name(device)
    sms = num_sms(device)
    peak = peak_bandwidth(name)
    copy_bw = copy_bandwidth()
    op = torch.ops.qatpass.w4a16_linear

    tiny = qatpass.quantize(torch.randn(64, 256, device=device), qatpass.Int4Scheme())
    xt = torch.randn(1, 256, device=device, dtype=torch.bfloat16)
    host = {
        "w4a16_linear_us": host_overhead_us(
            lambda: op(xt, tiny.qweight, tiny.scales, None, None, group_size=32)
        ),
        "F.linear_bf16_us": host_overhead_us(
            lambda: F.linear(xt, tiny.qweight.new_empty((64, 256), dtype=torch.bfloat16))
        ),
    }
    rows = []
    for (n, k), g, symmetric in ((s, g, z) for s in shapes for g in groups for z in zero_modes):
        torch.manual_seed(0)
        scheme = qatpass.Int4Scheme(
            group_size=g, symmetric=symmetric, qrange=(-7, 7) if symmetric else (-8, 7)
        )
        w = (torch.randn(n, k, device=device) * 0.02).to(torch.bfloat16)
        p = qatpass.quantize(w, scheme)
        w_dq = qatpass.dequantize(p, dtype=torch.bfloat16)
        codes = qatpass.unpack_int4(p.qweight)
        for m in ms:
            x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
            ref = F.linear(x.float(), w_dq.float())
            ours = lambda: op(x, p.qweight, p.scales, p.zeros, None, group_size=g)  # noqa: B023,E731
            t_ours = device_time_ms(ours)
            t_bf16 = device_time_ms(lambda: F.linear(x, w_dq))  # noqa: B023
            moved = p.nbytes() + x.numel() * 2 + m * n * 2
            row = {
                "N": n,
                "K": k,
                "M": m,
                "group_size": g,
                "zeros": not symmetric,
                "plan": dataclasses.asdict(plan_linear(m, n, k, g, sms)),
                "bytes_moved": moved,
                "bf16_ms": t_bf16,
                "w4a16_ms": t_ours,
                "speedup_vs_bf16": t_bf16 / t_ours,
                "w4a16_GBps": moved / (t_ours * 1e-3) / 1e9,
                "pct_of_copy_bw": 100.0 * moved / (t_ours * 1e-3) / copy_bw,
                "pct_of_datasheet_bw": None
                if peak is None
                else 100 * moved / (t_ours * 1e-3) / peak,
                "w4a16_max_abs_err": (ours().float() - ref).abs().max().item(),
            }
            args = (x, codes, p.scales, p.zeros, g)
            for bname, make in BASELINES.items():
                row.update(_baseline(bname, make, args, ref))
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)  # progress; stdout stays one JSON document
    return {
        "device": name,
        "sms": sms,
        "datasheet_bandwidth_Bps": peak,
        "copy_bandwidth_Bps": copy_bw,
        "host_overhead": host,
        "results": rows,
    }


def run_cuda(
    shapes: Sequence[tuple[int, int]] = SHAPES,
    ms: Sequence[int] = MS,
    group_sizes: Sequence[int] = GROUPS,
) -> list[dict]:
    """The result rows alone (benchmarks/linear.py appends them to its CPU rows)."""
    return run(shapes, ms, group_sizes, (True, False))["results"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", help="write the JSON here instead of stdout")
    parser.add_argument("--ms", type=int, nargs="+", default=list(MS))
    parser.add_argument("--group-sizes", type=int, nargs="+", default=list(GROUPS))
    parser.add_argument("--quick", action="store_true", help="first shape, symmetric only")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print(
            "cuda_linear: TRITON_INTERPRET=1 would time the interpreter; unset it", file=sys.stderr
        )
        return 2
    if not torch.cuda.is_available():
        print("cuda_linear: no CUDA device; this benchmark needs one (static figures: "
              "benchmarks/sass_report.py)", file=sys.stderr)  # fmt: skip
        return 2
    shapes = SHAPES[:1] if args.quick else SHAPES
    zero_modes = (True,) if args.quick else (True, False)
    result = run(shapes, args.ms, args.group_sizes, zero_modes)
    text = json.dumps(result, indent=2)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
