"""Autograd through packed INT4 layers: gradients w.r.t. activations and bias, frozen weights.

Adapters (LoRA) train on top of a converted model the way RL and fine-tuning users do: the
packed base stays frozen and its backward is dx = dy @ W with W the dequantized weight.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny_models import tiny_llama
from torch import nn

import qatpass
from qatpass.lowering.modules import W4A16Linear
from qatpass.scheme import Int4Scheme, dequantize, quantize

from conftest import EXACT


class LoRA(nn.Module):
    """base(x) + up(down(x)): a rank-r adapter beside a frozen linear (packed or not)."""

    def __init__(self, base: nn.Module, k: int, n: int, rank: int = 4) -> None:
        super().__init__()
        self.base = base
        self.down = nn.Linear(k, rank, bias=False)
        self.up = nn.Linear(rank, n, bias=False)
        nn.init.normal_(self.up.weight, std=0.1)

    def forward(self, x):
        return self.base(x) + self.up(self.down(x))


def _dequantized_linear(q: W4A16Linear) -> nn.Linear:
    lin = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None)
    with torch.no_grad():
        lin.weight.copy_(dequantize(q.packed(), torch.float32))
        if q.bias is not None:
            lin.bias.copy_(q.bias)
    lin.requires_grad_(False)
    return lin


def _with_adapters(model: nn.Module, make_base) -> nn.Module:
    torch.manual_seed(0)
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, W4A16Linear):
                lora = LoRA(child, child.in_features, child.out_features)
                with torch.random.fork_rng():  # the adapters' init is the same in both models
                    lora.base = make_base(child)
                setattr(module, child_name, lora)
    return model


def test_lora_over_a_converted_model_matches_dequantized_frozen_weights():
    model = tiny_llama()
    qmodel = qatpass.convert(model)
    packed = _with_adapters(qatpass.convert(model), lambda q: q)
    reference = _with_adapters(qmodel, _dequantized_linear)
    ids = torch.randint(0, 128, (2, 9))
    for m in (packed, reference):
        m.model.embed_tokens.requires_grad_(False)
        m(ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in packed.named_parameters() if p.grad is not None}
    ref = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
    assert grads.keys() == ref.keys() and len(grads) > 0
    assert all(".down." in n or ".up." in n or "norm" in n or "lm_head" in n for n in grads)
    for n in grads:
        torch.testing.assert_close(grads[n], ref[n], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("symmetric", [True, False])
def test_input_and_bias_gradients(dtype, symmetric):
    scheme = Int4Scheme(symmetric=symmetric)
    p = quantize(torch.randn(48, 64), scheme)
    q = W4A16Linear(p, torch.randn(48))
    q.bias.requires_grad_(True)
    x = torch.randn(3, 5, 64).to(dtype).requires_grad_(True)
    y = q(x.float() if dtype == torch.float32 else x)
    g = torch.randn_like(y)
    y.backward(g)
    w = dequantize(p, g.dtype)
    assert x.grad is not None and x.grad.dtype == dtype
    torch.testing.assert_close(x.grad, (g @ w).to(dtype), **EXACT)
    torch.testing.assert_close(q.bias.grad, g.reshape(-1, 48).sum(0).to(q.bias.dtype), **EXACT)


def test_grouped_input_gradients():
    p = quantize(torch.randn(3, 32, 64), Int4Scheme(), dim=2)
    x = torch.randn(6, 64, requires_grad=True)
    ids = torch.tensor([2, 0, 2, 1, 0, 2])
    y = torch.ops.qatpass.w4a16_grouped_linear(x, p.qweight, p.scales, ids, group_size=32)
    g = torch.randn_like(y)
    y.backward(g)
    w = dequantize(p)
    ref = torch.stack([g[t] @ w[ids[t]] for t in range(6)])
    torch.testing.assert_close(x.grad, ref, **EXACT)


def test_a_gradient_for_the_packed_scales_is_refused():
    p = quantize(torch.randn(16, 32), Int4Scheme())
    scales = p.scales.float().requires_grad_(True)
    x = torch.randn(2, 32)
    with pytest.raises(RuntimeError, match="packed INT4 weights are frozen"):
        torch.ops.qatpass.w4a16_linear(x, p.qweight, scales, group_size=32)


def test_inference_mode_backend_runs_with_grad_enabled():
    model = tiny_llama()
    cm = torch.compile(model, backend=qatpass.backend(mode="inference", compiler="aot_eager"))
    ids = torch.randint(0, 128, (2, 7))
    out = cm(ids).logits  # grad mode on: must not fail
    with torch.no_grad():
        ref = qatpass.convert(model)(ids).logits
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert F.mse_loss(out, ref).item() < 1e-10
