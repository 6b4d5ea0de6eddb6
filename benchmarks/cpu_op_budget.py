"""The CPU kernel's instruction budget per 64-byte line of packed weight, measured: JSON out.

    python benchmarks/cpu_op_budget.py --out results/cpu_op_budget.json

This VM exposes no hardware counters (`perf stat` reports cycles "not supported"), so the budget
is timed: a C program (built here with `cc`) runs, register-only and without loop-carried
dependencies, each 512-bit instruction the M=1 loop uses and then the loop's own mix of them per
line, and reports cycles per iteration against a dependent chain of scalar adds (one cycle each)
timed beside every row, so clock drift cancels. From the mix's cycles it prints the packed
weight rate one core could decode if memory cost nothing (`decode_gbps_ceiling`: 64 bytes per
iteration), beside the machine's streaming read bandwidth on one thread (benchmarks/linear.py's
probe): when the two are close the loop cannot hide the memory stream behind its own work.

Mixes (per 128 weights, one line; see qatpass/kernels/cpu/csrc/w4a16_cpu.c):
- `m1_line`: what `objdump` of the M=1 loop shows per line (bf16 scales, group 32): 3 `vpsrlw`
  and 4 `vpermw` (the nibbles' bf16 values), a `vpermw` of the block's scales, 4 `vdpbf16ps`,
  one `vfmadd231ps`, and its 3 loads (the weight line, the scales, a quarter of x's line: x is
  shared by the four rows in flight).
- `m1_line_byte_load`: the index for k = 4j + 2 from a load one byte further instead of a shift
  (a load across two cache lines); tried, not faster in the kernel.
- `m1_line_scale_bcast`: the scale from a broadcast load and an `and` instead of a permute (one
  group per line, group >= 128); tried, within noise in the kernel.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# AT&T templates: {d} a fresh destination (zmm12..19), {a} an accumulator (zmm0..11), the sources
# zmm20/zmm21 never written, %rsi a 4 KiB buffer
OPS = {
    "vpsrlw": "vpsrlw $4, %zmm20, %zmm{d}",
    "vpermw": "vpermw %zmm20, %zmm21, %zmm{d}",
    "vdpbf16ps": "vdpbf16ps %zmm20, %zmm21, %zmm{a}",
    "vfmadd231ps": "vfmadd231ps %zmm20, %zmm21, %zmm{a}",
    "vpandd": "vpandd %zmm20, %zmm21, %zmm{d}",
    "load": "vmovdqu64 (%rsi), %zmm{d}",
    "split_load": "vmovdqu64 1(%rsi), %zmm{d}",
    "bcast_load": "vpbroadcastw (%rsi), %zmm{d}",
}
SINGLES = ["vpsrlw", "vpermw", "vdpbf16ps", "vfmadd231ps", "vpandd", "load", "split_load"]
_DECODE = ["vpermw"] * 4 + ["vdpbf16ps"] * 4 + ["vfmadd231ps"]
MIXES = {
    "m1_line": ["vpsrlw"] * 3 + _DECODE + ["vpermw"] + ["load"] * 3,
    "m1_line_byte_load": ["vpsrlw"] * 2 + _DECODE + ["vpermw", "split_load"] + ["load"] * 3,
    "m1_line_scale_bcast": ["vpsrlw"] * 3 + _DECODE + ["bcast_load", "vpandd"] + ["load"] * 2,
}
UNROLL = 4  # copies of a mix per loop iteration (the loop's own add/branch amortised)
SINGLE_REPEAT = 3  # an instruction alone runs 3 x UNROLL times per iteration: 12 accumulators
ACCUMULATE = ("vdpbf16ps", "vfmadd231ps")
LOADS = ("load", "split_load", "bcast_load")


def asm_body(ops: list[str]) -> str:
    """UNROLL copies of `ops`, destinations rotating so no instruction waits on another."""
    lines, a, d = [], 0, 0
    for _ in range(UNROLL):
        for op in ops:
            lines.append(OPS[op].format(a=a % 12, d=12 + d % 8))
            a, d = (a + 1, d) if op in ACCUMULATE else (a, d + 1)
    return "\\n\\t".join(line.replace("%", "%%") for line in lines)


def c_source(rows: dict[str, list[str]], iters: int) -> str:
    """A program printing `name cycles_per_mix` per row, each timed against an add chain."""
    clobbers = ",".join(f'"xmm{i}"' for i in range(22))
    out = [
        "#include <stdio.h>",
        "#include <time.h>",
        "static char buf[4096] __attribute__((aligned(64)));",
        "static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t);"
        " return t.tv_sec + t.tv_nsec * 1e-9; }",
        "static double cycle_s(long n) {  /* seconds per dependent add */",
        "  long x = 0, left = n; double t = now();",
        '  __asm__ volatile("1:\\n\\tadd $1,%0\\n\\tadd $1,%0\\n\\tadd $1,%0\\n\\tadd $1,%0\\n\\t"',
        '                   "sub $4,%1\\n\\tjnz 1b" : "+r"(x), "+r"(left));',
        "  return (now() - t) / (double)n; }",
        "int main(void) { long n; double t, c0, c1;",
    ]
    for name, ops in rows.items():
        body = asm_body(ops)
        out += [
            f"  c0 = cycle_s({iters * 4}); n = {iters}; t = now();",
            '  __asm__ volatile("vpxord %%zmm20, %%zmm20, %%zmm20\\n\\t"',
            '                   "vpxord %%zmm21, %%zmm21, %%zmm21\\n\\t1:\\n\\t"',
            f'                   "{body}\\n\\tdec %0\\n\\tjnz 1b"',
            f'                   : "+r"(n) : "S"(buf) : "cc", "memory", {clobbers});',
            f"  t = now() - t; c1 = cycle_s({iters * 4});",
            f'  printf("{name} %.4f %.4f\\n", t / ((c0 < c1 ? c0 : c1) * {iters}.0 * {UNROLL}),'
            " 1e-9 / (c0 < c1 ? c0 : c1));",
        ]
    out.append("  return 0; }")
    return "\n".join(out) + "\n"


def measure(iters: int = 2_000_000, repeats: int = 3) -> dict:
    """{row: cycles per mix (the fewest of `repeats` runs)}, and the clock in GHz."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("needs a C compiler (cc or gcc)")
    rows = {op: [op] * SINGLE_REPEAT for op in SINGLES} | MIXES
    with tempfile.TemporaryDirectory() as tmp:
        src, exe = Path(tmp) / "budget.c", Path(tmp) / "budget"
        src.write_text(c_source(rows, iters))
        cmd = [cc, "-O2", "-mavx512f", str(src), "-o", str(exe)]  # zmm16+ named in the asm
        built = subprocess.run(cmd, capture_output=True, text=True)
        if built.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed: {built.stderr[-600:]}")
        best: dict[str, float] = {}
        ghz = 0.0
        for _ in range(repeats):
            done = subprocess.run([str(exe)], check=True, capture_output=True, text=True)
            for line in done.stdout.split("\n"):
                if line:
                    name, cycles, clock = line.split()
                    best[name] = min(best.get(name, float("inf")), float(cycles))
                    ghz = max(ghz, float(clock))
    return {"ghz": ghz, "cycles": best, "ops": rows}


