"""PNG figures of the demo's results (matplotlib, Agg backend, no display needed)."""

from __future__ import annotations

from pathlib import Path

__all__ = ["plot_part_a", "plot_part_b"]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _legend_below(ax) -> None:
    """The legend under the axes, where it cannot cover a bar."""
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), fontsize=8, frameon=False)


def plot_part_a(a: dict, out: Path) -> Path:
    """part_a.png: what INT4 loses against fp32 (1 - cosine, 1 - Spearman, top-1 changes) for
    PTQ vs QAT, every axis from 0 = the fp32 model, +- sem over held-out sentences; QAT loss."""
    plt = _plt()
    fig, axes = plt.subplots(1, 4, figsize=(16, 4.4))
    names = ["PTQ INT4", "QAT INT4"]
    colors = ["tab:red", "tab:green"]
    panels = (
        ("cosine", "1 - mean cosine vs fp32", "embedding error"),
        ("spearman", "1 - mean Spearman vs fp32", "neighbour ranking error"),
    )
    for ax, (key, ylabel, title) in zip(axes[:2], panels, strict=True):
        lost = [1.0 - a[m][key] for m in ("ptq_int4", "qat_int4")]
        sem = [a[m].get(f"{key}_sem", 0.0) for m in ("ptq_int4", "qat_int4")]
        bars = ax.bar(names, lost, color=colors, yerr=sem, capsize=5, ecolor="k")
        ax.bar_label(bars, labels=[f"{v:.4f}" for v in lost], padding=3)
        ax.set_ylim(0, 1.25 * max(lost))
        ax.set_ylabel(f"{ylabel} (0 = fp32)")
        rec = a["recovered"].get(key)
        ax.set_title(f"{title}: QAT recovers {100 * rec:.1f}%" if rec is not None else title)
    ax = axes[2]
    changed = [1.0 - a[m]["agreement"] for m in ("ptq_int4", "qat_int4")]
    bars = ax.bar(names, changed, color=colors)
    ax.bar_label(bars, labels=[f"{100 * v:.1f}%" for v in changed], padding=3)
    tie = a.get("near_tie_share")
    if tie is not None:
        ax.axhline(tie, color="k", lw=1, ls="--",
                   label=f"near ties in fp32 (top-1/top-2 gap < {a['near_tie_gap']})")  # fmt: skip
        _legend_below(ax)
    ax.set_ylim(0, 1.25 * max(changed + [tie or 0.0]))
    ax.set_ylabel("share with a changed top-1 neighbour")
    ax.set_title("top-1 neighbour changes (information)")
    ax = axes[3]
    ax.plot(range(1, len(a["curves"]["qat_loss"]) + 1), a["curves"]["qat_loss"], color="tab:green")
    ax.set_yscale("log")
    ax.set_xlabel("QAT step")
    ax.set_ylabel("distillation loss (log scale)")
    ax.set_title("QAT training (qat4)")
    fig.suptitle(f"Part A: {a['model']}, {a['sentences']['held_out']} held-out sentences, "
                 "error bars +- sem over sentences")  # fmt: skip
    fig.tight_layout()
    path = out / "part_a.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_part_b(b: dict, out: Path) -> Path:
    """part_b.png: training curves (pretrain, then control vs QAT) and the logprob gaps."""
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    c = b["curves"]
    n = len(c["pretrain"])
    ax = axes[0]
    ax.plot(range(n), c["pretrain"], color="tab:gray", label="pretrain (high precision)")
    ax.plot(range(n, n + len(c["qat"])), c["qat"], color="tab:green", label="QAT (qat4)")
    ax.plot(range(n, n + len(c["control"])), c["control"], color="tab:blue", ls="--",
            label="control (HP, same batches)")  # fmt: skip
    ax.set_xlabel("step")
    ax.set_ylabel("train loss (nats/byte)")
    ax.set_title("byte-level Llama on stdlib source")
    ax.legend()
    ax = axes[1]
    gaps = [b["models"]["ptq_int4"]["mean_abs_logprob_gap"],
            b["models"]["qat_int4"]["mean_abs_logprob_gap"]]  # fmt: skip
    floor = 1e-12  # an exactly zero gap still gets a visible bar on the log axis
    bars = ax.bar(["PTQ", "QAT"], [max(g, floor) for g in gaps], color=["tab:red", "tab:green"])
    ax.bar_label(bars, labels=[f"{g:.2e}" for g in gaps])
    ax.set_yscale("log")
    ax.set_ylim(max(min(gaps), floor) / 10, max(gaps) * 30)
    ax.set_ylabel("mean |logprob(train fwd) - logprob(INT4)| (nats/byte, log)")
    ax.set_title("train / serve mismatch")
    ax = axes[2]
    m = b["models"]
    # Differences to the control on the same windows: their paired sem is what tells them apart
    # (each model's own sem, over windows, is larger than the differences it would hide).
    diffs = [m["ptq_int4"]["val_loss"] - m["hp_control"]["val_loss"],
             b["qat_minus_control_val_loss"]]  # fmt: skip
    sems = [b.get("ptq_minus_control_sem", 0.0), b["qat_minus_control_sem"]]
    bars = ax.bar(["PTQ INT4", "QAT INT4"], diffs, color=["tab:red", "tab:green"], yerr=sems,
                  capsize=5, ecolor="k")  # fmt: skip
    ax.bar_label(bars, labels=[f"{d:+.4f}" for d in diffs], padding=3)
    ax.axhline(0.0, color="k", lw=0.8)
    span = max(abs(d) + s for d, s in zip(diffs, sems, strict=True))
    ax.set_ylim(-1.3 * span, 1.3 * span)
    ax.set_ylabel("held-out loss - HP control (nats/byte)")
    ax.set_title("vs the high-precision control (QAT: +- paired sem)")
    fig.tight_layout()
    path = out / "part_b.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
