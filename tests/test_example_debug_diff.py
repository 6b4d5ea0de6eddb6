"""examples/debug_diff.py runs as documented and writes what it says."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("transformers")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "debug_diff.py"


def _load_example():
    spec = importlib.util.spec_from_file_location("debug_diff_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_debug_diff(tmp_path, capsys):
    report = _load_example().main(tmp_path)
    out = capsys.readouterr().out
    assert "per-layer numbers" in out and "excluded by filter 'o_proj'" in out
    assert len(report.layers) == 12  # q, k, v, gate, up, down in 2 layers
    assert all(r.fake_vs_real_max_abs == 0.0 for r in report.layers)
    html = (tmp_path / "diff.html").read_text()
    for row in report.layers:
        assert f"data-layer='{row.fqn}'" in html
    data = json.loads((tmp_path / "diff.json").read_text())
    assert len(data["graphs"][0]["changes"]) == 24  # 12 fake-quant nodes added, 12 linears rewired
