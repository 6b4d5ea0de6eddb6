"""GRPO on INT4 rollouts: train with qat4, roll out with the packed INT4 model, refresh each step.

An RL loop as RL teams run it: the policy samples completions (rollouts) on an inference model,
the trainer computes a clipped policy-gradient loss whose importance ratios compare its own token
logprobs with the ones the rollout model recorded, and after each optimizer step the inference
model is synced to the new master weights. The task is verifiable arithmetic ("What is 7 + 5?"),
the completion's last integer checked against the answer (reward 1, partial credit for a close
number, 0 for none). Three arms, same seeds and prompts:

    fp32      fp32 training (plain torch.compile)  + fp32 rollouts        the floor
    fp32_int4 fp32 training (plain torch.compile)  + INT4 rollouts (RTN)  the train/serve mismatch
    qat4_int4 backend="qat4" training              + INT4 rollouts        what qatpass is for

Rollouts: HF `generate` with its KV cache on the rollout model (for INT4: `qatpass.convert` of
the master, run by qatpass's CPU kernel), sampling at `temperature` with no other logit processor
(checked each step), logprobs from the raw logits / temperature. Training: the master weights
under torch.compile (batch and length dims marked dynamic: they change every step), one forward per step
measures logprob_train (the loss's own forward, before the update, same tokens) and gives the
loss. Weight sync: `qatpass.refresh(qmodel, model)` after every optimizer step, timed.

    python examples/rl_int4_rollouts.py --parallel --out rl-int4  # SmolLM2-135M-Instruct
    python examples/rl_int4_rollouts.py --quick --out /tmp/rl    # tiny random Llama (seconds)

SmolLM2's fp32 reference weights went through Q4_1 (qatpass.demo.pretrained.REFERENCE_NOTE).
Writes rl_int4.json and rl_int4.png (mismatch on a log scale, reward, per step, three arms).
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import re
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

import qatpass

ARMS = {  # name: (training backend, rollout model)
    "fp32": ("fp32", "fp32"),
    "fp32_int4": ("fp32", "int4"),
    "qat4_int4": ("qat4", "int4"),
}
LABELS = {
    "fp32": "fp32 train + fp32 rollouts (floor)",
    "fp32_int4": "fp32 train + INT4 rollouts (mismatch)",
    "qat4_int4": "qat4 train + INT4 rollouts",
}


@dataclass(frozen=True)
class Recipe:
    steps: int = 20
    prompts_per_step: tuple[int, ...] = (3, 2)  # cycled: the batch shape changes step to step
    samples: int = 4  # completions per prompt (the GRPO group)
    max_new_tokens: int = 10
    temperature: float = 0.7  # sampling and both logprobs use logits / temperature
    lr: float = 5e-6
    clip_eps: float = 0.2
    max_operand: int = 9
    eval_prompts: int = 32  # greedy accuracy before and after each arm
    group_size: int = 32
    compiler: str = "eager"  # behind plain compile and qat4 alike (Dynamo graph, eager autograd)

    @classmethod
    def quick(cls) -> Recipe:
        return cls(steps=3, prompts_per_step=(4, 3), samples=3, max_new_tokens=6, temperature=1.0,
                   lr=1e-3, eval_prompts=4)  # fmt: skip


# ---- the task: small sums, answer parsed and checked ----------------------------------------


def make_problems(rng: random.Random, n: int, max_operand: int) -> list[tuple[int, int]]:
    return [(rng.randint(1, max_operand), rng.randint(1, max_operand)) for _ in range(n)]


def reward(completion: str, answer: int) -> float:
    """1 for the right last integer, up to 0.5 for a close one, 0 without an integer."""
    numbers = re.findall(r"-?\d+", completion)
    if not numbers:
        return 0.0
    got = int(numbers[-1])
    if got == answer:
        return 1.0
    return 0.5 * max(0.0, 1.0 - abs(got - answer) / max(abs(answer), 1))


class ChatCodec:
    """Prompts through the model's chat template; completions decoded by its tokenizer."""

    SYSTEM = "Answer with the number only."  # shorter than SmolLM2's default system prompt

    def __init__(self, tokenizer) -> None:
        self.tok = tokenizer
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id

    def prompts(self, problems: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        texts = [
            self.tok.apply_chat_template(
                [
                    {"role": "system", "content": self.SYSTEM},
                    {"role": "user", "content": f"What is {a} + {b}?"},
                ],
                tokenize=False,
                add_generation_prompt=True,
            )
            for a, b in problems
        ]
        enc = self.tok(texts, return_tensors="pt", padding=True, padding_side="left")
        return enc.input_ids, enc.attention_mask

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)


