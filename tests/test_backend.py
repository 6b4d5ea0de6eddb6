"""The qat4 backend end to end: entry point, HF Llama and Qwen3-MoE, dynamic shapes, Inductor."""

from __future__ import annotations

import copy
import logging
import re

import pytest
import torch
from tiny_models import LLAMA_QUANTIZED, MOE_QUANTIZED, tiny_llama, tiny_qwen3_moe
from torch import nn

import qatpass

from conftest import ACCUM, EXACT


def fake_quantized_copy(model: nn.Module, names: set[str]) -> nn.Module:
    """The hand-written reference: the same model with exactly `names` fake-quantized (last dim)."""
    ref = copy.deepcopy(model)
    params = dict(ref.named_parameters())
    with torch.no_grad():
        for name in names:
            params[name].copy_(qatpass.fake_quantize(params[name], dim=-1))
    return ref


def quantized_names(b: qatpass.QatBackend) -> set[str]:
    return {q for s in b.summaries for q in s.quantized_names}


def test_entry_point_is_registered_and_needs_no_import():
    from importlib.metadata import entry_points

    (ep,) = [e for e in entry_points(group="torch_dynamo_backends") if e.name == "qat4"]
    assert ep.value == "qatpass.backend:qat4"
    assert "qat4" in torch._dynamo.list_backends(exclude_tags=())


def test_string_backend_with_options_reaches_the_pass():
    qatpass.reset_summary()
    m = nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 32))
    x = torch.randn(3, 128)
    options = {"group_size": 64, "compiler": "aot_eager", "exclude": [r"^2\."]}
    out = torch.compile(m, backend="qat4", options=options)(x)
    (s,) = qatpass.summary()
    assert s.quantized_names == ["0.weight"] and s.quantized[0].group_size == 64
    ref = copy.deepcopy(m)
    with torch.no_grad():
        ref[0].weight.copy_(qatpass.fake_quantize(m[0].weight, qatpass.Int4Scheme(group_size=64)))
    torch.testing.assert_close(out, ref(x), **EXACT)


def test_llama_logits_and_gradients_match_the_fake_quant_reference():
    model = tiny_llama()
    ids = torch.randint(0, 128, (2, 16))
    b = qatpass.backend(compiler="aot_eager")
    out = torch.compile(model, backend=b)(ids, labels=ids)
    assert quantized_names(b) == LLAMA_QUANTIZED  # lm_head and embeddings stay high precision
    ref_model = fake_quantized_copy(model, LLAMA_QUANTIZED)
    ref = ref_model(ids, labels=ids)
    torch.testing.assert_close(out.logits, ref.logits, **ACCUM[torch.float32])

    out.loss.backward()
    ref.loss.backward()
    grads = dict(model.named_parameters())
    ref_grads = dict(ref_model.named_parameters())
    for name in LLAMA_QUANTIZED | {"lm_head.weight", "model.embed_tokens.weight"}:
        g = grads[name].grad
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0, name
        # STE: the master weight gets exactly the gradient of the fake-quantized weight
        torch.testing.assert_close(g, ref_grads[name].grad, rtol=1e-4, atol=1e-6)


def test_model_is_not_modified():
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.compile(model, backend=qatpass.backend(compiler="aot_eager"))(
        torch.randint(0, 128, (1, 8))
    )
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("impl", ["grouped_mm", "batched_mm"])
def test_qwen3_moe_experts_are_fake_quantized_per_expert(impl):
    model = tiny_qwen3_moe(impl)
    ids = torch.randint(0, 128, (2, 12))
    b = qatpass.backend(compiler="aot_eager")
    out = torch.compile(model, backend=b)(ids, labels=ids)
    assert quantized_names(b) == MOE_QUANTIZED  # the routers (mlp.gate) stay high precision
    skipped = {s.fqn: s.reason for g in b.summaries for s in g.skipped}
    assert "MoE router" in skipped["model.layers.0.mlp.gate.weight"]  # structural: feeds topk
    dims = {q.fqn: q.dim for g in b.summaries for q in g.quantized}
    assert dims["model.layers.0.mlp.experts.gate_up_proj"] == 2  # [E, 2I, H]: per expert, along H
    ref_model = fake_quantized_copy(model, MOE_QUANTIZED)
    ref = ref_model(ids, labels=ids)
    torch.testing.assert_close(out.logits, ref.logits, **ACCUM[torch.float32])
    out.loss.backward()
    g = model.model.layers[0].mlp.experts.gate_up_proj.grad
    assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0


