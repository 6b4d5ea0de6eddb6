"""PNG figures of the demo's results (matplotlib, Agg backend, no display needed)."""

from __future__ import annotations

from pathlib import Path

__all__ = ["plot_part_a", "plot_part_b"]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_part_a(a: dict, out: Path) -> Path:
    """part_a.png: cosine and top-1 agreement of PTQ vs QAT INT4, and the QAT loss curve."""
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    names = ["PTQ INT4", "QAT INT4"]
    colors = ["tab:red", "tab:green"]
    for ax, key, label in zip(
        axes[:2], ("cosine", "agreement"), ("mean cosine vs fp32", "top-1 neighbour agreement"),
        strict=True,
    ):  # fmt: skip
        vals = [a["ptq_int4"][key], a["qat_int4"][key]]
        bars = ax.bar(names, vals, color=colors)
        ax.bar_label(bars, fmt="%.4f" if key == "cosine" else "%.3f")
        ax.axhline(1.0, color="k", lw=0.8, ls="--", label="fp32")
        lo = min(vals)
        ax.set_ylim(max(0.0, lo - 2 * (1 - lo)), 1.0 + 0.15 * (1 - lo))
        ax.set_title(label)
        ax.legend(loc="lower right")
    axes[2].plot(a["curves"]["qat_loss"], color="tab:green")
    axes[2].set_yscale("log")
    axes[2].set_xlabel("QAT step")
    axes[2].set_title("distillation loss (qat4)")
    fig.suptitle(f"Part A: {a['model']}, {a['sentences']['held_out']} held-out sentences")
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
    ax.set_ylim(top=max(gaps) * 30)
    ax.set_title("mean |logprob(train fwd) - logprob(INT4)|")
    ax = axes[2]
    m = b["models"]
    keys = [("hp_control", "HP control", "tab:blue"), ("ptq_int4", "PTQ INT4", "tab:red"),
            ("qat_int4", "QAT INT4", "tab:green")]  # fmt: skip
    ax.errorbar(
        [label for _, label, _ in keys],
        [m[k]["val_loss"] for k, _, _ in keys],
        yerr=[m[k]["val_loss_sem"] for k, _, _ in keys],
        fmt="o",
        capsize=4,
    )
    ax.set_ylabel("held-out loss (nats/byte), +- sem")
    ax.set_title(f"QAT - control: {b['qat_minus_control_val_loss']:+.4f} "
                 f"+- {b['qat_minus_control_sem']:.4f} (paired)")  # fmt: skip
    fig.tight_layout()
    path = out / "part_b.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
