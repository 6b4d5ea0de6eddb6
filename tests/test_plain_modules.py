"""Bare parameters used by the model's own code: `F.linear`, `@`, `einsum`, `bmm`.

No nn.Linear anywhere: only the graph analysis sees these weights. Training under qat4 equals the
fake-quant reference bit for bit (gradients included), the plan names each weight with its reduction
dim, and `convert` with the backend's plan (or traced from example inputs) serves the same model.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from zoo_models import grads_of, loss_of, max_diff, reference

import qatpass

# the served kernels sum in another order than the fp32 matmuls of training
SERVED_FP32 = {"rtol": 1e-6, "atol": 1e-6}


class BareParams(nn.Module):
    """One bare parameter per way the model's code reaches a matmul."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(64, 64) / 8)  # F.linear(x, w): [N, K], dim 1
        self.b = nn.Parameter(torch.randn(64) / 8)  # its bias: stays high precision
        self.norm = nn.LayerNorm(64)
        self.w2 = nn.Parameter(torch.randn(64, 96) / 8)  # x @ w2: [K, N], dim 0
        self.w4 = nn.Parameter(torch.randn(3, 32, 32) / 6)  # bmm per head: [H, K, N], dim 1
        self.w3 = nn.Parameter(torch.randn(32, 96) / 10)  # einsum "bk,nk->bn": [N, K], dim 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(F.gelu(F.linear(x, self.w, self.b)))
        h = F.gelu(h @ self.w2)
        heads = torch.bmm(h.view(-1, 3, 32).transpose(0, 1), self.w4)
        h = heads.transpose(0, 1).reshape(-1, 96)
        return torch.einsum("bk,nk->bn", h, self.w3)


EXPECTED = {"w": 1, "w2": 0, "w4": 1, "w3": 1}


def model_and_input() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return BareParams(), torch.randn(8, 64)


@pytest.fixture
def trained():
    """(model, x, backend, training output, training grads) after one qat4(aot_eager) step."""
    model, x = model_and_input()
    b = qatpass.backend(compiler="aot_eager")
    out = torch.compile(model, backend=b)(x)
    loss_of([out]).backward()
    return model, x, b, out.detach(), grads_of(model)


def test_training_equals_fake_quant_reference(trained):
    model, x, b, out, grads = trained
    ref = reference(model, EXPECTED, (x,))
    with torch.no_grad():
        unchanged = torch.equal(ref, model(x))
    assert not unchanged, "fake quant changes nothing; the test has no power"
    same = torch.equal(out, ref)
    assert same, (
        f"training output != reference fake-quantizing {sorted(EXPECTED)} (max |diff| "
        f"{max_diff(out, ref):.3g}); the backend quantized {b.quantized_names}"
    )
    loss_of([ref]).backward()
    ref_grads = grads_of(model)
    for n, g in ref_grads.items():
        assert grads[n] is not None, f"no gradient reached {n}"
        same = torch.equal(grads[n], g)
        assert same, f"grad of {n} != reference's ({max_diff(grads[n], g):.3g})"


def test_plan_names_every_bare_parameter_with_its_dim(trained):
    model, x, b, _, _ = trained
    for plan, where in ((b.plan, "backend plan"), (qatpass.plan_for(model, (x,)), "plan_for")):
        assert plan.quantized_names == sorted(EXPECTED), f"{where}: {plan.quantized_names}"
        dims = {n: w.dim for n, w in plan.weights.items()}
        assert dims == EXPECTED, f"{where}: reduction dims {dims}"
        assert "b" in plan.skipped and "norm.weight" in plan.skipped, f"{where}: {plan.skipped}"


@pytest.mark.parametrize("how", ["plan", "example_inputs"])
def test_served_equals_trained(trained, how):
    model, x, b, out, _ = trained
    qmodel = qatpass.convert(model, plan=b.plan) if how == "plan" else qatpass.convert(model, (x,))
    assert qmodel is not model
    with torch.no_grad():
        served = qmodel(x)
    torch.testing.assert_close(
        served, out, **SERVED_FP32, msg=lambda m: f"convert({how}) vs training: {m}"
    )
    state = qmodel.state_dict()
    for n in EXPECTED:
        kept = state.get(n)
        assert kept is None or not kept.is_floating_point(), (
            f"convert({how}) keeps {n} as a float tensor: is it packed at all?"
        )
