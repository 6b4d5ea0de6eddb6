"""Convert an HF model to INT4 (W4A16), save a vLLM / SGLang checkpoint, load it back, compare.

    python examples/convert_and_save.py OUT_DIR          # a tiny Llama built from a config
    vllm serve OUT_DIR                                   # serves the same checkpoint on a GPU

The checkpoint is compressed-tensors `pack-quantized`: int4 codes packed in int32, bf16 scales
per group of 32 along K, `quantization_config` in config.json. Loading it back with qatpass gives
a model whose outputs equal `qatpass.convert`'s, so what you evaluated is what you serve.
"""

from __future__ import annotations

import sys

import torch
import transformers

from qatpass.config import QatConfig
from qatpass.export import load_compressed_tensors, save_compressed_tensors
from qatpass.lowering import convert
from qatpass.scheme import Int4Scheme


def build_model(tiny: bool = True) -> torch.nn.Module:
    """A Llama from a config (no download); tiny for tests, ~100M parameters otherwise."""
    size = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    if not tiny:
        size = dict(
            hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12
        )
    cfg = transformers.LlamaConfig(
        vocab_size=128 if tiny else 32000, num_key_value_heads=2 if tiny else 4, **size
    )
    return transformers.LlamaForCausalLM(cfg).eval()


def main(out_dir: str, tiny: bool = True) -> float:
    """Save a converted model to out_dir, load it back and return the max |logits difference|."""
    torch.manual_seed(0)
    model = build_model(tiny)  # your trained (QAT) model goes here
    config = QatConfig(scheme=Int4Scheme(group_size=32))
    qmodel = convert(model, config)  # packed INT4 weights, W4A16 matmuls

    save_compressed_tensors(model, out_dir, config, overwrite=True)
    loaded = load_compressed_tensors(out_dir)  # rebuilt from config.json, packed modules inside

    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    with torch.no_grad():
        diff = (loaded(ids).logits - qmodel(ids).logits).abs().max().item()
    print(f"saved {out_dir}; max |logits(loaded) - logits(converted)| = {diff:.3g}")
    return diff


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "qatpass-w4a16", tiny="--full" not in sys.argv)
