"""Tiny HF transformers models from configs (no downloads), shared by the tests."""

from __future__ import annotations

import transformers
from torch import nn


def tiny_llama(**overrides) -> nn.Module:
    cfg = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        **overrides,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


MOE_INTERMEDIATE = 32


def tiny_qwen3_moe(experts_implementation: str | None = "grouped_mm", **overrides) -> nn.Module:
    """None keeps transformers' default experts implementation."""
    cfg = transformers.Qwen3MoeConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=MOE_INTERMEDIATE,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=4,
        num_experts_per_tok=2,
        **overrides,
    )
    if experts_implementation is not None:
        cfg._experts_implementation = experts_implementation
    return transformers.Qwen3MoeForCausalLM(cfg).eval()


def export_llama(tie: bool = False) -> nn.Module:
    """The tiny Llama the export tests write: no KV cache, optionally tied embeddings."""
    return tiny_llama(use_cache=False, tie_word_embeddings=tie)


def export_moe() -> nn.Module:
    """The tiny Qwen3-MoE the export tests write (transformers' default experts)."""
    return tiny_qwen3_moe(None, use_cache=False, head_dim=16)


class Logits(nn.Module):
    """model(ids).logits as a plain tensor output (what exporters trace)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids):
        return self.model(ids).logits


LLAMA_QUANTIZED = {
    f"model.layers.{i}.{m}.weight"
    for i in range(2)
    for m in (
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    )
}
MOE_QUANTIZED = {
    f"model.layers.{i}.{m}"
    for i in range(2)
    for m in (
        "self_attn.q_proj.weight",
        "self_attn.k_proj.weight",
        "self_attn.v_proj.weight",
        "self_attn.o_proj.weight",
        "mlp.experts.gate_up_proj",
        "mlp.experts.down_proj",
    )
}
