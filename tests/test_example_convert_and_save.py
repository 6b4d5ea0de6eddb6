"""examples/convert_and_save.py runs and gives back the converted model's outputs."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("transformers")


EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "convert_and_save.py"


def test_convert_and_save(tmp_path):
    spec = importlib.util.spec_from_file_location("convert_and_save", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    diff = example.main(str(tmp_path / "ckpt"), tiny=True)
    assert diff == 0.0  # loading is exact: the same packed tensors
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert cfg["quantization_config"]["format"] == "pack-quantized"
