"""llama.cpp's Q4_0 CPU matmul beside qatpass's W4A16 on the same shape, one run, JSON out.

    python benchmarks/llama_cpp_q4_0.py --test-backend-ops PATH [--out results/llama_cpp.json]

PATH is llama.cpp's `test-backend-ops` (built from llama.cpp, or from the copy vendored in the
`llama-cpp-python` sdist: `cmake -B build -DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=ON && cmake
--build build --target test-backend-ops`). Its perf mode times ggml's CPU MUL_MAT on one resident
weight of N=4096 rows and K=14336 (`type_a=q4_0`: 4.5 bits per weight, a 2-byte scale per 32, as
qatpass's default group 32; x is fp32 and quantized to Q8_0 inside the op), for the batch sizes
its perf list holds. On this machine ggml takes hardware_concurrency() / 2 threads (1 on 2 cores;
`GGML_NTHREADS` sets it where the binary was patched to read it).

qatpass is timed on the same shape and batch sizes in the same conditions: one resident weight
(`--warm` in linear.py terms: no copies to rotate, as ggml's loop does), bf16 x, `W4A16Linear`,
group 32, symmetric, median of its calls; each figure beside the bytes it streams per second and
the machine's read bandwidth measured in the same run (`linear.read_bw`).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

N, K = 4096, 14336  # test-backend-ops' perf case: MUL_MAT(type_a, f32, m=4096, n=bs, k=14336)
Q4_0_BYTES_PER_WEIGHT = 18 / 32  # a block: 2-byte scale + 16 bytes of nibbles per 32 weights
_LINE = re.compile(r"MUL_MAT\((?P<params>[^)]*)\).*?(?P<runs>\d+) runs -\s+(?P<us>[\d.]+) us/run")


def _linear_module():
    spec = importlib.util.spec_from_file_location(
        "qatpass_bench_linear", Path(__file__).with_name("linear.py")
    )
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def parse(text: str) -> dict[int, dict]:
    """{batch: {"us", "runs", "params"}} of the q4_0 x f32 rows at m=4096, k=14336."""
    rows = {}
    for match in _LINE.finditer(text):
        params = dict(p.split("=", 1) for p in match["params"].split(",") if "=" in p)
        if params.get("type_a") != "q4_0" or params.get("type_b") != "f32":
            continue
        if params.get("m") != str(N) or params.get("k") != str(K):
            continue
        rows[int(params["n"])] = {"us": float(match["us"]), "runs": int(match["runs"]),
                                  "params": match["params"]}  # fmt: skip
    return rows


def run_llama_cpp(binary: Path, threads: int | None) -> tuple[dict[int, dict], str]:
    """test-backend-ops perf on the CPU backend, the q4_0 MUL_MAT cases only."""
    env = dict(os.environ)
    if threads is not None:
        env["GGML_NTHREADS"] = str(threads)
    cmd = [str(binary), "perf", "-b", "CPU", "-o", "MUL_MAT", "-p",
           f"type_a=q4_0,type_b=f32,m={N},n=[0-9]+,k={K}"]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800, check=False)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr[-500:]}")
    return parse(proc.stdout), proc.stdout


def time_qatpass(batches, repeats: int) -> dict[int, float]:
    """Median ms of `W4A16Linear` (group 32, bf16 x) on one resident 4096 x 14336 weight."""
    import qatpass
    from qatpass.lowering import W4A16Linear

    torch.manual_seed(0)
    w = torch.randn(N, K, dtype=torch.bfloat16) * 0.02
    module = W4A16Linear(qatpass.quantize(w, qatpass.Int4Scheme(group_size=32)))
    out = {}
    with torch.inference_mode():
        for m in batches:
            x = torch.randn(m, K, dtype=torch.bfloat16)
            module(x)
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                module(x)
                times.append(time.perf_counter() - t0)
            out[m] = statistics.median(times) * 1e3
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--test-backend-ops", type=Path, required=True, help="llama.cpp binary")
    ap.add_argument("--threads", type=int, default=None,
                    help="GGML_NTHREADS for a binary patched to read it (else ggml's default)")  # fmt: skip
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    lin = _linear_module()
    llama, stdout = run_llama_cpp(args.test_backend_ops, args.threads)
    if not llama:
        raise SystemExit(f"no q4_0 MUL_MAT m={N} k={K} rows in the output:\n{stdout[-2000:]}")
    threads = args.threads or max(1, (os.cpu_count() or 2) // 2)
    torch.set_num_threads(threads)
    bw = lin.read_bw(threads)
    ours = time_qatpass(sorted(llama), args.repeats)
    q4_bytes = N * K * Q4_0_BYTES_PER_WEIGHT  # qatpass at group 32 streams the same 4.5 bits
    rows = []
    for m in sorted(llama):
        lc_ms = llama[m]["us"] / 1e3
        row = {"N": N, "K": K, "M": m, "threads": threads, "llama_cpp_q4_0_ms": lc_ms,
               "qatpass_g32_ms": ours[m], "qatpass_over_llama_cpp": lc_ms / ours[m],
               "llama_cpp_params": llama[m]["params"]}  # fmt: skip
        if m == 1:
            for key, ms in (("llama_cpp_q4_0", lc_ms), ("qatpass_g32", ours[m])):
                row[f"{key}_gbps"] = q4_bytes / (ms * 1e-3) / 1e9
                row[f"{key}_pct_of_read_bw"] = 100 * row[f"{key}_gbps"] / bw
        rows.append(row)
        print(
            f"{N}x{K} M={m} {threads}T: llama.cpp Q4_0 {lc_ms:.3f} ms | qatpass g32 "
            f"{ours[m]:.3f} ms | llama.cpp / qatpass {lc_ms / ours[m]:.2f}"
            + (
                f" | {row['llama_cpp_q4_0_gbps']:.1f} vs {row['qatpass_g32_gbps']:.1f} GB/s "
                f"of {bw:.1f} read"
                if m == 1
                else ""
            ),
            file=sys.stderr,
        )
    result = {"torch": torch.__version__, "read_bw_gbps": bw, "rows": rows,
              "loadavg": os.getloadavg(), "binary": str(args.test_backend_ops)}  # fmt: skip
    return lin.emit(result, args.out)


if __name__ == "__main__":
    main()
