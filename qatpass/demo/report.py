"""The demo's printed table (one, both parts) and results.json."""

from __future__ import annotations

import json
import math
from pathlib import Path

__all__ = ["format_table", "write_results"]


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _part_a_rows(a: dict) -> list[str]:
    r = a["recipe"]
    head = (f"Part A  {a['model']} ({a['params'] / 1e6:.1f}M params, "
            f"{a['quantized_weights']} INT4 weights), {a['sentences']['held_out']} held-out "
            "sentences")  # fmt: skip
    cols = ("cosine vs fp32", "Spearman vs fp32", "top-1 agreement*")
    rows = [head, f"  {'model':<40} {cols[0]:>15} {cols[1]:>17} {cols[2]:>17}"]

    def row(label: str, d: dict) -> str:
        return (f"  {label:<40} {d['cosine']:>15.4f} {d['spearman']:>17.4f} "
                f"{_pct(d['agreement']):>17}")  # fmt: skip

    rows.append(row("fp32 (reference)", a["fp32"]))
    rows.append(row("PTQ INT4", a["ptq_int4"]))
    rows.append(row(f"QAT INT4 ({r['steps']} steps, distillation)", a["qat_int4"]))
    rec = a["recovered"]
    rows.append(f"  {'QAT recovered of what PTQ lost':<40} {_pct(rec['cosine']):>15} "
                f"{_pct(rec['spearman']):>17} {_pct(rec['agreement']):>17}")  # fmt: skip
    rows.append(f"  * information only: {_pct(a['near_tie_share'])} of held-out sentences have "
                f"a top-1/top-2 gap < {a['near_tie_gap']} in fp32 (near ties flip under tiny "
                "errors)")  # fmt: skip
    rows.append("  Spearman: each sentence's similarities to all others, ranked, INT4 vs fp32")
    return rows


def _part_b_rows(b: dict) -> list[str]:
    m = b["models"]
    r = b["recipe"]
    head = (f"Part B  byte-level Llama ({b['params'] / 1e6:.1f}M params, "
            f"{b['quantized_weights']} INT4 weights), {b['held_out_bytes_scored']} held-out bytes; "
            f"pretrain {r['pretrain_steps']} + {r['continue_steps']} steps")  # fmt: skip
    rows = [head, f"  {'model':<40} {'val loss':>15} {'|dlogprob| train fwd vs INT4':>29}"]

    def row(label: str, d: dict) -> str:
        loss = f"{d['val_loss']:.4f}+-{d['val_loss_sem']:.4f}"
        gap = d.get("mean_abs_logprob_gap")
        return f"  {label:<40} {loss:>15} {'-' if gap is None else f'{gap:.3e}':>29}"

    rows.append(row("high precision control", m["hp_control"]))
    rows.append(row("PTQ INT4 (control, converted)", m["ptq_int4"]))
    rows.append(row("QAT INT4 (qat4, converted)", m["qat_int4"]))
    ratio = b["gap_ratio_ptq_over_qat"]
    ratio_s = "inf (QAT gap exactly 0)" if ratio is None else f"{ratio:.3g}x"
    rows.append(f"  PTQ gap / QAT gap: {ratio_s};  QAT - control val loss: "
                f"{b['qat_minus_control_val_loss']:+.4f} +- {b['qat_minus_control_sem']:.4f} "
                "(paired sem)")  # fmt: skip
    return rows


def format_table(results: dict) -> str:
    """One table for both parts (parts that did not run are left out)."""
    s = results["scheme"]
    title = (f"qatpass demo: INT4 group {s['group_size']}, "
             f"{'symmetric' if s['symmetric'] else 'asymmetric'} {tuple(s['qrange'])}, "
             f"{s['scale_dtype']} scales")  # fmt: skip
    how = (f"train: torch.compile(backend=qat4, compiler={results['compiler']}); "
           f"serve: {results['serving']}")  # fmt: skip
    rows = [title, how]
    if "part_a" in results:
        rows += [""] + _part_a_rows(results["part_a"])
    if "part_b" in results:
        rows += [""] + _part_b_rows(results["part_b"])
    rows.append("")
    rows.append(f"wall time {results['seconds']:.0f} s")
    width = max(len(x) for x in rows)
    return "\n".join(["=" * width, *rows, "=" * width])


def _finite(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return x


def write_results(results: dict, out: Path) -> Path:
    """results.json (strict JSON: non-finite floats become null)."""
    path = out / "results.json"
    path.write_text(json.dumps(_finite(results), indent=2) + "\n")
    return path
