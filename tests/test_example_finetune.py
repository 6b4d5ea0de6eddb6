"""examples/finetune_hf.py runs: QAT fine-tuning of a tiny HF Llama, then INT4 serving."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "finetune_hf.py"


def _load():
    spec = importlib.util.spec_from_file_location("finetune_hf", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_finetune_hf_tiny_trains_and_serves_int4():
    out = _load().main(steps=8, tiny=True)
    assert len(out["losses"]) == 8 and out["losses"][-1] < out["losses"][0]
    assert len(out["quantized"]) == 2 * 7  # q, k, v, o, gate, up, down per layer
    assert not any("lm_head" in n or "embed" in n for n in out["quantized"])
    assert out["max_abs_logit_diff"] < 1e-4
