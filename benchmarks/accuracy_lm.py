"""INT4 accuracy on a real pretrained causal LM: RTN vs GPTQ vs QAT, served by qatpass. JSON + PNG.

    nice python benchmarks/accuracy_lm.py results/accuracy_lm --autocast      # SmolLM2
        # defaults: 24 QAT steps of 1 x 512 tokens, lr 1e-4, 4096 held-out tokens, GPTQ on
        # 32 x 512 calibration tokens; 1 thread (~20 CPU minutes; the wall time is what the
        # shared machine gives)
    python benchmarks/accuracy_lm.py /tmp/acc --quick                         # tiny random Llama

Reference: SmolLM2-135M-Instruct from `qatpass.demo.pretrained` (its fp32 weights went through
Q4_1: see REFERENCE_NOTE). Text: whole stdlib docstrings split by file (`qatpass.demo.data`),
concatenated with EOS and cut into chunks; the held-out budget is `--eval-tokens`. Per scheme
(`--schemes`, default int4-g32,int4-g64), every arm is served by qatpass's INT4 path (W4A16 modules,
the CPU kernel), lm_head and embeddings in high precision (qatpass's defaults):
- rtn:  qatpass.convert(reference)
- gptq: llmcompressor oneshot W4A16 GPTQ in its own venv (`gptq_llmcompressor.py`, a subprocess),
        calibrated on training-split chunks, saved as compressed-tensors, read back by
        `qatpass.export.load_compressed_tensors`; its dequantized weights are checked bit for bit
        against llmcompressor's own
- qat:  torch.compile(student, backend="qat4") distilled from the reference (KL on the logits) on
        training-split chunks, then qatpass.convert(plan=backend.plan); saved as compressed-tensors
        and loaded back (checked equal)
Metrics on held-out tokens: mean per-token KL(reference || model), perplexity, greedy next-token
agreement with the reference, CPU minutes (building the arm; evaluating it), and for QAT the
train/serve gap |logprob(qat4 training forward) - logprob(served INT4)|.

Schemes: "int4-g<G>" is Int4Scheme(group_size=G, symmetric, qrange (-8, 7), bf16 scales), the
scheme llmcompressor's W4A16 writes (codes in [-8, 7], scale = amax / 7.5), so all arms share it;
a JSON object is an Int4Scheme dict; any other name (e.g. "nvfp4", "mxfp4") is passed through as
options={"scheme": name} and qatpass.convert(scheme=name) (`scheme_spec`, the hook for FP4), and
its GPTQ arm is skipped with the reason logged.
"""

from __future__ import annotations

import argparse
import copy
import gc
import hashlib
import json
import logging
import math
import os
import platform
import random
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger("accuracy_lm")
DEFAULT_GPTQ_PYTHON = "/work/venv-gptq/bin/python"
HERE = Path(__file__).resolve().parent


# ----------------------------------------------------------------------------- schemes


@dataclass(frozen=True)
class SchemeSpec:
    """One scheme of the study: its name, the qat4 options and convert() argument it maps to."""

    name: str
    options: dict[str, Any]  # torch.compile(..., backend="qat4", options=...)
    convert_scheme: Any  # qatpass.convert(scheme=...)
    group_size: int | None  # for the GPTQ arm; None: no INT4 GPTQ for this scheme


def scheme_spec(spec: str | dict) -> SchemeSpec:
    """Scheme from "int4-g32" | an Int4Scheme dict (or its JSON) | another scheme name passed through."""
    from qatpass.scheme import Int4Scheme

    if isinstance(spec, str) and spec.strip().startswith("{"):
        spec = json.loads(spec)
    if isinstance(spec, dict):
        s = Int4Scheme.from_dict(spec)
        name = f"int4-g{s.group_size}" + ("" if s.qrange == (-8, 7) else f"-q{s.qrange[1]}")
        return SchemeSpec(name, {"scheme": s}, s, s.group_size if s.symmetric else None)
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"--schemes: expected a scheme name or dict, got {spec!r}")
    if spec.startswith("int4-g") and spec[6:].isdigit():
        s = Int4Scheme(
            group_size=int(spec[6:]), symmetric=True, qrange=(-8, 7), scale_dtype=torch.bfloat16
        )
        return SchemeSpec(spec, {"scheme": s}, s, s.group_size)
    # FP4 and future schemes: qatpass resolves the name (options={"scheme": name})
    return SchemeSpec(spec, {"scheme": spec}, spec, None)


