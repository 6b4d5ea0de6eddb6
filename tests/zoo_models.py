"""A zoo of tiny HF transformers architectures (random init from configs, no downloads).

Each `ZooCase` builds a model (fp32, eval: no dropout), makes example inputs for a (batch, seq)
and states the weights the default policy must quantize, with the reduction dim of each in the
parameter's own coordinates. The expected sets are written by hand from each architecture's
module structure, independently of qatpass's selection: every matmul weight of the blocks (also a
pooler's dense layer), never an embedding (also when tied to the head), the LM head, an MoE router,
a norm, a bias or a convolution; `left_alone` names the matmul weights that stay high precision
(the head, MoE routers). The configs keep every such weight's reduction dim a multiple of
the default group size (32).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import transformers
from torch import nn

import qatpass

VOCAB = 128
HIDDEN = 64
LAYERS = 2
IDS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
# Llama-like decoders: 4 heads of 16, 2 KV heads, MLP 128.
DECODER = {
    "vocab_size": VOCAB,
    "hidden_size": HIDDEN,
    "intermediate_size": 128,
    "num_hidden_layers": LAYERS,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    **IDS,
}
MOE = {"num_experts_per_tok": 2}
IMAGE = 32  # ViT: 32x32 RGB images, 8x8 patches
EXPERTS_IMPLEMENTATION = "grouped_mm"  # transformers' "eager" experts loop is not captured

LAYER = "model.layers.{i}."
Inputs = tuple[torch.Tensor, ...] | dict[str, torch.Tensor]


@dataclass(frozen=True, eq=False)  # hashed by identity: the tests cache per case
class ZooCase:
    """One architecture: how to build it, feed it and which weights it quantizes (fqn -> dim)."""

    name: str
    build: Callable[[], nn.Module]
    make_inputs: Callable[[int, int, torch.Generator], Inputs]
    expected: dict[str, int]
    # matmul weights that stay high precision (the head, MoE routers), each as its alias names
    left_alone: tuple[tuple[str, ...], ...] = ()
    seq_dynamic: bool = True  # False: the inputs have no sequence dim (images)

    def model(self) -> nn.Module:
        torch.manual_seed(0)
        return self.build().float().eval()

    def inputs(self, batch: int = 2, seq: int = 8, seed: int = 0) -> Inputs:
        return self.make_inputs(batch, seq, torch.Generator().manual_seed(seed))

    def __str__(self) -> str:
        return self.name


# ----------------------------------------------------------------------------- expected sets


def per_layer(prefix: str, names: dict[str, int], layers: range | list[int] = range(LAYERS)):
    """{prefix.format(i=i) + name: dim} for each layer i; dim is the reduction dim."""
    return {prefix.format(i=i) + n: d for i in layers for n, d in names.items()}


def linears(*modules: str) -> dict[str, int]:
    """nn.Linear weights [N, K]: reduction dim 1."""
    return {f"{m}.weight": 1 for m in modules}


LLAMA_BLOCK = linears(
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
ATTN = linears("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
# transformers 5 experts: gate_up_proj [E, 2I, H], down_proj [E, H, I]: reduce along the last dim
HF_EXPERTS = {"mlp.experts.gate_up_proj": 2, "mlp.experts.down_proj": 2}
# GPT-OSS stores them transposed: gate_up_proj [E, H, 2I], down_proj [E, I, H]: reduce along dim 1
GPT_OSS_EXPERTS = {"mlp.experts.gate_up_proj": 1, "mlp.experts.down_proj": 1}
# GPT-2 Conv1D weights are [K, N]: reduction dim 0
GPT2_BLOCK = {
    "attn.c_attn.weight": 0,
    "attn.c_proj.weight": 0,
    "mlp.c_fc.weight": 0,
    "mlp.c_proj.weight": 0,
}
FUSED_QKV_BLOCK = linears(
    "self_attention.query_key_value",
    "self_attention.dense",
    "mlp.dense_h_to_4h",
    "mlp.dense_4h_to_h",
)
T5_ATTN = ("q", "k", "v", "o")
T5_FF = linears("DenseReluDense.wi", "DenseReluDense.wo")
DEEPSEEK_ATTN = linears(
    "self_attn.q_a_proj",
    "self_attn.q_b_proj",
    "self_attn.kv_a_proj_with_mqa",
    "self_attn.kv_b_proj",
    "self_attn.o_proj",
)


HEAD = (("lm_head.weight",),)


def tied(embedding: str, *aliases: str) -> tuple[tuple[str, ...], ...]:
    """A head tied to an embedding: one tensor, known by either name."""
    return ((embedding, "lm_head.weight", *aliases),)


def routers(name: str, layers: range | list[int] = range(LAYERS)) -> tuple[tuple[str, ...], ...]:
    return tuple((LAYER.format(i=i) + name,) for i in layers)


# ----------------------------------------------------------------------------- inputs


def token_ids(batch: int, seq: int, g: torch.Generator) -> tuple[torch.Tensor]:
    return (torch.randint(3, VOCAB, (batch, seq), generator=g),)


def bert_inputs(batch: int, seq: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    (ids,) = token_ids(batch, seq, g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[-1, seq // 2 :] = 0  # the last row is padded
    return {"input_ids": ids, "attention_mask": mask}


def encoder_decoder_inputs(batch: int, seq: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """Encoder and decoder lengths differ, so each needs its own dynamic dim in an export."""
    (ids,) = token_ids(batch, seq, g)
    (dec,) = token_ids(batch, max(seq - 3, 1), g)
    return {"input_ids": ids, "decoder_input_ids": dec}


def pixels(batch: int, seq: int, g: torch.Generator) -> tuple[torch.Tensor]:
    del seq
    return (torch.randn(batch, 3, IMAGE, IMAGE, generator=g),)


# ----------------------------------------------------------------------------- builders


def _moe(model_cls, config_cls, **kwargs) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        cfg = config_cls(**{**DECODER, **MOE, **kwargs})
        cfg._experts_implementation = EXPERTS_IMPLEMENTATION
        return model_cls(cfg)

    return build


def _decoder(model_cls, config_cls, **kwargs) -> Callable[[], nn.Module]:
    return lambda: model_cls(config_cls(**{**DECODER, **kwargs}))


T = transformers
ZOO: list[ZooCase] = [
    ZooCase(
        "llama",
        _decoder(T.LlamaForCausalLM, T.LlamaConfig),
        token_ids,
        per_layer(LAYER, LLAMA_BLOCK),
        left_alone=HEAD,
    ),
    ZooCase(
        "llama_tied",
        _decoder(T.LlamaForCausalLM, T.LlamaConfig, tie_word_embeddings=True),
        token_ids,
        per_layer(LAYER, LLAMA_BLOCK),
        left_alone=tied("model.embed_tokens.weight"),
    ),
    ZooCase(
        "mistral",
        _decoder(T.MistralForCausalLM, T.MistralConfig, head_dim=16),
        token_ids,
        per_layer(LAYER, LLAMA_BLOCK),
        left_alone=HEAD,
    ),
    ZooCase(
        "qwen2",  # q/k/v with bias
        _decoder(T.Qwen2ForCausalLM, T.Qwen2Config),
        token_ids,
        per_layer(LAYER, LLAMA_BLOCK),
        left_alone=HEAD,
    ),
    ZooCase(
        "qwen3",  # q/k norms
        _decoder(T.Qwen3ForCausalLM, T.Qwen3Config, head_dim=16),
        token_ids,
        per_layer(LAYER, LLAMA_BLOCK),
        left_alone=HEAD,
    ),
    ZooCase(
        "phi3",  # fused qkv_proj and gate_up_proj
        _decoder(T.Phi3ForCausalLM, T.Phi3Config),
        token_ids,
        per_layer(
            LAYER,
            linears("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"),
        ),
        left_alone=HEAD,
    ),
    ZooCase(
        "gemma3",  # tied by default, scaled embedding, q/k norms
        _decoder(T.Gemma3ForCausalLM, T.Gemma3TextConfig, head_dim=16),
        token_ids,
        per_layer(LAYER, LLAMA_BLOCK),
        left_alone=tied("model.embed_tokens.weight"),
    ),
    ZooCase(
        "opt",  # tied by default, learned positions
        lambda: T.OPTForCausalLM(
            T.OPTConfig(
                vocab_size=VOCAB,
                hidden_size=HIDDEN,
                ffn_dim=128,
                num_hidden_layers=LAYERS,
                num_attention_heads=4,
                word_embed_proj_dim=HIDDEN,
                max_position_embeddings=64,
                **IDS,
            )
        ),
        token_ids,
        per_layer(
            "model.decoder.layers.{i}.",
            linears(
                "self_attn.q_proj",
                "self_attn.k_proj",
                "self_attn.v_proj",
                "self_attn.out_proj",
                "fc1",
                "fc2",
            ),
        ),
        left_alone=tied("model.decoder.embed_tokens.weight"),
    ),
    ZooCase(
        "gpt_neox",
        lambda: T.GPTNeoXForCausalLM(
            T.GPTNeoXConfig(
                vocab_size=VOCAB,
                hidden_size=HIDDEN,
                intermediate_size=128,
                num_hidden_layers=LAYERS,
                num_attention_heads=4,
                max_position_embeddings=64,
                **IDS,
            )
        ),
        token_ids,
        per_layer(
            "gpt_neox.layers.{i}.",
            linears(
                "attention.query_key_value",
                "attention.dense",
                "mlp.dense_h_to_4h",
                "mlp.dense_4h_to_h",
            ),
        ),
        left_alone=HEAD,
    ),
    ZooCase(
        "gpt2",  # Conv1D, tied wte
        lambda: T.GPT2LMHeadModel(
            T.GPT2Config(
                vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=4, n_positions=64, **IDS
            )
        ),
        token_ids,
        per_layer("transformer.h.{i}.", GPT2_BLOCK),
        left_alone=tied("transformer.wte.weight"),
    ),
    ZooCase(
        "falcon",  # tied word_embeddings, multi-query fused qkv
        lambda: T.FalconForCausalLM(
            T.FalconConfig(
                vocab_size=VOCAB,
                hidden_size=HIDDEN,
                num_hidden_layers=LAYERS,
                num_attention_heads=4,
                **IDS,
            )
        ),
        token_ids,
        per_layer("transformer.h.{i}.", FUSED_QKV_BLOCK),
        left_alone=tied("transformer.word_embeddings.weight"),
    ),
    ZooCase(
        "bloom",  # tied word_embeddings, alibi
        lambda: T.BloomForCausalLM(
            T.BloomConfig(vocab_size=VOCAB, hidden_size=HIDDEN, n_layer=LAYERS, n_head=4, **IDS)
        ),
        token_ids,
        per_layer("transformer.h.{i}.", FUSED_QKV_BLOCK),
        left_alone=tied("transformer.word_embeddings.weight"),
    ),
    ZooCase(
        "bert",  # encoder with a pooler; padded attention mask
        lambda: T.BertModel(
            T.BertConfig(
                vocab_size=VOCAB,
                hidden_size=HIDDEN,
                intermediate_size=128,
                num_hidden_layers=LAYERS,
                num_attention_heads=4,
                max_position_embeddings=64,
                pad_token_id=0,
            )
        ),
        bert_inputs,
        {
            **per_layer(
                "encoder.layer.{i}.",
                linears(
                    "attention.self.query",
                    "attention.self.key",
                    "attention.self.value",
                    "attention.output.dense",
                    "intermediate.dense",
                    "output.dense",
                ),
            ),
            **linears("pooler.dense"),
        },
    ),
    ZooCase(
        "t5",  # encoder-decoder, head tied to `shared`, relative attention bias (an embedding)
        lambda: T.T5ForConditionalGeneration(
            T.T5Config(
                vocab_size=VOCAB,
                d_model=HIDDEN,
                d_kv=16,
                d_ff=128,
                num_layers=LAYERS,
                num_heads=4,
                decoder_start_token_id=0,
                pad_token_id=0,
                eos_token_id=1,
            )
        ),
        encoder_decoder_inputs,
        {
            **per_layer(
                "encoder.block.{i}.",
                {
                    **linears(*(f"layer.0.SelfAttention.{p}" for p in T5_ATTN)),
                    **{f"layer.1.{n}": d for n, d in T5_FF.items()},
                },
            ),
            **per_layer(
                "decoder.block.{i}.",
                {
                    **linears(*(f"layer.0.SelfAttention.{p}" for p in T5_ATTN)),
                    **linears(*(f"layer.1.EncDecAttention.{p}" for p in T5_ATTN)),
                    **{f"layer.2.{n}": d for n, d in T5_FF.items()},
                },
            ),
        },
        left_alone=tied(
            "shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight"
        ),
    ),
    ZooCase(
        "mixtral",
        _moe(T.MixtralForCausalLM, T.MixtralConfig, num_local_experts=4),
        token_ids,
        per_layer(LAYER, {**ATTN, **HF_EXPERTS}),
        left_alone=HEAD + routers("mlp.gate.weight"),
    ),
    ZooCase(
        "qwen3_moe",
        _moe(
            T.Qwen3MoeForCausalLM,
            T.Qwen3MoeConfig,
            num_experts=4,
            moe_intermediate_size=32,
            head_dim=16,
        ),
        token_ids,
        per_layer(LAYER, {**ATTN, **HF_EXPERTS}),
        left_alone=HEAD + routers("mlp.gate.weight"),
    ),
    ZooCase(
        "olmoe",
        _moe(T.OlmoeForCausalLM, T.OlmoeConfig, num_experts=4),
        token_ids,
        per_layer(LAYER, {**ATTN, **HF_EXPERTS}),
        left_alone=HEAD + routers("mlp.gate.weight"),
    ),
    ZooCase(
        "deepseek_v3",  # MLA attention, layer 0 dense, layer 1 routed + shared experts
        _moe(
            T.DeepseekV3ForCausalLM,
            T.DeepseekV3Config,
            moe_intermediate_size=32,
            n_routed_experts=4,
            n_shared_experts=1,
            first_k_dense_replace=1,
            num_key_value_heads=4,  # MLA: one K/V per head
            q_lora_rank=32,
            kv_lora_rank=32,
            qk_rope_head_dim=16,
            qk_nope_head_dim=16,
            v_head_dim=16,
            n_group=1,
            topk_group=1,
        ),
        token_ids,
        {
            **per_layer(LAYER, DEEPSEEK_ATTN),
            **per_layer(LAYER, linears("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"), [0]),
            **per_layer(
                LAYER,
                {
                    **HF_EXPERTS,
                    **linears(
                        "mlp.shared_experts.gate_proj",
                        "mlp.shared_experts.up_proj",
                        "mlp.shared_experts.down_proj",
                    ),
                },
                [1],
            ),
        },
        left_alone=HEAD + routers("mlp.gate.weight", [1]),
    ),
    ZooCase(
        "gpt_oss",  # transposed experts with biases, router with bias, attention sinks
        _moe(T.GptOssForCausalLM, T.GptOssConfig, num_local_experts=4, head_dim=16),
        token_ids,
        per_layer(LAYER, {**ATTN, **GPT_OSS_EXPERTS}),
        left_alone=HEAD + routers("mlp.router.weight"),
    ),
    ZooCase(
        "vit",  # conv patch embedding, pooler
        lambda: T.ViTModel(
            T.ViTConfig(
                image_size=IMAGE,
                patch_size=8,
                hidden_size=HIDDEN,
                intermediate_size=128,
                num_hidden_layers=LAYERS,
                num_attention_heads=4,
            )
        ),
        pixels,
        {
            **per_layer(
                "layers.{i}.",
                linears(
                    "attention.q_proj",
                    "attention.k_proj",
                    "attention.v_proj",
                    "attention.o_proj",
                    "mlp.fc1",
                    "mlp.fc2",
                ),
            ),
            **linears("pooler.dense"),
        },
        seq_dynamic=False,
    ),
]
BY_NAME = {c.name: c for c in ZOO}


# ----------------------------------------------------------------------------- outputs


def call(model: nn.Module, inputs: Inputs) -> Any:
    return model(**inputs) if isinstance(inputs, dict) else model(*inputs)


def output_tensors(out: Any) -> list[torch.Tensor]:
    """The float tensors of a model output, in order (logits first); caches and None dropped."""
    if isinstance(out, torch.Tensor):
        return [out]
    values = out.values() if isinstance(out, dict) else out
    return [v for v in values if isinstance(v, torch.Tensor) and v.is_floating_point()]


# ----------------------------------------------------------------------------- the reference


def fake_quantized(model: nn.Module, expected: dict[str, int]) -> dict[str, torch.Tensor]:
    """The expected weights fake-quantized along their reduction dims (STE: grads reach them)."""
    params = dict(model.named_parameters())
    return {n: qatpass.fake_quantize(params[n], dim=d) for n, d in expected.items()}


def functional(model: nn.Module, tensors: dict[str, torch.Tensor], inputs: Inputs) -> Any:
    """model's forward with some parameters replaced by tensors (tied ones follow)."""
    if isinstance(inputs, dict):
        return torch.func.functional_call(model, tensors, (), inputs)
    return torch.func.functional_call(model, tensors, inputs)


def reference(model: nn.Module, expected: dict[str, int], inputs: Inputs) -> Any:
    """The independent QAT reference: exactly the expected weights fake-quantized, eagerly."""
    return functional(model, fake_quantized(model, expected), inputs)


def loss_of(outputs: list[torch.Tensor]) -> torch.Tensor:
    """A fixed random projection of every output, so every weight on the path gets a gradient."""
    g = torch.Generator().manual_seed(1)
    return sum((o * torch.randn(o.shape, generator=g)).sum() for o in outputs)


def grads_of(model: nn.Module) -> dict[str, torch.Tensor | None]:
    """The parameters' gradients (copies); the model's are cleared."""
    out = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return out


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| (for failure messages)."""
    return (a.double() - b.double()).abs().max().item()
