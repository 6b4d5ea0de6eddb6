"""`qatpass demo`: the QAT vs PTQ accuracy study, both parts, on a CPU in under half an hour.

    qatpass demo [--quick] [--out DIR] [--model DIR] [--part a|b|both]
                 [--compiler aot_eager|inductor] [--threads N] [--seed N]

Part A (part_a.py): all-MiniLM-L6-v2 sentence embeddings, INT4 PTQ vs QAT by distillation.
Part B (part_b.py): a byte-level Llama trained from scratch; PTQ vs QAT served in INT4.
Both train through `torch.compile(..., backend=qat4)` and serve through `qatpass.convert`.
Prints one table; writes results.json, part_a.png and part_b.png into --out.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qatpass demo", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("qatpass-demo"), help="output folder")
    p.add_argument("--quick", action="store_true", help="tiny steps and data (the test suite)")
    p.add_argument("--model", type=Path, default=None, help="local HF model folder for part A")
    p.add_argument("--part", choices=("a", "b", "both"), default="both")
    p.add_argument("--compiler", choices=("aot_eager", "inductor"), default="aot_eager",
                   help="compiler behind qat4 (default aot_eager: on 1-2 CPU cores Inductor's "
                   "compile time costs more than its faster steps save at these sizes)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: on shared cores more threads stall each "
                   "other; raise it on a dedicated machine)")  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    t0 = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args, t0)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace, t0: float) -> int:
    import torch

    from qatpass.config import QatConfig
    from qatpass.demo.part_a import PartARecipe, run_part_a
    from qatpass.demo.part_b import PartBRecipe, run_part_b
    from qatpass.demo.plots import plot_part_a, plot_part_b
    from qatpass.demo.report import format_table, write_results
    from qatpass.demo.serving import SERVING

    compiler = args.compiler
    progress = not args.no_progress
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {
        "scheme": QatConfig().scheme.to_dict(),
        "compiler": compiler,
        "serving": SERVING,
        "quick": args.quick,
        "seed": args.seed,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    if args.part in ("a", "both"):
        recipe = PartARecipe.quick() if args.quick else PartARecipe()
        results["part_a"] = run_part_a(recipe, model_dir=args.model, compiler=compiler,
                                       seed=args.seed, progress=progress)  # fmt: skip
        plot_part_a(results["part_a"], out)
    if args.part in ("b", "both"):
        recipe = PartBRecipe.quick() if args.quick else PartBRecipe()
        results["part_b"] = run_part_b(recipe, compiler=compiler, seed=args.seed,
                                       progress=progress)  # fmt: skip
        plot_part_b(results["part_b"], out)
    results["seconds"] = time.perf_counter() - t0
    print(format_table(results))
    write_results(results, out)
    print(f"wrote {out / 'results.json'} and PNG plots to {out}/")
    return 0
