"""`qatpass demo --quick` end to end, plus the demo's data split and metrics."""

from __future__ import annotations

import json

import pytest
import torch

from qatpass.demo import main
from qatpass.demo.data import (
    docstring_lines,
    docstring_sentences,
    docstring_texts,
    is_held_out,
    source_bytes,
    stdlib_files,
)
from qatpass.demo.part_a import agreement, near_tie_share, spearman_per_sentence
from qatpass.demo.plots import plot_part_a, plot_part_b


@pytest.mark.slow
def test_demo_quick_writes_results_plots_and_table(tmp_path, capsys):
    assert main(["--quick", "--out", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    assert "Part A" in table and "Part B" in table and "PTQ INT4" in table and "QAT INT4" in table
    results = json.loads((tmp_path / "results.json").read_text())
    assert {"scheme", "compiler", "serving", "part_a", "part_b", "seconds"} <= set(results)
    a, b = results["part_a"], results["part_b"]
    for key in ("ptq_int4", "qat_int4"):
        assert 0.0 < a[key]["cosine"] <= 1.0 + 1e-6 and 0.0 <= a[key]["agreement"] <= 1.0
    assert set(a["recovered"]) == {"cosine", "spearman", "agreement"}
    for key in ("ptq_int4", "qat_int4"):
        assert -1.0 <= a[key]["spearman"] <= 1.0 and a[key]["spearman_sem"] >= 0.0
    assert 0.0 <= a["near_tie_share"] <= 1.0 and a["near_tie_gap"] == 0.003
    assert "Spearman vs fp32" in table and "top-1/top-2 gap < 0.003" in table
    assert a["quantized_weights"] > 0 and b["quantized_weights"] > 0
    assert set(b["models"]) == {"hp_control", "ptq_int4", "qat_fake_quant", "qat_int4"}
    # the served QAT model computes what its fake-quant training forward computed
    assert b["models"]["qat_int4"]["mean_abs_logprob_gap"] < 1e-4
    assert b["models"]["ptq_int4"]["mean_abs_logprob_gap"] > 0
    for png in ("part_a.png", "part_b.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_split_is_by_file_and_deterministic():
    files = stdlib_files()[:60]
    assert files == sorted(files, key=lambda p: p.as_posix())
    first, again = docstring_sentences(max_files=60), docstring_sentences(max_files=60)
    assert first == again
    assert first.train and first.held_out and not set(first.train) & set(first.held_out)
    assert is_held_out("json/decoder.py") == is_held_out("json/decoder.py")
    code = source_bytes(max_files=60)
    assert len(code.train) + len(code.held_out) == 60 and code.held_out


def test_prose_lines_come_from_training_files_only():
    """Part A's extra training text: docstring lines of the training files, none from a held-out
    file (the held-out docstrings' own lines included), none repeating a first line."""
    split = docstring_sentences(max_files=80)
    prose = docstring_lines(split, 80)
    held = {
        t.strip()
        for d in docstring_texts(max_files=80, min_chars=0).held_out
        for t in d.split("\n")
    }
    assert prose and len(set(prose)) == len(prose) and not set(prose) & set(split.train)
    assert all(24 <= len(line) <= 200 for line in prose)
    assert not set(prose) & (held | set(split.held_out))


def test_agreement_counts_unchanged_top1_neighbours():
    def unit(rows):
        return torch.nn.functional.normalize(torch.tensor(rows), dim=-1)

    ref = unit([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])  # pairs: 0<->1, 2<->3
    assert agreement(ref, ref) == 1.0
    # move 3 to the diagonal: its neighbour becomes 1; 0, 1 and 2 keep theirs
    moved = unit([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [1.0, 1.0]])
    assert agreement(moved, ref) == 0.75


def _unit(rows):
    return torch.nn.functional.normalize(torch.tensor(rows, dtype=torch.float64), dim=-1)


def _circle(degrees):
    rad = torch.tensor(degrees, dtype=torch.float64) * torch.pi / 180
    return torch.stack([rad.cos(), rad.sin()], dim=-1)


def test_near_tie_share_counts_top1_top2_gaps_below_the_threshold():
    # sentence 0 sits exactly between 1 and 2 (a tie); 3 is far from everyone
    ref = _circle([0.0, 20.0, -20.0, 120.0])
    assert near_tie_share(ref) == 0.25
    assert near_tie_share(ref, gap=0.0) == 0.0


def test_spearman_per_sentence_matches_the_rank_formula():
    ref = _circle([0.0, 10.0, 30.0, 60.0, 100.0])
    moved = _circle([0.0, 10.0, 30.0, 22.0, 100.0])  # 3 jumps between 1 and 2
    assert torch.allclose(spearman_per_sentence(ref, ref), torch.ones(5, dtype=torch.float64))
    got = spearman_per_sentence(moved, ref)
    s_ref, s_mov = ref @ ref.T, moved @ moved.T
    for i in range(5):
        others = [j for j in range(5) if j != i]
        r_ref = s_ref[i, others].argsort().argsort().double()
        r_mov = s_mov[i, others].argsort().argsort().double()
        n = len(others)
        expected = 1 - 6 * ((r_ref - r_mov) ** 2).sum() / (n * (n * n - 1))
        assert got[i].item() == pytest.approx(expected.item(), abs=1e-12)
    assert got[0].item() == pytest.approx(1.0 - 6 * 2 / (4 * 15), abs=1e-12)  # 2, 3 swap


def _part_a_result():
    def scores(cos, rho, agree):
        return {"cosine": cos, "cosine_sem": 1e-3, "spearman": rho, "spearman_sem": 1e-3,
                "agreement": agree}  # fmt: skip

    return {
        "model": "m", "sentences": {"held_out": 10}, "near_tie_share": 0.05,
        "near_tie_gap": 0.003, "ptq_int4": scores(0.96, 0.9, 0.85),
        "qat_int4": scores(0.99, 0.98, 0.9), "curves": {"qat_loss": [1.0, 0.5, 0.25]},
        "recovered": {"cosine": 0.75, "spearman": 0.8, "agreement": 1 / 3},
    }  # fmt: skip


def test_part_a_plot_axes_start_at_zero_and_are_labelled(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    figures = []
    monkeypatch.setattr(plt, "close", lambda fig: figures.append(fig))
    path = plot_part_a(_part_a_result(), tmp_path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (fig,) = figures
    for ax in fig.axes:
        assert ax.get_ylabel()
    for ax in fig.axes[:3]:
        assert ax.get_ylim()[0] == 0.0  # 0 = no loss against fp32
        legend = ax.get_legend()
        if legend is not None:  # legends sit below the axes, off the bars
            fig.canvas.draw()
            box = legend.get_window_extent()
            assert box.y1 <= ax.get_window_extent().y0


def test_part_b_plot_shows_differences_to_the_control_with_labelled_axes(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    figures = []
    monkeypatch.setattr(plt, "close", lambda fig: figures.append(fig))
    stats = {"val_loss": 1.5, "val_loss_sem": 0.05}
    b = {
        "curves": {"pretrain": [3.0, 2.0], "control": [1.9], "qat": [1.95]},
        "models": {"hp_control": stats, "ptq_int4": {**stats, "val_loss": 1.52,
                   "mean_abs_logprob_gap": 1e-2}, "qat_int4": {**stats,
                   "mean_abs_logprob_gap": 3e-7}},
        "qat_minus_control_val_loss": -0.003, "qat_minus_control_sem": 0.002,
    }  # fmt: skip
    plot_part_b(b, tmp_path)
    (fig,) = figures
    assert all(ax.get_ylabel() for ax in fig.axes)
    lo, hi = fig.axes[2].get_ylim()
    assert lo < -0.005 and hi > 0.02  # the differences and their error bars fit in the axes
