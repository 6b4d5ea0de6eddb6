"""W4A16 linear on CPU: bf16 F.linear vs qatpass W4A16Linear vs torchao, one run, JSON out.

    python benchmarks/linear.py --out results/linear.json [--threads 1,2] [--group-sizes 32,128]

For each weight shape (N, K) and batch M: median and minimum wall time (ms) of
- bf16:              F.linear(x, w) in bf16 (oneDNN)
- qatpass:           `W4A16Linear` as `convert` builds it: qatpass's native AVX-512 kernel on the
                     canonical packed weight where it applies (`cpu_path` in the row), which
                     picks per M (`qatpass_kernel`: "native", or "gemm" on decoded strips)
- qatpass_aten:      the same module built under `cpu_kernel.disabled()`: aten's int4 GEMM on a
                     one-time repack
- qatpass_fallback:  the per-call dequantize + F.linear path, for comparison
- torchao_int4:      `Int4WeightOnlyConfig(group_size=G)` (the error is recorded where it cannot run)
- torchao_w8a8:      `Int8DynamicActivationInt8WeightConfig()`
with speedups over bf16, and model bytes: packed (qweight + scales, what is saved/exported) and
resident on CPU (plus any repack), each over bf16. Symmetric, group sizes 32 (the target) and
128. Each thread count in --threads is set with torch.set_num_threads and recorded per row.
Variants are timed round-robin so a busy machine slows them alike.

Cold by default: each variant rotates over copies of its weight that together fill twice the
last-level cache, so every call streams its weight from DRAM as a layer of a large model does,
while the code, x and the output stay in cache (a single 4096x4096 INT4 weight, 9 MB, would sit
in a 32 MB L3 between calls while its 33 MB bf16 twin would not). `--warm` uses one copy.
With CUDA it appends `run_cuda()` rows from benchmarks/cuda_linear.py.

The limit: each thread count first measures the machine's streaming read bandwidth (`read_bw`:
a 256 MiB fp32 array summed with torch, best of 5) and probes again before every M=1 row (the
best probe so far is `read_bw_gbps`: on a shared machine a low probe would flatter), and every
M=1 row reports each variant's bytes streamed per second (`<variant>_gbps`: the packed bytes,
qweight + scales (+ zeros), for qatpass; 2 bytes/weight for bf16) and that as a share of the
probe (`<variant>_pct_of_read_bw`). At M=1 a `read` of the packed weight's bytes also runs in
every round, beside each qatpass call: `qatpass_pct_of_paired_read` is the median over rounds of
read time / kernel time (quartiles in `_iqr`), the limit measured at the same moment. From
GEMM_ROWS_FROM rows the limit is the multiply-adds: each thread count times the native library's
register-only vdpbf16ps loop (`dot_peak_gflops`), and those rows report bf16's and qatpass's
GFLOPS (2 M N K / time) and their share of it (`<variant>_pct_of_dot_peak`). `call_overhead`
times what a module call costs beyond the C function it calls (`call_overhead_us`). Each row is
also printed as one readable line (`summary`).
llama.cpp's Q4_0 is timed by `benchmarks/llama_cpp_q4_0.py` (`LLAMA_CPP`).

Bandwidth bounds at M=1 over bf16's 2 bytes/weight: the native kernel streams 0.5 byte of nibbles
plus a 2-byte scale per group, 2 / (0.5 + 2/G) = 3.56x at G=32; aten's layout stores a zero next
to every scale, 2 / (0.5 + 4/G) = 3.2x. A kernel that streams better than oneDNN's bf16 GEMV
does can beat these ratios (single-threaded here, neither saturates DRAM).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import itertools
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

SHAPES = ((4096, 4096), (4096, 14336), (14336, 4096))  # (N, K)
MS = (1, 4, 16, 64, 256, 1024)
GROUP_SIZES = (32, 128)


LLAMA_CPP = (
    "not a column here: llama.cpp's Q4_0 matmul is timed by benchmarks/llama_cpp_q4_0.py, which "
    "runs llama.cpp's own test-backend-ops perf (no CPython 3.11 wheel of llama-cpp-python "
    "exposes ggml's matmul to Python; its sdist's vendored llama.cpp builds that binary)"
)
PROBE_BYTES = 256 * 2**20
GEMM_ROWS_FROM = 16  # rows of x from which a row reports GFLOPS against the vdpbf16ps peak


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """torch's thread count set to `threads` inside, restored after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def best_seconds(fn: Callable[[], object], repeats: int) -> float:
    """The fastest of `repeats` timed calls of fn, in seconds."""
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def read_bw(threads: int, nbytes: int = PROBE_BYTES, repeats: int = 5) -> float:
    """Streaming read bandwidth in GB/s on `threads` torch threads: an array 8x the LLC summed."""
    with torch_threads(threads):
        a = torch.ones(nbytes // 4)
        return nbytes / best_seconds(a.sum, repeats) / 1e9


def dot_peak_gflops(threads: int, iters: int = 20_000_000, repeats: int = 3) -> float | None:
    """The compute limit of the batched rows, GFLOPS on `threads` threads: the native library's
    register-only vdpbf16ps loop (`qp_bf16_dot_peak`: 12 independent accumulators, 64 flops an
    instruction), best of `repeats`; None without the native kernel."""
    from qatpass.kernels.cpu.native import library

    lib = library()
    if lib is None:
        return None
    best = best_seconds(lambda: lib.qp_bf16_dot_peak(iters, threads), repeats)
    return threads * iters * 12 * 64 / best / 1e9


def llc_bytes() -> int:
    """The largest CPU cache from sysfs (the last level), 32 MiB where sysfs does not say."""
    sizes = []
    for entry in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = entry.read_text().strip().upper()
        scale = {"K": 2**10, "M": 2**20}.get(text[-1:], 1)
        sizes.append(int(text.rstrip("KM")) * scale)
    return max(sizes, default=32 * 2**20)


def copies_for(nbytes: int, llc: int, cold: bool) -> int:
    """How many copies of a weight make a rotation that no cache level holds (2x the LLC)."""
    return min(32, max(1, math.ceil(2 * llc / nbytes))) if cold else 1


def rotating(fns: list[Callable[[torch.Tensor], object]]) -> Callable[[torch.Tensor], object]:
    """Each call runs the next copy: like a model's consecutive layers, each weight streams
    from DRAM while the code, x and the output stay in cache."""
    it = itertools.cycle(fns)
    return lambda x: next(it)(x)


def timed_ms(fns: dict[str, Callable[[], object]], repeats: int, budget_s: float) -> dict:
    """{name: {"median", "min", "max"}} ms of each callable, timed round-robin.

    Interleaving gives every variant the same share of a noisy machine's contention, and odd
    rounds run in reverse order, so each variant follows every other (a call that follows a large
    streaming read measured up to 1.6x slower here than one that follows a small one); the minimum
    is the figure least disturbed by other processes, max / min shows the noise. After one warmup
    call each, rounds run until `repeats` or budget_s (at least 3 rounds).
    """
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    start = time.perf_counter()
    rounds = 0
    while rounds < repeats and (rounds < 3 or time.perf_counter() - start < budget_s):
        order = list(fns.items())
        for name, fn in order if rounds % 2 == 0 else order[::-1]:  # each follows each
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
        rounds += 1
    return {
        name: {
            "median": statistics.median(ts) * 1e3,
            "min": min(ts) * 1e3,
            "max": max(ts) * 1e3,
            "rounds": ts,
        }
        for name, ts in times.items()
    }


def paired_read(nbytes: int, llc: int, cold: bool) -> Callable[[torch.Tensor], object]:
    """A streaming read of `nbytes` (fp32 buffers summed, rotated as the weights are): timed in
    the same rounds as the kernels, it is the limit measured beside each call."""
    buffers = [torch.ones(max(1, nbytes // 4)) for _ in range(copies_for(nbytes, llc, cold))]
    return rotating([lambda _x, b=b: b.sum() for b in buffers])


def paired_pct(kernel_s: list[float], read_s: list[float]) -> dict:
    """Per round, the read's time over the kernel's on the same bytes, as % of read bandwidth:
    median and quartiles (the machine's drift hits both calls of a round alike)."""
    pct = sorted(100 * r / t for t, r in zip(kernel_s, read_s, strict=True))
    q = statistics.quantiles(pct, n=4) if len(pct) > 1 else [pct[0]] * 3
    return {"median": q[1], "q1": q[0], "q3": q[2]}


def call_overhead_us(threads: int, calls: int = 20000, repeats: int = 5) -> dict:
    """What a `W4A16Linear` call costs beyond its kernel, in us: the module called on a 256 x 256
    group-32 weight at M = 1 (bf16 x, the kernel's work about 1 us) against the same C function
    called through ctypes on ready pointers, the fastest of `repeats` loops of `calls` calls each
    (the Python dispatch, argument checks and output allocation are what remain)."""
    from qatpass.kernels.cpu import native
    from qatpass.lowering.modules import W4A16Linear
    from qatpass.scheme import Int4Scheme

    lib = native.library()
    if lib is None:
        return {"threads": threads, "skipped": native.kernel_unavailable_reason()}
    with torch_threads(threads), torch.no_grad():
        torch.manual_seed(0)
        module = W4A16Linear.from_linear(nn.Linear(256, 256, bias=False), Int4Scheme())
        x = torch.randn(1, 256).bfloat16()
        y = torch.empty(1, 256, dtype=torch.bfloat16)
        args = (x.data_ptr(), 256, module.qweight.data_ptr(), module.scales.data_ptr(), 0, 1.0,
                None, None, y.data_ptr(), 0, 1, 256, 256, 32, threads)  # fmt: skip
        fns = {"module": lambda: module(x), "c_call": lambda: lib.qp_w4a16_bf16(*args)}
        best = {}
        for name, fn in fns.items():

            def loop(fn=fn) -> None:
                for _ in range(calls):
                    fn()

            for _ in range(calls // 10):
                fn()
            best[name] = best_seconds(loop, repeats) / calls * 1e6
        if not torch.equal(module(x), y):
            raise AssertionError("call_overhead_us: the direct call computed something else")
    return {
        "threads": threads,
        "module_us": best["module"],
        "c_call_us": best["c_call"],
        "overhead_us": best["module"] - best["c_call"],
    }


def _torchao(linear: nn.Linear, kind: str, group_size: int) -> nn.Module:
    from torchao.quantization import (
        Int4WeightOnlyConfig,
        Int8DynamicActivationInt8WeightConfig,
        quantize_,
    )

    config = (
        Int4WeightOnlyConfig(group_size=group_size)
        if kind == "int4"
        else Int8DynamicActivationInt8WeightConfig()
    )
    module = nn.Sequential(nn.Linear(linear.in_features, linear.out_features, bias=False))
    module = module.to(torch.bfloat16)
    module[0].weight.data.copy_(linear.weight.data)
    quantize_(module, config)
    return module


def _try(fn: Callable[[], object]) -> tuple[object, str | None]:
    try:
        return fn(), None
    except Exception as e:  # recorded in the JSON: where torchao cannot run, say why
        return None, f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"


VARIANTS = ("bf16", "qatpass", "qatpass_aten", "qatpass_fallback", "torchao_int4", "torchao_w8a8")


def _shape_rows(
    n: int,
    k: int,
    group_size: int,
    ms,
    repeats: int,
    budget_s: float,
    cold: bool,
    variants: tuple[str, ...] = VARIANTS,
    read_bw_gbps: float | None = None,
    peak_gflops: float | None = None,
) -> list[dict]:
    import qatpass
    from qatpass.kernels.cpu.int4pack import _REPACKS, dequant_linear
    from qatpass.kernels.cpu.native import disabled
    from qatpass.lowering import W4A16Linear

    torch.manual_seed(0)
    linear = nn.Linear(k, n, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        linear.weight.normal_(0, 0.02)
    w = linear.weight.detach()
    packed = qatpass.quantize(w, qatpass.Int4Scheme(group_size=group_size))
    fast = W4A16Linear(packed)
    with disabled():
        aten = W4A16Linear(packed)

    def run_aten(x: torch.Tensor, module: W4A16Linear = aten) -> torch.Tensor:
        with disabled():
            return module(x)

    def run_fallback(x: torch.Tensor) -> torch.Tensor:  # no kernel: dequantize + F.linear
        return dequant_linear(
            x, packed.qweight, packed.scales, packed.zeros, None, group_size=group_size
        )

    def resident(module: W4A16Linear) -> int:
        cache = _REPACKS.get(module.qweight)
        extra = () if cache is None else cache[1]
        return packed.nbytes() + sum(t.numel() * t.element_size() for t in extra)

    bf16_bytes = w.numel() * 2
    llc = llc_bytes()

    def copies(module: nn.Module, nbytes: int) -> list[nn.Module]:
        return [module] + [copy.deepcopy(module) for _ in range(copies_for(nbytes, llc, cold) - 1)]

    def bf16_run() -> Callable[[torch.Tensor], object]:
        weights = [w] + [w.clone() for _ in range(copies_for(bf16_bytes, llc, cold) - 1)]
        return rotating([lambda x, w=w: F.linear(x, w) for w in weights])

    builders = {  # only the variants asked for get their copies
        "bf16": bf16_run,
        "qatpass": lambda: rotating(copies(fast, resident(fast))),
        "qatpass_aten": lambda: rotating(
            [lambda x, a=a: run_aten(x, a) for a in copies(aten, resident(aten))]
        ),
        "qatpass_fallback": lambda: run_fallback,  # dequantizes N*K per call: nothing stays cached
    }
    runs = {name: build() for name, build in builders.items() if name in variants}
    baselines = {}
    for kind, nbytes in (("int4", w.numel() // 2), ("w8a8", w.numel())):
        if f"torchao_{kind}" in variants:
            mod, err = _try(lambda kind=kind: _torchao(linear, kind, group_size))
            if mod is not None:
                mod, err = _try(lambda mod=mod, nbytes=nbytes: rotating(copies(mod, nbytes)))
            baselines[f"torchao_{kind}"] = (mod, err)
    rows = []
    for m in ms:
        x = torch.randn(m, k).bfloat16()
        fns = {name: lambda x=x, run=run: run(x) for name, run in runs.items()}
        if m == 1 and "qatpass" in fns:  # the limit, read in the same rounds on the same bytes
            read = paired_read(packed.nbytes(), llc, cold)
            fns["read"] = lambda x=x, read=read: read(x)
        row = {
            "device": "cpu",
            "threads": torch.get_num_threads(),
            "N": n,
            "K": k,
            "M": m,
            "group_size": group_size,
            "cold": cold,
        }
        for name, (mod, err) in baselines.items():
            if mod is not None:
                _, err = _try(lambda mod=mod, x=x: mod(x))
                if err is None:
                    fns[name] = lambda mod=mod, x=x: mod(x)
            if err is not None:
                row[f"{name}_error"] = err
        with torch.inference_mode():
            ref = F.linear(x, qatpass.dequantize(packed, torch.bfloat16)).float()
            row["cpu_path"] = fast.cpu_path
            row["qatpass_max_abs_diff_vs_dequant_ref"] = float((fast(x).float() - ref).abs().max())
            row["qatpass_aten_max_abs_diff_vs_dequant_ref"] = float(
                (run_aten(x).float() - ref).abs().max()
            )
            timed = timed_ms(fns, repeats, budget_s)
            for key, t in timed.items():
                row[f"{key}_ms"], row[f"{key}_min_ms"] = t["median"], t["min"]
                row[f"{key}_max_over_min"] = t["max"] / t["min"]  # the noise of this row
            if "read" in timed:
                paired = paired_pct(timed["qatpass"]["rounds"], timed["read"]["rounds"])
                row["qatpass_pct_of_paired_read"] = paired["median"]
                row["qatpass_pct_of_paired_read_iqr"] = [paired["q1"], paired["q3"]]
        for key in ("qatpass", "qatpass_aten", "qatpass_fallback", "torchao_int4", "torchao_w8a8"):
            if row.get(f"{key}_ms"):
                row[f"{key}_speedup_vs_bf16"] = row["bf16_ms"] / row[f"{key}_ms"]
                row[f"{key}_speedup_vs_bf16_min"] = row["bf16_min_ms"] / row[f"{key}_min_ms"]
        row["qatpass_kernel"] = _kernel_at(fast.cpu_path, x)
        if m == 1 and read_bw_gbps:
            read_bw_gbps = max(read_bw_gbps, read_bw(torch.get_num_threads()))  # probe again
            row["read_bw_gbps"] = read_bw_gbps
            for key, nbytes in (("bf16", bf16_bytes), ("qatpass", packed.nbytes()),
                                ("qatpass_aten", resident(aten))):  # fmt: skip
                if row.get(f"{key}_ms"):
                    gbps = nbytes / (row[f"{key}_ms"] * 1e-3) / 1e9
                    row[f"{key}_gbps"] = gbps
                    row[f"{key}_pct_of_read_bw"] = 100 * gbps / read_bw_gbps
                    best = nbytes / (row[f"{key}_min_ms"] * 1e-3) / 1e9  # the fastest call
                    row[f"{key}_gbps_best"] = best
                    row[f"{key}_pct_of_read_bw_best"] = 100 * best / read_bw_gbps
        if m >= GEMM_ROWS_FROM and peak_gflops:  # the limit there is the multiply-adds
            row["dot_peak_gflops"] = peak_gflops
            for key in ("bf16", "qatpass"):
                if row.get(f"{key}_ms"):
                    gflops = 2 * m * n * k / (row[f"{key}_ms"] * 1e-3) / 1e9
                    row[f"{key}_gflops"] = gflops
                    row[f"{key}_pct_of_dot_peak"] = 100 * gflops / peak_gflops
        row["packed_bytes_over_bf16"] = packed.nbytes() / bf16_bytes
        row["resident_bytes_over_bf16"] = resident(fast) / bf16_bytes
        row["aten_resident_bytes_over_bf16"] = resident(aten) / bf16_bytes
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
        print(summary(row), file=sys.stderr, flush=True)
    return rows


def _kernel_at(cpu_path: str, x: torch.Tensor) -> str:
    """Which kernel `kernels.cpu.linear` runs for x: "gemm" (decoded strips), "native", or the
    CPU path's name (int4pack, dequant)."""
    from qatpass.kernels.cpu.gemm import use_gemm

    if cpu_path != "native":
        return cpu_path
    return "gemm" if use_gemm(x.reshape(-1, x.shape[-1])) else "native"


def summary(row: dict) -> str:
    """One readable line per row: bf16 and qatpass ms (median, min), x bf16 on each, the noise
    (max / min), and at M=1 GB/s and % of the read-bandwidth probe (median, fastest call)."""
    text = (
        f"{row['N']}x{row['K']} g{row['group_size']} M={row['M']} {row['threads']}T: "
        f"bf16 {row['bf16_ms']:.3f} (min {row['bf16_min_ms']:.3f}) ms"
    )
    if row.get("qatpass_ms"):
        text += (
            f" | qatpass [{row['qatpass_kernel']}] {row['qatpass_ms']:.3f} "
            f"(min {row['qatpass_min_ms']:.3f}) ms x{row['qatpass_speedup_vs_bf16']:.2f} bf16 "
            f"(min x{row['qatpass_speedup_vs_bf16_min']:.2f}) | max/min bf16 "
            f"{row['bf16_max_over_min']:.2f} qatpass {row['qatpass_max_over_min']:.2f}"
        )
    if row.get("qatpass_gbps"):
        text += (
            f" | {row['qatpass_gbps']:.1f} GB/s = {row['qatpass_pct_of_read_bw']:.0f}% "
            f"(fastest {row['qatpass_gbps_best']:.1f} = {row['qatpass_pct_of_read_bw_best']:.0f}%)"
            f" of {row['read_bw_gbps']:.1f} GB/s read"
        )
    if row.get("qatpass_pct_of_dot_peak"):
        text += (
            f" | {row['qatpass_gflops']:.0f} GFLOPS = {row['qatpass_pct_of_dot_peak']:.0f}% "
            f"(bf16 {row['bf16_pct_of_dot_peak']:.0f}%) of the {row['dot_peak_gflops']:.0f} "
            "GFLOPS vdpbf16ps peak"
        )
    if row.get("qatpass_pct_of_paired_read"):
        q1, q3 = row["qatpass_pct_of_paired_read_iqr"]
        text += (
            f" | paired with a read of the same bytes: {row['qatpass_pct_of_paired_read']:.0f}% "
            f"(quartiles {q1:.0f}-{q3:.0f}%)"
        )
    return text


def run_cpu(
    shapes,
    ms,
    group_sizes,
    threads,
    repeats: int,
    budget_s: float,
    cold: bool = True,
    variants: tuple[str, ...] = VARIANTS,
) -> list[dict]:
    """One row per (threads, group size, N, K, M) on this CPU; times in ms."""
    rows = []
    for t in threads:
        torch.set_num_threads(t)
        bw = read_bw(t)
        peak = dot_peak_gflops(t) if max(ms) >= GEMM_ROWS_FROM else None
        print(json.dumps({"threads": t, "read_bw_gbps": bw, "dot_peak_gflops": peak}),
              file=sys.stderr, flush=True)  # fmt: skip
        for g in group_sizes:
            for n, k in shapes:
                rows += _shape_rows(n, k, g, ms, repeats, budget_s, cold, variants, bw, peak)
    return rows


def run_cuda_rows() -> list[dict]:
    """benchmarks/cuda_linear.py's rows when CUDA is available (the kernel benchmark)."""
    if not torch.cuda.is_available():
        return []
    path = Path(__file__).with_name("cuda_linear.py")
    spec = importlib.util.spec_from_file_location("qatpass_cuda_linear", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.run_cuda()


def main(argv: list[str] | None = None) -> dict:
    from qatpass.kernels.cpu.native import kernel_unavailable_reason

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help="write the JSON here (else stdout)")
    ap.add_argument("--threads", default="1,2", help="comma-separated torch thread counts")
    ap.add_argument("--group-sizes", default="32,128", help="comma-separated group sizes")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--budget-s", type=float, default=3.0, help="max timing per (N, K, M)")
    ap.add_argument("--shapes", default=None, help="e.g. 4096x4096,4096x14336 (N x K)")
    ap.add_argument("--ms", default=None, help="comma-separated batch sizes M")
    ap.add_argument("--quick", action="store_true", help="one small shape (a smoke test)")
    ap.add_argument("--warm", action="store_true", help="do not flush caches between calls")
    ap.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help="comma-separated, from: " + ", ".join(VARIANTS),
    )
    args = ap.parse_args(argv)
    variants = tuple(args.variants.split(","))
    unknown = set(variants) - set(VARIANTS)
    if unknown or "bf16" not in variants:
        ap.error(f"--variants must include bf16 and come from {VARIANTS}, got {args.variants}")
    threads = [int(t) for t in args.threads.split(",")]
    group_sizes = [int(g) for g in args.group_sizes.split(",")]
    shapes, ms = (((256, 512),), (1, 4)) if args.quick else (SHAPES, MS)
    if args.shapes:
        shapes = [tuple(int(d) for d in s.split("x")) for s in args.shapes.split(",")]
    if args.ms:
        ms = [int(m) for m in args.ms.split(",")]
    result = {
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "platform": platform.platform(),
        "threads": threads,
        "cpu_count": os.cpu_count(),
        "repeats": args.repeats,
        "cold": not args.warm,
        "native_kernel": kernel_unavailable_reason() or "available",
        "call_overhead": [call_overhead_us(t, 2000 if args.quick else 20000) for t in threads],
        "variants": list(variants),
        "llama_cpp_q4_0": LLAMA_CPP,
        "loadavg": os.getloadavg(),
        "cpu": run_cpu(
            shapes,
            ms,
            group_sizes,
            threads,
            args.repeats,
            args.budget_s,
            cold=not args.warm,
            variants=variants,
        ),
        "cuda": run_cuda_rows(),
    }
    result["loadavg_after"] = os.getloadavg()
    return emit(result, args.out)


def emit(result: dict, out: Path | None) -> dict:
    """Write the run's JSON to `out` (its folder made), else print it; returns `result`."""
    text = json.dumps(result, indent=2)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    else:
        print(text)
    return result


if __name__ == "__main__":
    main()
