"""Every ```python snippet in README.md runs as printed, in order, on a real transformers model.

The snippets share one namespace that starts with what the README's prose assumes the reader has:
`model` (a tiny Llama from a config), `batch` (input_ids and labels), `ids`, `example_inputs` and an
optimizer `opt`. They run in a temporary directory, so the files they write land there.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_llama

README = Path(__file__).resolve().parents[1] / "README.md"
SNIPPETS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_snippets():
    assert len(SNIPPETS) >= 4


@pytest.mark.inductor
def test_every_readme_snippet_runs_as_printed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    model = tiny_llama().train()
    ids = torch.randint(0, 128, (2, 16))
    namespace = {
        "model": model,
        "batch": {"input_ids": ids, "labels": ids},
        "ids": ids,
        "example_inputs": (ids,),
        "opt": torch.optim.AdamW(model.parameters(), lr=1e-3),
    }
    for i, code in enumerate(SNIPPETS):
        try:
            exec(compile(code, f"README.md snippet {i}", "exec"), namespace)
        except Exception as e:
            raise AssertionError(
                f"README snippet {i} failed:\n{code}\n{type(e).__name__}: {e}"
            ) from e
    assert (tmp_path / "model.onnx").exists() and (tmp_path / "model.pt2").exists()