# ----------------------------------------------------------------------------- setup


@dataclass
class Setup:
    """The reference model and tokenized text of one run (full: SmolLM2; quick: tiny Llama)."""

    reference: nn.Module
    model_dir: Path  # HF folder of the reference (what the GPTQ subprocess loads)
    train: torch.Tensor  # [n_train, chunk] token ids
    held_out: torch.Tensor  # [n_eval, chunk]
    note: str
    meta: dict = field(default_factory=dict)


def _chunks(docs: list[list[int]], eos: int, chunk: int, limit: int | None) -> torch.Tensor:
    stream: list[int] = []
    for d in docs:
        stream += d + [eos]
        if limit is not None and len(stream) >= limit * chunk:
            break
    n = len(stream) // chunk if limit is None else min(limit, len(stream) // chunk)
    if n == 0:
        raise ValueError(f"not enough text for one chunk of {chunk} tokens")
    return torch.tensor(stream[: n * chunk]).view(n, chunk)


def _split_chunks(split, encode, eos: int, chunk: int, n_train: int, n_eval: int):
    train_docs = list(split.train)
    random.Random(0).shuffle(train_docs)  # mix files; the split itself stays by file
    train = _chunks([encode(d) for d in train_docs], eos, chunk, n_train)
    held = _chunks([encode(d) for d in split.held_out], eos, chunk, n_eval)
    return train, held


