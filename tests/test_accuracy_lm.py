"""benchmarks/accuracy_lm.py in quick mode: a tiny random Llama through every arm, in seconds."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from qatpass.scheme import Int4Scheme

ROOT = Path(__file__).resolve().parents[1]
GPTQ_PYTHON = Path("/work/venv-gptq/bin/python")


def _module():
    spec = importlib.util.spec_from_file_location(
        "accuracy_lm", ROOT / "benchmarks" / "accuracy_lm.py"
    )
    mod = importlib.util.module_from_spec(spec)
    sys.modules["accuracy_lm"] = mod
    spec.loader.exec_module(mod)
    return mod


acc = _module()


def test_scheme_names_map_to_the_llmcompressor_w4a16_convention():
    s = acc.scheme_spec("int4-g64")
    assert s.convert_scheme == Int4Scheme(64, True, (-8, 7), torch.bfloat16)
    assert s.options == {"scheme": s.convert_scheme} and s.group_size == 64
    d = acc.scheme_spec('{"group_size": 32, "qrange": [-7, 7]}')
    assert d.convert_scheme == Int4Scheme(32, True, (-7, 7), torch.bfloat16)
    assert d.name == "int4-g32-q7"
    fp4 = acc.scheme_spec("nvfp4")  # the FP4 hook: passed through by name, no GPTQ arm
    assert fp4.options == {"scheme": "nvfp4"} and fp4.convert_scheme == "nvfp4"
    assert fp4.group_size is None
    with pytest.raises(ValueError, match="--schemes"):
        acc.scheme_spec("")


def _run(tmp_path: Path, *extra: str) -> dict:
    acc.main([str(tmp_path), "--quick", "--quiet", *extra])
    return json.loads((tmp_path / "accuracy_lm.json").read_text())


def test_quick_mode_runs_every_arm_and_writes_json_png_checkpoint(tmp_path):
    r = _run(tmp_path, "--gptq-python", str(tmp_path / "no-venv" / "python"))
    assert (tmp_path / "accuracy_lm.png").stat().st_size > 0
    assert set(r["schemes"]) == {"int4-g32", "int4-g64"}
    assert r["eval_tokens"] == 512
    for name, s in r["schemes"].items():
        arms = s["arms"]
        assert "no llmcompressor venv" in arms["gptq"]["skipped"]
        assert arms["rtn"]["kl"] > 0 and arms["qat"]["kl"] > 0
        for arm in ("rtn", "qat"):
            assert 0 <= arms[arm]["greedy_agreement"] <= 1 and arms[arm]["tokens"] == 512
        # fp32 fake quant == fp32 served INT4 up to summation order
        assert arms["qat"]["train_serve_gap"]["mean_abs"] < 1e-4
        assert arms["qat"]["roundtrip"] == {
            "checkpoint": str(tmp_path / f"qat_{name}"),
            "tensors_equal": True,
            "logits_equal": True,
        }
        assert (tmp_path / f"qat_{name}" / "config.json").is_file()
    assert r["reference"]["kl"] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.skipif(not GPTQ_PYTHON.is_file(), reason="no llmcompressor venv at /work/venv-gptq")
def test_quick_gptq_checkpoint_reads_back_exactly(tmp_path):
    r = _run(tmp_path, "--schemes", "int4-g32", "--gptq-python", str(GPTQ_PYTHON))
    g = r["schemes"]["int4-g32"]["arms"]["gptq"]
    assert "skipped" not in g, g.get("skipped")
    assert g["dequant_equal_llmcompressor"] and g["scales_exact_in_bf16"]
    assert g["loaded_scheme"]["qrange"] == [-8, 7] and g["loaded_scheme"]["group_size"] == 32
    assert g["kl"] > 0
