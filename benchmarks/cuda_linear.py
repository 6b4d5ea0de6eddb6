"""W4A16 linear on CUDA: qatpass Triton kernels vs bf16 cuBLAS, tinygemm and GemLite.

    python benchmarks/cuda_linear.py [--out results.json] [--group-size 128]

For each weight shape (N, K) and batch M it times `F.linear` in bf16 (cuBLAS) and
`qatpass.kernels.triton.w4a16_matmul` with `triton.testing.do_bench` (median, L2 flushed
between runs), and reports speedup over bf16, achieved bandwidth (bytes of packed weight +
scales + activations + output, over time) and its share of the device's peak HBM bandwidth.
tinygemm (`aten._weight_int4pack_mm`) and GemLite (if importable) run on the same shapes; each
reports the max abs difference from the same dequantized reference, so a layout mistake shows.
Without a GPU it prints {"skipped": "no CUDA device"} and exits 0.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

SHAPES = ((4096, 4096), (4096, 14336), (14336, 4096))  # (N, K): qkv/o, down, gate/up
MS = (1, 4, 16, 64, 256, 2048)
# Peak HBM bandwidth in bytes/s, by a substring of torch.cuda.get_device_name().
PEAK_BANDWIDTH = {"H200": 4.8e12, "H100": 3.35e12}


def peak_bandwidth(device_name: str) -> float | None:
    for key, value in PEAK_BANDWIDTH.items():
        if key in device_name:
            return value
    return None


def _time_ms(fn: Callable[[], torch.Tensor]) -> float:
    import triton.testing

    fn()  # compile / autotune outside the timed region
    torch.cuda.synchronize()
    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def _tinygemm(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, group_size: int):
    """A callable running aten._weight_int4pack_mm on the same weights (symmetric: zero 0).

    tinygemm computes (q - 8) * scale + zero with q in 0..15, packed uint8 [N, K/2] with the
    even k in the high nibble (the opposite of qatpass's order), scales_and_zeros [K/G, N, 2].
    """
    q = (codes.to(torch.int16) + 8).to(torch.uint8)
    packed = torch.ops.aten._convert_weight_to_int4pack((q[:, ::2] << 4) | q[:, 1::2], 8)
    sz = torch.stack((scales.float(), torch.zeros_like(scales, dtype=torch.float32)), dim=-1)
    sz = sz.transpose(0, 1).contiguous().to(torch.bfloat16)
    return lambda: torch.ops.aten._weight_int4pack_mm(x, packed, group_size, sz)


def _gemlite(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, group_size: int):
    """A callable running GemLite's Triton W4A16 layer on the same weights: (q - 8) * scale."""
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
    layer.pack(q, scales.to(torch.bfloat16), torch.full_like(scales, 8, dtype=torch.bfloat16))
    return lambda: layer(x)


def _baseline(name: str, make: Callable, args: tuple, ref: torch.Tensor) -> dict:
    """Time a third-party kernel; any failure is reported, never fatal."""
    try:
        fn = make(*args)
        err = (fn().float() - ref).abs().max().item()
        return {f"{name}_ms": _time_ms(fn), f"{name}_max_abs_err": err}
    except Exception as e:  # optional baselines: record why and move on
        return {f"{name}_error": f"{type(e).__name__}: {e}"[:300]}


def run_cuda(
    shapes: Sequence[tuple[int, int]] = SHAPES, ms: Sequence[int] = MS, group_size: int = 128
) -> list[dict]:
    """One row per (N, K, M); times in ms. Needs a CUDA device (and TRITON_INTERPRET unset)."""
    import qatpass
    from qatpass.kernels.triton import w4a16_matmul

    device = torch.device("cuda")
    name = torch.cuda.get_device_name(device)
    peak = peak_bandwidth(name)
    scheme = qatpass.Int4Scheme(group_size=group_size)
    try:
        import gemlite  # noqa: F401

        have_gemlite = True
    except ImportError:
        have_gemlite = False

    rows = []
    for n, k in shapes:
        torch.manual_seed(0)
        w = (torch.randn(n, k, device=device) * 0.02).to(torch.bfloat16)
        p = qatpass.quantize(w, scheme)
        w_dq = qatpass.dequantize(p, dtype=torch.bfloat16)
        codes = qatpass.unpack_int4(p.qweight)
        weight_bytes = p.nbytes()
        for m in ms:
            x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
            ref = F.linear(x.float(), w_dq.float())
            ours = functools.partial(w4a16_matmul, x, p.qweight, p.scales, group_size=group_size)
            bf16 = functools.partial(F.linear, x, w)
            t_ours, t_bf16 = _time_ms(ours), _time_ms(bf16)
            moved = weight_bytes + x.numel() * x.element_size() + m * n * 2
            gbps = moved / (t_ours * 1e-3) / 1e9
            row = {
                "device": name,
                "N": n,
                "K": k,
                "M": m,
                "group_size": group_size,
                "bf16_ms": t_bf16,
                "w4a16_ms": t_ours,
                "speedup_vs_bf16": t_bf16 / t_ours,
                "w4a16_GBps": gbps,
                "w4a16_pct_peak_bw": None if peak is None else 100.0 * gbps * 1e9 / peak,
                "w4a16_max_abs_err": (ours().float() - ref).abs().max().item(),
            }
            args = (x, codes, p.scales, group_size)
            row.update(_baseline("tinygemm", _tinygemm, args, ref))
            if have_gemlite:
                row.update(_baseline("gemlite", _gemlite, args, ref))
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)  # progress; stdout stays one JSON document
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the JSON here instead of stdout")
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--ms", type=int, nargs="+", default=list(MS))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        result: dict = {"skipped": "no CUDA device"}
    elif os.environ.get("TRITON_INTERPRET") == "1":
        result = {"skipped": "TRITON_INTERPRET=1 would time the interpreter"}
    else:
        result = {"results": run_cuda(SHAPES, args.ms, args.group_size)}
    text = json.dumps(result, indent=2)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