def run(iters: int = 2_000_000, repeats: int = 3, read_gbps: float | None = None) -> dict:
    """The budget rows: per instruction its cycles (reciprocal throughput); per mix its cycles per
    line, the decode-only ceiling in GB/s, and that over `read_gbps`."""
    m = measure(iters, repeats)
    rows = []
    for name, ops in m["ops"].items():
        cycles = m["cycles"][name]
        row = {"name": name, "ops": ops, "cycles": cycles}
        if name in SINGLES:
            row["cycles"] = cycles / SINGLE_REPEAT  # per instruction
        else:
            row["vector_ops"] = sum(op not in LOADS for op in ops)
            row["decode_gbps_ceiling"] = 64 * m["ghz"] / cycles
            if read_gbps:
                row["ceiling_over_read"] = row["decode_gbps_ceiling"] / read_gbps
        rows.append(row)
    return {"ghz": m["ghz"], "read_bw_gbps_1t": read_gbps, "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, help="write the JSON here (else stdout)")
    ap.add_argument("--iters", type=int, default=2_000_000)
    ap.add_argument("--no-read", action="store_true", help="skip the read-bandwidth probe")
    args = ap.parse_args()
    from qatpass.kernels.cpu.native import kernel_unavailable_reason

    why = kernel_unavailable_reason()  # the kernel's own CPU check (AVX-512 BW / BF16) and build
    if why:
        sys.exit(f"cpu_op_budget: the native kernel cannot run here ({why}); nothing to measure")
    sys.path.insert(0, str(Path(__file__).parent))
    from linear import emit, read_bw

    read = None if args.no_read else read_bw(1)
    result = run(args.iters, read_gbps=read)
    for row in result["rows"]:
        extra = ""
        if "decode_gbps_ceiling" in row:
            extra = f"  -> {row['decode_gbps_ceiling']:.1f} GB/s of packed weight"
            if read:
                extra += f" = {row['ceiling_over_read']:.2f}x the {read:.1f} GB/s read"
        print(f"{row['name']:22s} {row['cycles']:6.2f} cycles{extra}", file=sys.stderr)
    emit(result, args.out)


if __name__ == "__main__":
    main()