def test_eager_experts_are_reported_as_not_captured(caplog):
    model = tiny_qwen3_moe("eager")
    b = qatpass.backend(compiler="eager")
    with caplog.at_level(logging.WARNING, logger="qatpass"):
        torch.compile(model, backend=b)(torch.randint(0, 128, (1, 6)))
    warnings = [r.getMessage() for r in caplog.records if "'eager' experts" in r.getMessage()]
    assert len(warnings) == 2  # one per experts module, once
    assert "model.layers.0.mlp.experts" in warnings[0]


def test_dynamic_shapes_and_graph_breaks_do_not_recompile_storm():
    class WithBreak(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(64, 64)
            self.b = nn.Linear(64, 64)

        def forward(self, x):
            h = self.a(x)
            torch._dynamo.graph_break()
            return self.b(torch.relu(h))

    m = WithBreak()
    b = qatpass.backend(compiler="aot_eager")
    cm = torch.compile(m, backend=b, dynamic=True)
    for batch, seq in [(2, 3), (2, 5), (4, 7), (3, 9)]:  # sizes 0/1 specialize in Dynamo
        x = torch.randn(batch, seq, 64)
        ref = fake_quantized_copy(m, {"a.weight", "b.weight"})(x)
        torch.testing.assert_close(cm(x), ref, **EXACT)
    assert len(b.summaries) == 2  # two graphs (one break), compiled once each for all shapes
    assert quantized_names(b) == {"a.weight", "b.weight"}


def test_llama_fullgraph_dynamic_batch_and_sequence():
    from torch._dynamo.testing import CompileCounterWithBackend

    model = tiny_llama()
    shapes = [(2, 5), (3, 11), (2, 7), (4, 9)]
    plain = CompileCounterWithBackend("aot_eager")
    cplain = torch.compile(model, backend=plain, fullgraph=True, dynamic=True)
    for batch, seq in shapes:
        cplain(torch.randint(0, 128, (batch, seq)))
    torch._dynamo.reset()

    b = qatpass.backend(compiler="aot_eager")
    cm = torch.compile(model, backend=b, fullgraph=True, dynamic=True)
    ref_model = fake_quantized_copy(model, LLAMA_QUANTIZED)
    for batch, seq in shapes:
        ids = torch.randint(0, 128, (batch, seq))
        torch.testing.assert_close(cm(ids).logits, ref_model(ids).logits, **ACCUM[torch.float32])
    # the pass adds no recompilation: as many graphs as the same model under plain aot_eager
    assert len(b.summaries) == plain.frame_count <= 2


@pytest.mark.inductor
def test_inductor_compiles_forward_and_backward_with_fused_fake_quant():
    from torch._inductor.utils import run_and_get_code

    m = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 32)).to(torch.bfloat16)
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    b = qatpass.backend()  # Inductor
    cm = torch.compile(m, backend=b)

    def step():
        out = cm(x)
        out.float().square().sum().backward()
        return out

    out, codes = run_and_get_code(step)
    ref_model = fake_quantized_copy(m, {"0.weight", "2.weight"})
    torch.testing.assert_close(out, ref_model(x), **ACCUM[torch.bfloat16])
    ref_model(x).float().square().sum().backward()
    torch.testing.assert_close(m[0].weight.grad, ref_model[0].weight.grad, **ACCUM[torch.bfloat16])
    forward = codes[0]
    # one fused kernel per weight computes amax, the bf16 scale rounding, round and clamp
    fused = re.findall(r"def (cpp_fused_\w+)|(cpp_fused_\w+) = async_compile", forward)
    names = {a or b_ for a, b_ in fused}
    assert any("amax" in n and "round" in n for n in names), names
    assert len(codes) >= 2  # a compiled backward too


def test_inductor_fake_quant_is_bit_exact_with_eager():
    for dtype in (torch.float32, torch.bfloat16):
        w = torch.randn(64, 128, dtype=dtype)
        compiled = torch.compile(lambda t: qatpass.fake_quantize(t), backend="inductor")
        assert torch.equal(compiled(w), qatpass.fake_quantize(w))
