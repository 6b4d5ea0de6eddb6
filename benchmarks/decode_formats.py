"""CPU decode (M = 1) speed of each 4-bit format through `qatpass.convert`, best of N, JSON out.

    python benchmarks/decode_formats.py --threads 1 --out results/decode_formats.json

One bf16 row times a converted N x K `nn.Linear` (the module users serve with: INT4 g32 / g64
symmetric (-8, 7) bf16 scales, NVFP4, MXFP4) and dense bf16 `F.linear`, weights in cache (the
formats' decode cost, not DRAM; `benchmarks/linear.py` streams from DRAM for INT4). `kernel_ms`:
the same weight through the CPU kernel's entry alone (`kernels.cpu.linear` for INT4,
`fp4_native.fp4_native_linear` for FP4), without the op's dispatch and the module around it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch import nn

import qatpass
from qatpass.kernels.cpu import linear as int4_linear
from qatpass.kernels.cpu.fp4_native import fp4_native_linear

FORMATS = {
    "int4-g32": qatpass.Int4Scheme(32, True, (-8, 7), torch.bfloat16),
    "int4-g64": qatpass.Int4Scheme(64, True, (-8, 7), torch.bfloat16),
    "nvfp4": qatpass.Fp4Scheme("nvfp4"),
    "mxfp4": qatpass.Fp4Scheme("mxfp4"),
}


def best_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


def kernel_call(scheme, weight: torch.Tensor, x: torch.Tensor):
    """The CPU kernel's entry for `scheme` on `weight`, as a thunk."""
    p = scheme.quantize(weight, 1)
    if isinstance(scheme, qatpass.Fp4Scheme):
        return lambda: fp4_native_linear(x, p.qweight, p.scales, p.global_scale, scheme.format)
    g = p.group_size
    return lambda: int4_linear(x, p.qweight, p.scales, p.zeros, None, group_size=g)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--k", type=int, default=4096)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    linear = nn.Linear(args.k, args.n, bias=False).to(torch.bfloat16)
    x = torch.randn(1, args.k, dtype=torch.bfloat16)
    result = {"n": args.n, "k": args.k, "threads": args.threads, "ms": {}, "kernel_ms": {}}
    with torch.no_grad():
        result["ms"]["bf16"] = best_ms(lambda: linear(x), args.repeats)
        for name, scheme in FORMATS.items():
            served = qatpass.convert(nn.Sequential(linear), scheme=scheme, include=[r"weight"])
            result["ms"][name] = best_ms(lambda m=served: m(x), args.repeats)
            kernel = kernel_call(scheme, linear.weight.detach(), x)
            result["kernel_ms"][name] = best_ms(kernel, args.repeats)
    for name, ms in result["ms"].items():
        kernel = result["kernel_ms"].get(name)
        alone = "" if kernel is None else f", kernel alone {kernel:.3f} ms"
        print(f"{name:>9}: {ms:.3f} ms  ({result['ms']['bf16'] / ms:.2f}x bf16{alone})")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