def quick_setup(out: Path, chunk: int, n_train: int, n_eval: int) -> Setup:
    """A tiny random tied Llama over UTF-8 bytes; saved as an HF folder for the GPTQ subprocess."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from qatpass.demo.data import docstring_texts

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=257,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=max(chunk, 64),
        tie_word_embeddings=True,
        bos_token_id=256,
        eos_token_id=256,
        pad_token_id=256,
    )
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # larger weights than the init: quantization error that shows
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.mul_(8.0)
    model_dir = out / "tiny_reference"
    model.save_pretrained(model_dir)
    split = docstring_texts(max_files=60)
    train, held = _split_chunks(split, lambda d: list(d.encode()), 256, chunk, n_train, n_eval)
    note = "reference = a tiny random Llama (quick mode: numbers say nothing about real models)"
    return Setup(model, model_dir, train, held, note, {"model": "tiny random Llama"})


def smollm2_setup(chunk: int, n_train: int, n_eval: int) -> Setup:
    from qatpass.demo.data import docstring_texts
    from qatpass.demo.pretrained import REFERENCE_NOTE, cache_root, load_smollm2

    model, tok = load_smollm2()
    split = docstring_texts()
    # tokenizing every docstring costs a minute on a loaded machine: cache the ids by text hash
    digest = hashlib.sha256("\0".join([*split.train, "\1", *split.held_out]).encode()).hexdigest()
    cache = cache_root() / f"smollm2-docstring-ids-{digest[:16]}.json"
    ids = json.loads(cache.read_text()) if cache.is_file() else {}
    if not ids:
        docs = [*split.train, *split.held_out]
        ids = dict(zip(docs, tok(docs, add_special_tokens=False)["input_ids"], strict=True))
        cache.write_text(json.dumps(ids))

    def encode(d: str) -> list[int]:
        return ids[d]

    train, held = _split_chunks(split, encode, tok.eos_token_id, chunk, n_train, n_eval)
    meta = {
        "model": "SmolLM2-135M-Instruct",
        "train_docs": len(split.train),
        "held_out_docs": len(split.held_out),
        "train_files": split.train_files,
        "held_out_files": split.held_out_files,
    }
    return Setup(
        model, cache_root() / "smollm2-135m-instruct-fp32", train, held, REFERENCE_NOTE, meta
    )


# ----------------------------------------------------------------------------- arms


def cpu_min(t0: float) -> float:
    return (time.process_time() - t0) / 60


def rtn_arm(reference: nn.Module, spec: SchemeSpec) -> tuple[nn.Module, dict]:
    import qatpass

    t0 = time.process_time()
    served = qatpass.convert(reference, scheme=spec.convert_scheme)
    return served, {"build_cpu_min": cpu_min(t0)}


def gptq_arm(
    setup: Setup, spec: SchemeSpec, out: Path, python: str, calib: int, threads: int
) -> tuple[nn.Module | None, dict]:
    """llmcompressor GPTQ in its venv, then qatpass loads the checkpoint. None + reason if not."""
    if spec.group_size is None:
        return None, {"skipped": f"scheme {spec.name}: the GPTQ arm runs INT4 schemes only"}
    if not Path(python).is_file():
        return None, {"skipped": f"no llmcompressor venv: {python} does not exist"}
    import qatpass
    from qatpass.export.compressed_tensors import read_checkpoint
    from qatpass.scheme import dequantize

    ckpt = out / f"gptq_{spec.name}"
    lock = out / f"gptq_{spec.name}.lock"  # a GPTQ run started by hand into this folder
    while lock.exists():
        time.sleep(10)
    calib_bytes = json.dumps(setup.train[:calib].tolist()).encode()
    digest = hashlib.sha256(calib_bytes).hexdigest()
    run_file = ckpt / "gptq_run.json"
    theirs_file = Path(str(ckpt) + ".dequant.safetensors")  # llmcompressor's own q * scale
    reused = (
        run_file.is_file()
        and theirs_file.is_file()
        and json.loads(run_file.read_text()).get("calibration_sha256") == digest
        and json.loads(run_file.read_text()).get("group_size") == spec.group_size
    )
    if not reused:  # same calibration and group size: the checkpoint of an earlier run is reused
        calib_file = out / "gptq_calibration.json"
        calib_file.write_bytes(calib_bytes)
        cmd = [python, str(HERE / "gptq_llmcompressor.py"), "--model", str(setup.model_dir)]
        cmd += ["--calib", str(calib_file), "--group-size", str(spec.group_size)]
        cmd += ["--out", str(ckpt), "--threads", str(threads)]
        if ckpt.exists():
            shutil.rmtree(ckpt)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout)[-2000:]
            return None, {"skipped": f"llmcompressor failed (rc {proc.returncode}): {tail}"}
    run = json.loads((ckpt / "gptq_run.json").read_text())
    t0 = time.process_time()
    try:
        served = qatpass.export.load_compressed_tensors(ckpt, model=setup.reference)
    except (ValueError, FileNotFoundError) as e:
        return None, {"skipped": f"qatpass refused the llmcompressor checkpoint: {e}", "run": run}
    _, scheme, packed, _ = read_checkpoint(ckpt)
    from safetensors.torch import load_file

    theirs = load_file(str(theirs_file))
    mismatched = [
        n
        for n, p in packed.items()
        if not torch.equal(dequantize(p, torch.float32), theirs[f"{n}.weight"])
    ]
    bf16_scales = all(
        torch.equal(p.scales, p.scales.bfloat16().to(p.scales.dtype)) for p in packed.values()
    )
    info = {
        "checkpoint": str(ckpt),
        "run": run,
        "reused_checkpoint": reused,
        "build_cpu_min": run["cpu_s"] / 60 + cpu_min(t0),
        "loaded_scheme": scheme.to_dict(),
        "modules": len(packed),
        "dequant_equal_llmcompressor": not mismatched,
        "dequant_mismatched": mismatched[:5],
        "scales_exact_in_bf16": bf16_scales,
    }
    return served, info


def kl_loss(
    student_logits: torch.Tensor, teacher_logp: torch.Tensor, kind: str, ids
) -> torch.Tensor:
    """Distillation loss per token: "kl" = KL(teacher || student); "kl+ce" adds 0.1 * next-token CE."""
    s = F.log_softmax(student_logits.float(), dim=-1)
    kl = (teacher_logp.exp() * (teacher_logp - s)).sum(-1).mean()
    if kind == "kl":
        return kl
    if kind == "kl+ce":
        ce = F.nll_loss(s[:, :-1].reshape(-1, s.shape[-1]), ids[:, 1:].reshape(-1))
        return kl + 0.1 * ce
    raise ValueError(f"--qat-loss must be 'kl' or 'kl+ce', got {kind!r}")


@dataclass
class QatRecipe:
    lr: float
    steps: int
    batch: int  # chunks per step
    loss: str = "kl"
    warmup: int = 3
    autocast: bool = False  # bf16 autocast in the student forward

    def lr_at(self, step: int) -> float:
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        t = (step - self.warmup) / max(1, self.steps - self.warmup)
        return self.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


class Student:
    """A copy of the reference under torch.compile(backend=qat4), embeddings frozen, AdamW."""

    def __init__(self, reference: nn.Module, spec: SchemeSpec, recipe: QatRecipe, compiler: str):
        import qatpass

        self.model = copy.deepcopy(reference).train()
        for name, p in self.model.named_parameters():
            p.requires_grad_("embed" not in name and "lm_head" not in name)
        self.backend = qatpass.backend(**spec.options, compiler=compiler)
        self.compiled = torch.compile(self.model, backend=self.backend)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=recipe.lr, betas=(0.9, 0.95), weight_decay=0.0)
        self.recipe = recipe
        self.losses: list[float] = []
        self.cpu_s = 0.0

    def step(self, i: int, ids: torch.Tensor, teacher_logp: torch.Tensor) -> float:
        t0 = time.process_time()
        for g in self.opt.param_groups:
            g["lr"] = self.recipe.lr_at(i)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.recipe.autocast):
            logits = self.compiled(input_ids=ids).logits
        loss = kl_loss(logits, teacher_logp, self.recipe.loss, ids)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.cpu_s += time.process_time() - t0
        self.losses.append(float(loss))
        return self.losses[-1]

    def train_logp(self, ids: torch.Tensor) -> torch.Tensor:
        """log-probs of the qat4 training forward (fake quant), exactly as trained: the same
        compiled graph (grad mode on, so no new trace), output detached, no backward."""
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.recipe.autocast):
            logits = self.compiled(input_ids=ids).logits
        return F.log_softmax(logits.detach().float(), dim=-1)

    def serve(self) -> nn.Module:
        import qatpass

        # a copy, in eval mode; the student stays in train mode (its graph's guards)
        return qatpass.convert(self.model, plan=self.backend.plan).eval()


class Teacher:
    """Reference log-probs of training batches; cached in fp16 when `cache` (batches reused)."""

    def __init__(self, reference: nn.Module, cache: bool):
        self.reference = reference
        self.cache: dict[int, torch.Tensor] | None = {} if cache else None
        self.cpu_s = 0.0

    @torch.no_grad()
    def __call__(self, key: int, ids: torch.Tensor) -> torch.Tensor:
        if self.cache is not None and key in self.cache:
            return self.cache[key].float()
        t0 = time.process_time()
        logp = F.log_softmax(self.reference(input_ids=ids).logits.float(), dim=-1)
        self.cpu_s += time.process_time() - t0
        if self.cache is not None:
            self.cache[key] = logp.half()
        return logp


def batches(train: torch.Tensor, steps: int, batch: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    order = torch.cat(
        [torch.randperm(len(train), generator=g) for _ in range(-(-steps * batch // len(train)))]
    )
    return [train[order[i * batch : (i + 1) * batch]] for i in range(steps)]


def train_students(
    students: dict[str, Student], teacher: Teacher, data: list[torch.Tensor], progress: bool
) -> None:
    """All students in lockstep over the same batches: one teacher forward per batch."""
    t0 = time.perf_counter()
    for i, ids in enumerate(data):
        logp = teacher(i, ids)
        losses = {name: s.step(i, ids, logp) for name, s in students.items()}
        if progress and (i % 5 == 0 or i == len(data) - 1):
            msg = " ".join(f"{k}={v:.4f}" for k, v in losses.items())
            log.info("qat step %d/%d %s (%.0f s)", i + 1, len(data), msg, time.perf_counter() - t0)


# ----------------------------------------------------------------------------- evaluation


@dataclass
class Meter:
    kl: float = 0.0
    nll: float = 0.0
    agree: int = 0
    tokens: int = 0
    nll_tokens: int = 0
    cpu_s: float = 0.0

    def add(self, logp: torch.Tensor, ref_logp: torch.Tensor, ids: torch.Tensor) -> None:
        self.kl += float((ref_logp.exp() * (ref_logp - logp)).sum())
        self.nll -= float(logp[:, :-1].gather(-1, ids[:, 1:, None]).sum())
        self.agree += int((logp.argmax(-1) == ref_logp.argmax(-1)).sum())
        self.tokens += ids.numel()
        self.nll_tokens += ids[:, 1:].numel()

    def result(self) -> dict:
        return {
            "kl": self.kl / self.tokens,
            "ppl": math.exp(self.nll / self.nll_tokens),
            "greedy_agreement": self.agree / self.tokens,
            "tokens": self.tokens,
            "eval_cpu_min": self.cpu_s / 60,
        }


@torch.no_grad()
def evaluate(
    reference: nn.Module, served: dict[str, nn.Module], held_out: torch.Tensor, progress: bool
) -> dict:
    """One pass over held-out chunks: every model sees each chunk right after the reference."""
    meters = {name: Meter() for name in ["reference", *served]}
    t0 = time.perf_counter()
    for c in range(len(held_out)):
        ids = held_out[c : c + 1]
        t = time.process_time()
        ref_logp = F.log_softmax(reference(input_ids=ids).logits.float(), dim=-1)
        meters["reference"].cpu_s += time.process_time() - t
        meters["reference"].add(ref_logp, ref_logp, ids)
        for name, model in served.items():
            t = time.process_time()
            logp = F.log_softmax(model(input_ids=ids).logits.float(), dim=-1)
            meters[name].cpu_s += time.process_time() - t
            meters[name].add(logp, ref_logp, ids)
        if progress and (c % 4 == 0 or c == len(held_out) - 1):
            log.info("eval chunk %d/%d (%.0f s)", c + 1, len(held_out), time.perf_counter() - t0)
    return {k: m.result() for k, m in meters.items()}


def train_serve_gap(student: Student, served: nn.Module, chunks: torch.Tensor) -> dict:
    """|logprob of the next token, qat4 training forward - served INT4 model| per token."""
    total, worst, n = 0.0, 0.0, 0
    for c in range(len(chunks)):
        ids = chunks[c : c + 1]
        tgt = ids[:, 1:, None]
        train = student.train_logp(ids)[:, :-1].gather(-1, tgt)
        with torch.no_grad():
            serve = F.log_softmax(served(input_ids=ids).logits.float(), -1)[:, :-1].gather(-1, tgt)
        d = (train - serve).abs()
        total, worst, n = total + float(d.sum()), max(worst, float(d.max())), n + d.numel()
    return {"mean_abs": total / n, "max_abs": worst, "tokens": n}


# ----------------------------------------------------------------------------- sweep


def sweep(
    setup: Setup,
    spec: SchemeSpec,
    configs: list[QatRecipe],
    eval_chunks: int,
    compiler: str,
    progress: bool,
) -> list[dict]:
    """Each recipe on the same short budget and batches; scored by KL on held-out chunks through
    the qat4 training forward (equal to the served model up to the train/serve gap)."""
    teacher = Teacher(setup.reference, cache=True)
    data = batches(setup.train, configs[0].steps, configs[0].batch, seed=1)
    held = setup.held_out[-eval_chunks:]  # the end of the held-out chunks, a sample of them
    with torch.no_grad():
        ref = [
            F.log_softmax(setup.reference(input_ids=held[i : i + 1]).logits.float(), -1)
            for i in range(len(held))
        ]
    rows = []
    for r in configs:
        torch._dynamo.reset()
        s = Student(setup.reference, spec, r, compiler)
        t0 = time.process_time()
        train_students({spec.name: s}, teacher, data, progress)
        kl = sum(
            float((ref[i].exp() * (ref[i] - s.train_logp(held[i : i + 1]))).sum())
            for i in range(len(held))
        )
        row = {
            "lr": r.lr,
            "loss": r.loss,
            "steps": r.steps,
            "autocast": r.autocast,
            "held_out_kl": kl / held.numel(),
            "last_losses": s.losses[-3:],
            "cpu_min": cpu_min(t0),
        }
        rows.append(row)
        if progress:
            log.info("sweep %s", row)
        del s
    return rows


# ----------------------------------------------------------------------------- output


def plot(result: dict, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    schemes = list(result["schemes"])
    arms = ["rtn", "gptq", "qat"]
    colors = {"rtn": "tab:red", "gptq": "tab:orange", "qat": "tab:green"}
    labels = {
        "rtn": "RTN (qatpass.convert)",
        "gptq": "GPTQ (llmcompressor)",
        "qat": "QAT (qat4 + KD)",
    }
    fig, ax = plt.subplots(figsize=(7, 4.2))
    width = 0.8 / len(arms)
    top = 0.0
    for j, arm in enumerate(arms):
        xs, ys = [], []
        for i, s in enumerate(schemes):
            row = result["schemes"][s]["arms"].get(arm, {})
            if "kl" in row:
                xs.append(i + (j - (len(arms) - 1) / 2) * width)
                ys.append(row["kl"])
        if xs:
            bars = ax.bar(xs, ys, width, color=colors[arm], label=labels[arm])
            ax.bar_label(bars, fmt="%.3f", fontsize=8)
            top = max(top, *ys)
    ax.set_xticks(range(len(schemes)), schemes)
    ax.set_ylim(0, top * 1.35 if top > 0 else 1)  # headroom: the legend sits above the bars
    ax.set_ylabel("KL(reference || model), nats/token")
    ax.set_title(
        f"{result['setup']['model']}: held-out KL, served INT4 ({result['eval_tokens']} tokens)",
        fontsize=10,
    )
    ax.legend(loc="upper center", ncol=3, fontsize=8, frameon=False)
    fig.text(0.01, 0.01, result["reference_note"], fontsize=6)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    path = out / "accuracy_lm.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def table(result: dict) -> str:
    """The study as a markdown table (one row per scheme and arm)."""
    ref = result["reference"]
    lines = [
        f"Held-out: {result['eval_tokens']} tokens; {result['reference_note']}; "
        f"reference perplexity {ref['ppl']:.2f}.",
        "",
        "| scheme | arm | KL(ref ‖ model) nats/token | perplexity | greedy agreement "
        "| build CPU min | eval CPU min | train/serve gap |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, s in result["schemes"].items():
        for arm, a in s["arms"].items():
            if arm == "targets":
                continue
            if "kl" not in a:
                lines.append(f"| {name} | {arm} | skipped: {a.get('skipped', '?')[:80]} |||||")
                continue
            gap = a.get("train_serve_gap", {}).get("mean_abs")
            lines.append(
                f"| {name} | {arm} | {a['kl']:.4f} | {a['ppl']:.2f} | {a['greedy_agreement']:.1%} "
                f"| {a.get('build_cpu_min', 0):.1f} | {a['eval_cpu_min']:.1f} "
                f"| {'' if gap is None else f'{gap:.2e}'} |"
            )
    return "\n".join(lines)


def check_roundtrip(served: nn.Module, ckpt: Path, ids: torch.Tensor, reference: nn.Module) -> dict:
    """Save `served` as compressed-tensors, load it back, compare packed tensors and logits."""
    import qatpass
    from qatpass.export.compressed_tensors import packed_state_dict

    qatpass.export.save_compressed_tensors(served, ckpt, overwrite=True)
    loaded = qatpass.export.load_compressed_tensors(ckpt, model=reference)
    a, b = packed_state_dict(served), packed_state_dict(loaded)
    with torch.no_grad():
        same_logits = torch.equal(served(input_ids=ids).logits, loaded(input_ids=ids).logits)
    return {
        "checkpoint": str(ckpt),
        "tensors_equal": a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a),
        "logits_equal": same_logits,
    }


# ----------------------------------------------------------------------------- main


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("results", type=Path, help="directory for accuracy_lm.json/.png and checkpoints")
    p.add_argument("--quick", action="store_true", help="tiny random Llama, seconds (the test)")
    p.add_argument("--schemes", default="int4-g32,int4-g64", help="comma list, or a JSON list")
    p.add_argument("--chunk", type=int, default=None, help="tokens per chunk (512; quick 64)")
    p.add_argument(
        "--eval-tokens", type=int, default=None, help="held-out tokens (4096; quick 512)"
    )
    p.add_argument("--gap-tokens", type=int, default=None, help="tokens for the train/serve gap")
    p.add_argument("--qat-steps", type=int, default=None)
    p.add_argument("--qat-batch", type=int, default=None, help="chunks per QAT step")
    p.add_argument("--qat-lr", type=float, default=None)
    p.add_argument("--qat-loss", default="kl", choices=["kl", "kl+ce"])
    p.add_argument("--autocast", action="store_true", help="bf16 autocast in the QAT student")
    p.add_argument(
        "--compiler",
        default=None,
        help="qat4 compiler (aot_eager: Inductor's C++ build of the 30-layer graph took "
        "> 15 min on the loaded machine; quick: eager)",
    )
    p.add_argument("--calib", type=int, default=None, help="GPTQ calibration chunks (32; quick 4)")
    p.add_argument(
        "--gptq-python", default=DEFAULT_GPTQ_PYTHON, help="python of the llmcompressor venv"
    )
    p.add_argument(
        "--sweep", default="", help="recipes to try first, e.g. '1e-5:kl,3e-5:kl,3e-5:kl+ce'"
    )
    p.add_argument("--sweep-steps", type=int, default=None)
    p.add_argument("--sweep-only", action="store_true", help="write sweep.json and stop")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--table", action="store_true", help="print RESULTS/accuracy_lm.json as a table")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = _parser().parse_args(argv)
    if args.table:
        result = json.loads((args.results / "accuracy_lm.json").read_text())
        print(table(result))
        return result
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO, format="%(asctime)s %(message)s"
    )
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    q = args.quick
    chunk = args.chunk or (64 if q else 512)
    eval_tokens = args.eval_tokens or (512 if q else 4096)
    gap_tokens = args.gap_tokens or (256 if q else 1024)
    steps = args.qat_steps or (4 if q else 24)
    batch = args.qat_batch or 1
    lr = args.qat_lr or (1e-3 if q else 1e-4)
    compiler = args.compiler or ("eager" if q else "aot_eager")
    calib = args.calib or (4 if q else 32)
    n_eval = max(1, eval_tokens // chunk)
    out = args.results
    out.mkdir(parents=True, exist_ok=True)
    wall0, cpu0 = time.perf_counter(), time.process_time()

    specs_arg = (
        json.loads(args.schemes)
        if args.schemes.strip().startswith("[")
        else args.schemes.split(",")
    )
    specs = [scheme_spec(s) for s in specs_arg]
    n_train = max(steps * batch, calib, 64)
    setup = quick_setup(out, chunk, n_train, n_eval) if q else smollm2_setup(chunk, n_train, n_eval)
    log.info(
        "train chunks %s, held-out chunks %s; %s",
        tuple(setup.train.shape),
        tuple(setup.held_out.shape),
        setup.note,
    )
    recipe = QatRecipe(lr=lr, steps=steps, batch=batch, loss=args.qat_loss, autocast=args.autocast)

    sweep_rows: list[dict] = []
    if args.sweep:
        configs = []
        for item in args.sweep.split(","):
            lr_s, _, loss_s = item.partition(":")
            configs.append(
                QatRecipe(
                    float(lr_s),
                    args.sweep_steps or (2 if q else 10),
                    batch,
                    loss_s or "kl",
                    autocast=args.autocast,
                )
            )
        sweep_rows = sweep(setup, specs[0], configs, 2 if q else 4, compiler, not args.quiet)
        if args.sweep_only:
            doc = {
                "scheme": specs[0].name,
                "batch": batch,
                "chunk": chunk,
                "rows": sweep_rows,
                "argv": sys.argv if argv is None else ["accuracy_lm.py", *argv],
                "reference_note": setup.note,
                "wall_min": (time.perf_counter() - wall0) / 60,
            }
            (out / "sweep.json").write_text(json.dumps(doc, indent=2))
            return doc

    arms: dict[str, dict[str, dict]] = {s.name: {} for s in specs}
    served: dict[str, nn.Module] = {}
    for s in specs:
        model, info = rtn_arm(setup.reference, s)
        served[f"{s.name}/rtn"], arms[s.name]["rtn"] = model, info
    # GPTQ runs in its own processes (its venv) while QAT trains here; one student at a time
    gap_chunks = setup.held_out[: max(1, gap_tokens // chunk)]
    with ThreadPoolExecutor(1) as pool:
        gptq = pool.submit(
            lambda: [gptq_arm(setup, s, out, args.gptq_python, calib, args.threads) for s in specs]
        )
        data = batches(setup.train, steps, batch, args.seed)
        for s in specs:
            torch._dynamo.reset()
            st = Student(setup.reference, s, recipe, compiler)
            teacher = Teacher(setup.reference, cache=False)
            train_students({s.name: st}, teacher, data, not args.quiet)
            t0 = time.process_time()
            served[f"{s.name}/qat"] = st.serve()
            st.opt = None  # AdamW state is not needed past training
            arms[s.name]["qat"] = {
                "build_cpu_min": (st.cpu_s + teacher.cpu_s) / 60 + cpu_min(t0),
                "loss_first": st.losses[0],
                "loss_last": st.losses[-1],
                "losses": st.losses,
                "train_serve_gap": train_serve_gap(st, served[f"{s.name}/qat"], gap_chunks),
            }
            log.info("%s qat: %s", s.name, arms[s.name]["qat"]["train_serve_gap"])
            del st, teacher
            gc.collect()
        for s, (model, info) in zip(specs, gptq.result(), strict=True):
            arms[s.name]["gptq"] = info
            if model is None:
                log.warning("GPTQ arm skipped for %s: %s", s.name, info["skipped"][:300])
            else:
                served[f"{s.name}/gptq"] = model
    metrics = evaluate(setup.reference, served, setup.held_out, not args.quiet)
    for key, m in metrics.items():
        if key != "reference":
            name, arm = key.split("/")
            arms[name][arm].update(m)
    for s in specs:
        a = arms[s.name]
        a["qat"]["roundtrip"] = check_roundtrip(
            served[f"{s.name}/qat"], out / f"qat_{s.name}", setup.held_out[:1], setup.reference
        )
        rtn_kl, qat_kl = a["rtn"]["kl"], a["qat"]["kl"]
        targets = {"qat_kl_vs_rtn_reduction": 1 - qat_kl / rtn_kl if rtn_kl > 0 else None}
        if "kl" in a["gptq"]:
            targets["qat_below_gptq"] = qat_kl < a["gptq"]["kl"]
        targets["qat_70pct_below_rtn"] = (
            targets["qat_kl_vs_rtn_reduction"] is not None
            and targets["qat_kl_vs_rtn_reduction"] >= 0.7
        )
        a["targets"] = targets

    result = {
        "benchmark": "accuracy_lm",
        "quick": q,
        "reference_note": setup.note,
        "setup": setup.meta,
        "chunk": chunk,
        "eval_tokens": int(setup.held_out.numel()),
        "train_chunks_available": len(setup.train),
        "reference": metrics["reference"],
        "qat_recipe": {
            **vars(recipe),
            "compiler": compiler,
            "optimizer": "AdamW(0.9, 0.95), wd 0, clip 1.0",
            "schedule": "linear warmup, cosine to 0.1 lr",
            "trained": "all but embeddings (tied lm_head)",
            "train_tokens": steps * batch * chunk,
        },
        "sweep": sweep_rows,
        "schemes": {
            s.name: {"spec": str(s.options["scheme"]), "arms": arms[s.name]} for s in specs
        },
        "threads": args.threads,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "argv": sys.argv if argv is None else ["accuracy_lm.py", *argv],
        "total_cpu_min": cpu_min(cpu0)
        + sum(a["gptq"].get("run", {}).get("cpu_s", 0) / 60 for a in arms.values()),
        "wall_min": (time.perf_counter() - wall0) / 60,
    }
    (out / "accuracy_lm.json").write_text(json.dumps(result, indent=2, default=str))
    result["png"] = str(plot(result, out))
    (out / "accuracy_lm.json").write_text(json.dumps(result, indent=2, default=str))
    (out / "accuracy_lm.md").write_text(table(result) + "\n")
    for s in specs:
        row = " ".join(
            f"{arm}: kl {a['kl']:.4f} ppl {a['ppl']:.2f} agree {a['greedy_agreement']:.3f}"
            for arm, a in arms[s.name].items()
            if isinstance(a, dict) and "kl" in a
        )
        log.info("%s %s", s.name, row)
    return result


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
