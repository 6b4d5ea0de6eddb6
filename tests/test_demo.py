"""`qatpass demo --quick` end to end, plus the demo's data split and metrics."""

from __future__ import annotations

import json

import pytest
import torch

from qatpass.demo import main
from qatpass.demo.data import docstring_sentences, is_held_out, source_bytes, stdlib_files
from qatpass.demo.part_a import agreement


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
    assert set(a["recovered"]) == {"cosine", "agreement"}
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


def test_agreement_counts_unchanged_top1_neighbours():
    def unit(rows):
        return torch.nn.functional.normalize(torch.tensor(rows), dim=-1)

    ref = unit([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])  # pairs: 0<->1, 2<->3
    assert agreement(ref, ref) == 1.0
    # move 3 to the diagonal: its neighbour becomes 1; 0, 1 and 2 keep theirs
    moved = unit([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [1.0, 1.0]])
    assert agreement(moved, ref) == 0.75