class CharCodec:
    """A character vocabulary for the tiny random model of --quick: "3+4=" -> ids."""

    ALPHABET = "0123456789+= "

    def __init__(self) -> None:
        self.pad_id, self.eos_id = 0, 1

    def prompts(self, problems: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [[2 + self.ALPHABET.index(c) for c in f"{a}+{b}="] for a, b in problems]
        width = max(map(len, rows))
        ids = torch.tensor([[self.pad_id] * (width - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        return ids, mask

    def decode(self, ids: list[int]) -> str:
        return "".join(self.ALPHABET[i - 2] for i in ids if i >= 2)


def tiny_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=2 + len(CharCodec.ALPHABET),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        bos_token_id=None,
        pad_token_id=0,
        eos_token_id=1,
    )
    return LlamaForCausalLM(cfg).eval()


def reference_note(quick: bool) -> str:
    if quick:
        return "a random 2-layer Llama from a config (--quick)"
    from qatpass.demo.pretrained import REFERENCE_NOTE

    return REFERENCE_NOTE


def load(quick: bool) -> tuple[LlamaForCausalLM, object, str]:
    """(fp32 reference model, codec, what the reference is)."""
    if quick:
        return tiny_model(), CharCodec(), reference_note(quick)
    from qatpass.demo.pretrained import load_smollm2

    model, tokenizer = load_smollm2()
    return model, ChatCodec(tokenizer), reference_note(quick)


# ---- rollouts ----------------------------------------------------------------------------------


@dataclass
class Rollout:
    ids: torch.Tensor  # [B, P + G] prompt (left padded) + generated tokens
    attention_mask: torch.Tensor  # [B, P + G] what generate attended to
    position_ids: torch.Tensor  # [B, P + G] what generate used
    prompt_len: int
    mask: torch.Tensor  # [B, G] generated tokens up to and including the first EOS
    logprobs: torch.Tensor  # [B, G] rollout logprobs of the sampled tokens
    texts: list[str]


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """The positions HF generate gives left-padded rows (cumsum of the mask, pads at 1)."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.masked_fill(attention_mask == 0, 1)


def generate(model, codec, ids, mask, recipe: Recipe, sample: bool) -> Rollout:
    """Sample (or greedily decode) completions with HF generate and its KV cache."""
    cfg = GenerationConfig(
        do_sample=sample,
        temperature=recipe.temperature if sample else None,
        top_k=0 if sample else None,
        top_p=1.0 if sample else None,
        max_new_tokens=recipe.max_new_tokens,
        pad_token_id=codec.pad_id,
        eos_token_id=codec.eos_id,
        bos_token_id=None,
        output_logits=True,
        output_scores=True,
        return_dict_in_generate=True,
    )
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=cfg)
    prompt_len = ids.shape[1]
    gen = out.sequences[:, prompt_len:]
    logits = torch.stack(out.logits, dim=1).float()  # raw logits, before any processor
    scores = torch.stack(out.scores, dim=1)  # what was sampled from
    if sample:
        expected = logits / recipe.temperature if recipe.temperature != 1.0 else logits
        if not torch.equal(scores, expected):
            raise RuntimeError("generate applied a logit processor besides the temperature")
    lp = torch.log_softmax(logits / recipe.temperature, dim=-1).gather(-1, gen[..., None])[..., 0]
    is_eos = gen == codec.eos_id
    valid = (is_eos.long().cumsum(1) - is_eos.long()) == 0  # up to and including the first EOS
    full_mask = torch.cat([mask, torch.ones_like(gen)], dim=1)
    texts = [codec.decode(row[v].tolist()) for row, v in zip(gen, valid, strict=True)]
    return Rollout(out.sequences, full_mask, position_ids(full_mask), prompt_len, valid, lp, texts)


def greedy_accuracy(model, codec, problems, recipe: Recipe) -> float:
    ids, mask = codec.prompts(problems)
    r = generate(model, codec, ids, mask, recipe, sample=False)
    return sum(reward(t, a + b) == 1.0 for t, (a, b) in zip(r.texts, problems, strict=True)) / len(
        problems
    )


# ---- training ----------------------------------------------------------------------------------


def train_logprobs(cmodel, r: Rollout, temperature: float) -> torch.Tensor:
    """[B, G] logprobs of the generated tokens from the training forward (with grad)."""
    g = r.ids.shape[1] - r.prompt_len
    keep = torch.arange(r.prompt_len - 1, r.prompt_len - 1 + g)  # lm_head on these positions only
    inputs = {
        "input_ids": r.ids,
        "attention_mask": r.attention_mask,
        "position_ids": r.position_ids,
    }
    for t in inputs.values():  # batch and length change every step: one graph for all
        torch._dynamo.maybe_mark_dynamic(t, 0)
        torch._dynamo.maybe_mark_dynamic(t, 1)
    torch._dynamo.maybe_mark_dynamic(keep, 0)
    logits = cmodel(**inputs, logits_to_keep=keep).logits.float() / temperature
    return torch.log_softmax(logits, dim=-1).gather(-1, r.ids[:, r.prompt_len :, None])[..., 0]


def group_advantages(rewards: torch.Tensor, samples: int) -> torch.Tensor:
    """GRPO: each completion's reward minus its group's mean, over the group's std."""
    g = rewards.view(-1, samples)
    adv = (g - g.mean(1, keepdim=True)) / (g.std(1, keepdim=True) + 1e-4)
    return adv.flatten()


def clipped_pg_loss(lp, old_lp, adv, mask, clip_eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO/GRPO loss averaged over valid tokens, and the mask of tokens the clip zeroes."""
    ratio = torch.exp(lp - old_lp)
    a = adv[:, None]
    unclipped, clipped = ratio * a, ratio.clamp(1 - clip_eps, 1 + clip_eps) * a
    loss = -(torch.minimum(unclipped, clipped) * mask).sum() / mask.sum()
    return loss, (clipped < unclipped) & mask  # where the clip is what the min takes


class CountingBackend:
    """Wraps a torch.compile backend and counts the graphs it compiles (recompiles show up)."""

    def __init__(self, inner) -> None:
        self.inner, self.graphs = inner, 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return self.inner(gm, example_inputs)


class ErrorCounter(logging.Handler):
    """Counts ERROR records of the qatpass logger (the recompile-limit fallback logs one)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def run_arm(arm: str, recipe: Recipe, quick: bool, seed: int, progress: bool) -> dict:
    """One arm: `steps` rollout + train + sync steps from the reference. Per-step metrics."""
    train_kind, rollout_kind = ARMS[arm]
    model, codec, _ = load(quick)
    config = qatpass.QatConfig.from_options(
        {"group_size": recipe.group_size, "compiler": recipe.compiler}
    )
    eval_problems = make_problems(random.Random(seed + 1), recipe.eval_prompts, recipe.max_operand)
    qmodel = qatpass.convert(model, config=config).eval() if rollout_kind == "int4" else None
    plan = qmodel.qatpass_plan if qmodel is not None else None
    if train_kind == "qat4":
        inner = qatpass.backend(config)
    else:
        from torch._dynamo.backends.registry import lookup_backend

        inner = lookup_backend(recipe.compiler)
    counting = CountingBackend(inner)
    torch._dynamo.reset()
    cmodel = torch.compile(model, backend=counting)
    rollout_model = qmodel if qmodel is not None else model
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, betas=(0.9, 0.99), weight_decay=0)
    errors = ErrorCounter()
    logging.getLogger("qatpass").addHandler(errors)
    rng = random.Random(seed)
    steps: list[dict] = []
    acc_before = greedy_accuracy(rollout_model, codec, eval_problems, recipe)
    try:
        for step in range(recipe.steps):
            n_prompts = recipe.prompts_per_step[step % len(recipe.prompts_per_step)]
            problems = make_problems(rng, n_prompts, recipe.max_operand)
            problems = [p for p in problems for _ in range(recipe.samples)]
            ids, mask = codec.prompts(problems)
            model.eval()
            torch.manual_seed(seed * 100_003 + step)  # the same sampling noise in every arm
            t0 = time.perf_counter()
            r = generate(rollout_model, codec, ids, mask, recipe, sample=True)
            rollout_s = time.perf_counter() - t0
            rewards = torch.tensor(
                [reward(t, a + b) for t, (a, b) in zip(r.texts, problems, strict=True)]
            )
            adv = group_advantages(rewards, recipe.samples)
            model.train()
            t0 = time.perf_counter()
            lp = train_logprobs(cmodel, r, recipe.temperature)
            loss, clipped = clipped_pg_loss(lp, r.logprobs, adv, r.mask, recipe.clip_eps)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            train_s = time.perf_counter() - t0
            refresh_s = 0.0
            if qmodel is not None:
                t1 = time.perf_counter()
                qatpass.refresh(qmodel, model)  # the weight sync
                refresh_s = time.perf_counter() - t1
            with torch.no_grad():
                log_ratio = (lp.detach() - r.logprobs)[r.mask]
            row = {
                "step": step,
                "batch": list(r.ids.shape),
                "tokens": int(r.mask.sum()),
                "mismatch": log_ratio.abs().mean().item(),
                "log_ratio_std": log_ratio.std().item() if log_ratio.numel() > 1 else 0.0,
                "log_ratio_max_abs": log_ratio.abs().max().item(),
                "clip_fraction": (clipped.sum() / r.mask.sum()).item(),
                "reward": rewards.mean().item(),
                "correct": (rewards == 1.0).float().mean().item(),
                "loss": loss.item(),
                "grad_norm": float(grad_norm),
                "rollout_s": rollout_s,
                "train_s": train_s,
                "refresh_s": refresh_s,
                "refresh_share": refresh_s / train_s,
                "sample": r.texts[0],
            }
            steps.append(row)
            if progress:
                print(
                    f"  {arm:9s} step {step:2d} batch {row['batch']} mismatch "
                    f"{row['mismatch']:.3e} reward {row['reward']:.3f} train {train_s:.1f}s "
                    f"refresh {refresh_s:.2f}s rollout {rollout_s:.1f}s  {r.texts[0]!r}",
                    flush=True,
                )
    finally:
        logging.getLogger("qatpass").removeHandler(errors)
    model.eval()
    acc_after = greedy_accuracy(rollout_model, codec, eval_problems, recipe)
    out = {
        "arm": arm,
        "label": LABELS[arm],
        "train": train_kind,
        "rollout": rollout_kind,
        "steps": steps,
        "graphs_compiled": counting.graphs,
        "qatpass_errors": errors.messages,
        "greedy_accuracy_before": acc_before,
        "greedy_accuracy_after": acc_after,
        "int4_weights": len(plan.weights) if plan is not None else 0,
    }
    if train_kind == "qat4" and plan is not None:
        out["plan_matches_backend"] = sorted(inner.plan.quantized_names) == sorted(
            plan.quantized_names
        )
    return out


# ---- summary and plot --------------------------------------------------------------------------


def summarize(arms: dict[str, dict]) -> dict:
    med = {a: statistics.median(s["mismatch"] for s in r["steps"]) for a, r in arms.items()}
    share = [  # step 0's training step includes compilation
        s["refresh_share"] for r in arms.values() if r["rollout"] == "int4" for s in r["steps"][1:]
    ]
    out = {"median_mismatch": med}
    if {"fp32", "fp32_int4", "qat4_int4"} <= med.keys():
        out["qat4_over_floor"] = med["qat4_int4"] / med["fp32"]
        out["rtn_over_qat4"] = med["fp32_int4"] / med["qat4_int4"]
        out["targets"] = {
            "qat4 within 2x of the floor": out["qat4_over_floor"] <= 2.0,
            "qat4 >= 100x below fp32 training + INT4 rollouts": out["rtn_over_qat4"] >= 100.0,
        }
    if share:
        out["refresh_share_median"] = statistics.median(share)
        out["refresh_share_max"] = max(share)
        out.setdefault("targets", {})["refresh <= 5% of a training step"] = (
            out["refresh_share_median"] <= 0.05
        )
        # refresh costs the same at any batch, training grows with the tokens it sees: the
        # forward tokens (batch x length) per step at which refresh would be 5% of the step
        later = [s for r in arms.values() if r["rollout"] == "int4" for s in r["steps"][1:]]
        if later:  # step 0 includes compilation
            refresh_s = statistics.median(s["refresh_s"] for s in later)
            per_token = statistics.median(
                s["train_s"] / (s["batch"][0] * s["batch"][1]) for s in later
            )
            out["refresh_s_median"] = refresh_s
            out["train_s_per_token_median"] = per_token
            out["tokens_per_step_for_5pct_refresh"] = refresh_s / (0.05 * per_token)
    return out


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_m, ax_x, ax_r) = plt.subplots(1, 3, figsize=(16, 4.4))
    for r in results["arms"].values():
        x = [s["step"] for s in r["steps"]]
        for ax, key in ((ax_m, "mismatch"), (ax_x, "log_ratio_max_abs"), (ax_r, "reward")):
            ax.plot(x, [s[key] for s in r["steps"]], marker="o", ms=3, label=r["label"])
    for ax in (ax_m, ax_x, ax_r):
        ax.set_xlabel("RL step")
        ax.xaxis.get_major_locator().set_params(integer=True)
    ax_m.set_yscale("log")
    ax_m.set_ylabel("mean |logprob_train - logprob_rollout| (nats/token, log)")
    ax_m.set_title("train / rollout mismatch")
    ax_x.set_yscale("log")
    ax_x.set_ylabel("max |log importance ratio| over the step's tokens (log)")
    ax_x.set_title("importance ratio spread")
    ax_r.set_ylabel("mean reward of the step's rollouts")
    ax_r.set_ylim(0, 1)
    ax_r.set_title("reward (1 = right answer)")
    ax_m.legend(loc="center left", fontsize=8, framealpha=0.9)  # the empty band between arms
    fig.suptitle(results["model"], fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_arms_in_processes(arms: list[str], args: argparse.Namespace) -> dict[str, dict]:
    """Each arm in its own process (same seeds and recipe), its results read back."""
    procs = []
    for arm in arms:
        out = args.out / arm
        out.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--arms", arm, "--out", str(out),
               "--seed", str(args.seed), "--threads", str(args.threads)]  # fmt: skip
        cmd += ["--quick"] * args.quick + (["--steps", str(args.steps)] if args.steps else [])
        log = (out / "log.txt").open("w")
        procs.append((arm, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log))
    results = {}
    for arm, proc, log in procs:
        rc = proc.wait()
        log.close()
        if rc:
            raise SystemExit(f"arm {arm} failed (exit {rc}); see {args.out / arm / 'log.txt'}")
        results[arm] = json.loads((args.out / arm / "rl_int4.json").read_text())["arms"][arm]
    return results


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny random Llama, 3 steps (tests)")
    p.add_argument("--out", type=Path, default=Path("rl-int4"))
    p.add_argument("--steps", type=int, default=None)
    p.add_argument(
        "--arms", default=",".join(ARMS), help="comma-separated subset of " + ",".join(ARMS)
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (shared machines: 1)")
    p.add_argument("--parallel", action="store_true",
                   help="one process per arm (logs in OUT/ARM/log.txt), merged at the end")  # fmt: skip
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--replot", action="store_true",
                   help="recompute the summary and plot of OUT/rl_int4.json, no training")  # fmt: skip
    args = p.parse_args(argv)
    if args.replot:
        results = json.loads((args.out / "rl_int4.json").read_text())
        return _write(results, args.out, args.quiet)
    torch.set_num_threads(args.threads)
    recipe = Recipe.quick() if args.quick else Recipe()
    if args.steps is not None:
        recipe = replace(recipe, steps=args.steps)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise SystemExit(f"--arms: unknown {unknown}; choose from {list(ARMS)}")
    t0 = time.perf_counter()
    results = {
        "model": reference_note(args.quick),
        "recipe": asdict(recipe),
        "seed": args.seed,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "arms": {},
    }
    if args.parallel and len(arms) > 1:
        results["arms"] = run_arms_in_processes(arms, args)
    else:
        for arm in arms:
            results["arms"][arm] = run_arm(arm, recipe, args.quick, args.seed, not args.quiet)
    results["seconds"] = time.perf_counter() - t0
    return _write(results, args.out, args.quiet)


def _write(results: dict, out: Path, quiet: bool) -> dict:
    results["summary"] = summarize(results["arms"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "rl_int4.json").write_text(json.dumps(results, indent=1))
    plot(results, out / "rl_int4.png")
    if not quiet:
        print(json.dumps(results["summary"], indent=1))
        print(f"wrote {out / 'rl_int4.json'} and {out / 'rl_int4.png'}")
    return results


if __name__ == "__main__":
    main()
