"""What does the qat4 pass do to my model? Diff a tiny HF Llama, print the table, write the HTML.

    python examples/debug_diff.py [OUT_DIR]

Copy it and swap in your own model and inputs; `qatpass diff module:factory --html diff.html`
does the same from the command line.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import transformers

import qatpass.graph_diff


def tiny_llama() -> tuple[torch.nn.Module, tuple[torch.Tensor]]:
    """A randomly initialised 2-layer Llama (nothing is downloaded) and a batch of token ids."""
    config = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    input_ids = torch.randint(0, config.vocab_size, (1, 16))
    return model, (input_ids,)


def main(out_dir: str | Path = "qatpass_diff") -> qatpass.graph_diff.DiffReport:
    model, example_inputs = tiny_llama()
    # the same options as torch.compile(model, backend="qat4", options={...})
    report = qatpass.graph_diff.diff(
        model, example_inputs, group_size=32, exclude=[r"lm_head", r"embed", r"o_proj"]
    )
    print(report.text())
    html = report.to_html(Path(out_dir) / "diff.html")
    report.to_json(Path(out_dir) / "diff.json")
    print(f"\nopen {html} in a browser")
    return report


if __name__ == "__main__":
    main(*sys.argv[1:])
