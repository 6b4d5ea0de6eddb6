"""QAT fine-tuning of a Hugging Face causal LM in an ordinary training loop, then INT4 serving.

The model code is untouched: `torch.compile(model, backend=qatpass.backend(...))` fake-quantizes
every selected linear weight (STE, fp32 master weights); `qatpass.convert` packs the trained
weights to INT4 for inference. The served model computes what the fake-quant model computed.

    python examples/finetune_hf.py                 # a 4-layer Llama on stdlib source, inductor
    python examples/finetune_hf.py --tiny          # a 2-layer toy (the test suite), aot_eager
"""

from __future__ import annotations

import argparse
import sysconfig
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

import qatpass


def build_model(tiny: bool) -> LlamaForCausalLM:
    size = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2)
    if not tiny:
        size = dict(
            hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4
        )
    cfg = LlamaConfig(
        vocab_size=128, max_position_embeddings=256, tie_word_embeddings=False, **size
    )
    return LlamaForCausalLM(cfg)


def text_ids() -> torch.Tensor:
    """ASCII bytes (vocab 128) of a few stdlib modules: a corpus every Python install has."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    data = b"".join((stdlib / name).read_bytes() for name in ("textwrap.py", "argparse.py"))
    return torch.tensor([b & 0x7F for b in data], dtype=torch.long)


def main(steps: int = 200, tiny: bool = False, seq_len: int = 128, batch: int = 8) -> dict:
    torch.manual_seed(0)
    ids = text_ids()
    model = build_model(tiny)
    # 1. compile with the qat4 backend: the only QAT-specific line of the loop
    backend = qatpass.backend(compiler="aot_eager" if tiny else "inductor")
    cmodel = torch.compile(model, backend=backend)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(steps):  # 2. an ordinary training loop
        starts = torch.randint(0, len(ids) - seq_len - 1, (batch,))
        window = torch.stack([ids[s : s + seq_len + 1] for s in starts.tolist()])
        logits = cmodel(input_ids=window[:, :-1]).logits
        loss = F.cross_entropy(logits.flatten(0, 1), window[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    # 3. serve in INT4 and check it computes what the fake-quant training forward computed
    served = qatpass.convert(model).eval()  # packed INT4 weights, same selection as training
    probe = ids[: seq_len + 1][None]
    with torch.no_grad():
        trained = cmodel(input_ids=probe[:, :-1]).logits
        int4 = served(input_ids=probe[:, :-1]).logits
    return {
        "losses": losses,
        "quantized": backend.quantized_names,
        "max_abs_logit_diff": float((trained - int4).abs().max()),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args()
    out = main(steps=args.steps, tiny=args.tiny)
    print(f"loss {out['losses'][0]:.3f} -> {out['losses'][-1]:.3f}; "
          f"{len(out['quantized'])} INT4 weights; "
          f"max |logit(fake quant) - logit(INT4)| = {out['max_abs_logit_diff']:.2e}")  # fmt: skip
