"""Part B: a byte-level Llama trained from scratch on stdlib source; PTQ vs QAT served in INT4.

1. pretrain a small LlamaForCausalLM (vocab 256, bytes) in high precision;
2. from that checkpoint (weights and optimizer state), continue for the same number of steps
   (a) in high precision: the control, and the PTQ model once converted to INT4;
   (b) through `torch.compile(..., backend=qat4)`: fake-quant QAT, then converted to INT4;
3. on held-out files: mean |logprob(training forward) - logprob(INT4 served model)| per byte
   (the training forward of PTQ is the high-precision model, of QAT the fake-quant model), and the
   validation loss of every model.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import qatpass
from qatpass.demo.data import source_bytes
from qatpass.demo.serving import to_int4

__all__ = ["PartBRecipe", "run_part_b"]


@dataclass(frozen=True)
class PartBRecipe:
    hidden: int = 256
    intermediate: int = 640
    layers: int = 4
    heads: int = 8
    seq_len: int = 128
    batch: int = 8
    pretrain_steps: int = 200
    continue_steps: int = 50
    lr: float = 3e-3
    continue_lr: float = 3e-4
    eval_windows: int = 64
    max_files: int | None = None

    @classmethod
    def quick(cls) -> PartBRecipe:
        return cls(
            hidden=64, intermediate=128, layers=2, heads=2, seq_len=64, batch=4,
            pretrain_steps=6, continue_steps=3, eval_windows=4, max_files=40,
        )  # fmt: skip


def _model(r: PartBRecipe) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=256,
        hidden_size=r.hidden,
        intermediate_size=r.intermediate,
        num_hidden_layers=r.layers,
        num_attention_heads=r.heads,
        num_key_value_heads=r.heads,
        max_position_embeddings=r.seq_len,
        tie_word_embeddings=False,
    )
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg)


def _stream(items: list[bytes]) -> torch.Tensor:
    return torch.frombuffer(bytearray(b"\n\n".join(items)), dtype=torch.uint8).long()


def _batches(stream: torch.Tensor, r: PartBRecipe, steps: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, len(stream) - r.seq_len - 1, (r.batch,), generator=g)
        yield torch.stack([stream[s : s + r.seq_len + 1] for s in starts.tolist()])


def _eval_windows(stream: torch.Tensor, r: PartBRecipe) -> torch.Tensor:
    n = len(stream) - r.seq_len - 1
    starts = torch.linspace(0, n - 1, r.eval_windows).long()
    return torch.stack([stream[s : s + r.seq_len + 1] for s in starts.tolist()])


def _loss(model, window: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=window[:, :-1], use_cache=False).logits
    return F.cross_entropy(logits.flatten(0, 1).float(), window[:, 1:].flatten())


def _train(model, opt, batches, steps: int, lr_at, desc: str, progress: bool) -> list[float]:
    losses = []
    model.train()
    bar = tqdm(batches, desc=desc, total=steps, disable=not progress, leave=False,
               dynamic_ncols=True)  # fmt: skip
    for step, window in enumerate(bar):
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        loss = _loss(model, window)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    return losses


@torch.no_grad()
def _token_logprobs(model, windows: torch.Tensor, batch: int) -> torch.Tensor:
    """log p(next byte) for every held-out position, [windows, seq_len] in fp32."""
    model.eval()
    out = []
    for i in range(0, len(windows), batch):
        w = windows[i : i + batch]
        logits = model(input_ids=w[:, :-1], use_cache=False).logits.float()
        out.append(logits.log_softmax(-1).gather(-1, w[:, 1:, None]).squeeze(-1))
    return torch.cat(out)


def _loss_stats(lp: torch.Tensor) -> dict:
    per_window = -lp.mean(-1)
    return {
        "val_loss": float(per_window.mean()),
        "val_loss_sem": float(per_window.std() / math.sqrt(len(per_window))),
    }


def run_part_b(
    recipe: PartBRecipe, *, compiler: str = "inductor", seed: int = 0, progress: bool = True
) -> dict:
    """Train, quantize, serve and measure; returns the part B section of results.json."""
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    split = source_bytes(max_files=recipe.max_files)
    train, held = _stream(split.train), _stream(split.held_out)
    windows = _eval_windows(held, recipe)

    model = _model(recipe)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, betas=(0.9, 0.95), weight_decay=0.1)
    warm = max(1, recipe.pretrain_steps // 10)

    def pre_lr(step: int) -> float:
        if step < warm:
            return recipe.lr * (step + 1) / warm
        frac = (step - warm) / max(1, recipe.pretrain_steps - warm)
        return recipe.continue_lr + (recipe.lr - recipe.continue_lr) * 0.5 * (
            1 + math.cos(math.pi * frac)
        )

    hp_backend = "inductor" if compiler == "inductor" else compiler
    pre = _train(
        torch.compile(model, backend=hp_backend),
        opt,
        _batches(train, recipe, recipe.pretrain_steps, seed),
        recipe.pretrain_steps,
        pre_lr,
        "B pretrain (high precision)",
        progress,
    )

    def fork():
        m = copy.deepcopy(model)
        o = torch.optim.AdamW(
            m.parameters(), lr=recipe.continue_lr, betas=(0.9, 0.95), weight_decay=0.1
        )
        o.load_state_dict(opt.state_dict())
        return m, o

    cont_lr = lambda step: recipe.continue_lr  # noqa: E731
    control, control_opt = fork()
    control_losses = _train(
        torch.compile(control, backend=hp_backend),
        control_opt,
        _batches(train, recipe, recipe.continue_steps, seed + 1),
        recipe.continue_steps,
        cont_lr,
        "B control (high precision)",
        progress,
    )
    student, student_opt = fork()
    qat_backend = qatpass.backend(compiler=compiler)
    qat_model = torch.compile(student, backend=qat_backend)
    qat_losses = _train(
        qat_model,
        student_opt,
        _batches(train, recipe, recipe.continue_steps, seed + 1),
        recipe.continue_steps,
        cont_lr,
        "B QAT (qat4)",
        progress,
    )

    bs = recipe.batch
    lp_control = _token_logprobs(control, windows, bs)
    lp_ptq = _token_logprobs(to_int4(control), windows, bs)
    lp_qat_train = _token_logprobs(qat_model, windows, bs)
    lp_qat_served = _token_logprobs(to_int4(student), windows, bs)
    ptq_gap = float((lp_control - lp_ptq).abs().mean())
    qat_gap = float((lp_qat_train - lp_qat_served).abs().mean())
    paired = -(lp_qat_served - lp_control).mean(-1)  # per-window loss difference QAT - control
    return {
        "recipe": asdict(recipe),
        "params": n_params,
        "quantized_weights": len(qat_backend.quantized_names),
        "train_bytes": int(len(train)),
        "held_out_bytes_scored": int(windows[:, 1:].numel()),
        "pretrain_final_loss": pre[-1],
        "models": {
            "hp_control": _loss_stats(lp_control),
            "ptq_int4": {**_loss_stats(lp_ptq), "mean_abs_logprob_gap": ptq_gap},
            "qat_fake_quant": _loss_stats(lp_qat_train),
            "qat_int4": {**_loss_stats(lp_qat_served), "mean_abs_logprob_gap": qat_gap},
        },
        "gap_ratio_ptq_over_qat": ptq_gap / qat_gap if qat_gap > 0 else None,
        "qat_minus_control_val_loss": float(paired.mean()),
        "qat_minus_control_sem": float(paired.std() / math.sqrt(len(paired))),
        "curves": {"pretrain": pre, "control": control_losses, "qat": qat_losses},
        "seconds": time.perf_counter() - t0,
    }
