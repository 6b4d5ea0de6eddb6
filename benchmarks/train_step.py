"""Training step time on this CPU: baseline vs qat4 vs torchao QAT, one run, JSON out.

    python benchmarks/train_step.py --out results/train_step.json
    nice python benchmarks/train_step.py --model smollm2 --autocast --batch 4 --seq 256 \
        --rounds 3 --out results/train_step_smollm2.json

`--model toy`: a small Llama-style model (HF LlamaForCausalLM from a config); `--model smollm2`:
SmolLM2-135M-Instruct from `qatpass.demo.pretrained` (its real shapes and weights: 30 layers,
hidden 576, vocab 49152, tied embeddings). AdamW, fwd + bwd + step, fp32 master weights
(`--autocast`: the forward under bf16 autocast). Variants:
- baseline:        torch.compile(model) with Inductor, no quantization
- qat4:            torch.compile(model, backend="qat4") (fake quant fused by Inductor)
- torchao_eager:   torchao QATConfig(step="prepare") module swap, eager
- torchao_compiled: the same, torch.compile with Inductor
All use int4 weights, group `--group-size` (32), symmetric; lm_head and embeddings in high precision.
Reports the median step time over `--steps` timed steps after `--warmup` steps; with `--rounds R`
the sweep runs R times, variants alternating, and each reports the median of its R medians.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
from torch import nn


def make_model(dtype: torch.dtype, layers: int | None, hidden: int, name: str = "toy") -> nn.Module:
    if name == "smollm2":
        from qatpass.demo.pretrained import load_smollm2

        model = load_smollm2()[0].train().to(dtype)
        if layers is not None and layers < model.config.num_hidden_layers:
            # the first `layers` decoder layers, real shapes and weights (a compile-cost proxy)
            model.model.layers = model.model.layers[:layers]
            model.config.num_hidden_layers = layers
        return model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    layers = 4 if layers is None else layers
    cfg = LlamaConfig(
        vocab_size=1024,
        hidden_size=hidden,
        intermediate_size=hidden * 4,
        num_hidden_layers=layers,
        num_attention_heads=max(hidden // 64, 1),
        num_key_value_heads=max(hidden // 128, 1),
        max_position_embeddings=512,
    )
    return LlamaForCausalLM(cfg).to(dtype)


def torchao_prepare(model: nn.Module, group_size: int = 32) -> nn.Module:
    from torchao.quantization import quantize_
    from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig

    weight = IntxFakeQuantizeConfig(torch.int4, group_size=group_size, is_symmetric=True)

    def only_decoder_linears(module: nn.Module, fqn: str) -> bool:
        return isinstance(module, nn.Linear) and "lm_head" not in fqn

    quantize_(
        model, QATConfig(weight_config=weight, step="prepare"), filter_fn=only_decoder_linears
    )
    return model


def time_steps(
    step: Callable[[], torch.Tensor], warmup: int, steps: int
) -> tuple[float, float, list[float]]:
    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    first = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return statistics.median(times), first, times


def make_step(
    model: nn.Module, run: nn.Module, ids: torch.Tensor, autocast: bool = False
) -> Callable[[], torch.Tensor]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = run(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def interleaved(builders: dict, base: nn.Module, ids: torch.Tensor, args) -> dict:
    """Every variant built and warmed up in this process, then `args.steps` rounds of one step
    each, in turn. Ratios pair each step with the baseline step of the same round."""
    steps = {}
    for name, build in builders.items():
        model, run = build(copy.deepcopy(base))
        steps[name] = make_step(model, run, ids, args.autocast)
        t0 = time.perf_counter()
        for _ in range(args.warmup):
            steps[name]()
        print(f"{name:>17}: warm-up {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.steps):
        for name, step in steps.items():
            t = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t)
    rows = {}
    for name, ts in times.items():
        rows[name] = {"median_s": statistics.median(ts), "times_s": ts}
        if "baseline" in times and name != "baseline":
            ratios = [a / b for a, b in zip(ts, times["baseline"], strict=True)]
            rows[name]["paired_ratio_median"] = statistics.median(ratios)
            rows[name]["paired_ratios"] = ratios
        print(f"{name:>17}: {rows[name]['median_s']:.3f} s", file=sys.stderr)
    return rows


def _child_args(argv: list[str] | None) -> list[str]:
    """The parent's arguments minus --variants/--out/--rounds, for a one-variant child."""
    args = list(sys.argv[1:] if argv is None else argv)
    out = []
    skip = False
    for a in args:
        if skip:
            skip = False
            continue
        if a in ("--variants", "--out", "--rounds"):
            skip = True
            continue
        if a.startswith(("--variants=", "--out=", "--rounds=")):
            continue
        out.append(a)
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="toy", choices=["toy", "smollm2"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--autocast", action="store_true", help="forward under bf16 autocast")
    p.add_argument("--group-size", type=int, default=32)
    p.add_argument(
        "--layers", type=int, default=None, help="decoder layers (toy 4; smollm2 all 30, or fewer)"
    )
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--variants", default="baseline,qat4,torchao_eager,torchao_compiled")
    p.add_argument(
        "--in-process", action="store_true", help="run variants here, not one process each"
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="repeat the one-process-per-variant sweep, alternating variants; each variant "
        "reports the median of its round medians (a noisy machine loads every variant alike)",
    )
    p.add_argument(
        "--interleave",
        action="store_true",
        help="one process: build every variant, then time their steps in turn (baseline, qat4, "
        "..., baseline, ...), --steps each; reports each variant's median and the median of its "
        "per-step ratios to the baseline step next to it (background load hits both alike)",
    )
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    base = make_model(dtype, args.layers, args.hidden, args.model)
    torch.manual_seed(0)
    ids = torch.randint(0, base.config.vocab_size, (args.batch, args.seq))
    g = args.group_size
    variants: dict[str, Callable[[], tuple[nn.Module, nn.Module]]] = {
        "baseline": lambda m: (m, torch.compile(m)),
        "qat4": lambda m: (m, torch.compile(m, backend="qat4", options={"group_size": g})),
        "torchao_eager": lambda m: (torchao_prepare(m, g), m),
        "torchao_compiled": lambda m: (torchao_prepare(m, g), torch.compile(m)),
    }
    rows = {}
    names = args.variants.split(",")
    if len(names) > 1 and not args.in_process and not args.interleave:
        # one fresh process per variant: no variant inherits another's caches or allocator state
        rounds: dict[str, list[dict]] = {name: [] for name in names}
        for _ in range(args.rounds):
            for name in names:
                cmd = [sys.executable, __file__, *_child_args(argv), "--variants", name]
                cmd += ["--in-process"]
                child = json.loads(
                    subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                )
                rounds[name].append(child["results"][name])
                row = rounds[name][-1]
                print(f"{name:>17}: {row.get('median_s', row.get('error'))}", file=sys.stderr)
        for name, runs in rounds.items():
            ok = [r for r in runs if "median_s" in r]
            if not ok:
                rows[name] = runs[0]
                continue
            meds = [r["median_s"] for r in ok]
            rows[name] = {
                "median_s": statistics.median(meds),
                "round_medians_s": meds,
                "round_spread": (max(meds) - min(meds)) / statistics.median(meds),
                "warmup_s": statistics.median(r["warmup_s"] for r in ok),
            }
        names = []
    if args.interleave:
        rows = interleaved({n: variants[n] for n in names}, base, ids, args)
        names = []
    for name in names:
        build = variants[name]
        torch._dynamo.reset()
        model = copy.deepcopy(base)
        try:
            model, run = build(model)
            step = make_step(model, run, ids, args.autocast)
            median, first, times = time_steps(step, args.warmup, args.steps)
            rows[name] = {"median_s": median, "warmup_s": first, "times_s": times}
        except Exception as e:  # a variant that cannot run here is recorded, not fatal
            rows[name] = {"error": f"{type(e).__name__}: {e}"[:500]}
        print(f"{name:>17}: {rows[name].get('median_s', rows[name].get('error'))}", file=sys.stderr)
    ref = rows.get("baseline", {}).get("median_s")
    for row in rows.values():
        if ref and "median_s" in row:
            row["vs_baseline"] = row["median_s"] / ref
    result = {
        "benchmark": "train_step",
        "config": vars(args),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
        "params_m": sum(p.numel() for p in base.parameters()) / 1e6,
        "results": rows,
    }
    text = json.dumps(result, indent=2)
    if args.out:
        from pathlib import Path

        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    print(text)
    return result


if __name__ == "__main__":
    main()
