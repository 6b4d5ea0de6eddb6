"""One plan from training to serving, on 20 transformers architectures (tests/zoo_models.py).

For each architecture, against the weights it must quantize (written by hand per architecture):
training under qat4(aot_eager) equals, bit for bit, an independent `functional_call` reference that
fake-quantizes exactly those weights, gradients included; the backend's plan names them (and
round trips through a dict); `convert` with that plan (or traced from example inputs) serves the
training forward; a compressed-tensors checkpoint reloads to the converted model exactly; `to_onnx`
takes the HF model as it is and onnxruntime matches torch; `qatpass.diff` reports the same set.

The training run of an architecture is shared by the tests that need it (one per process).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch import nn
from zoo_models import (
    ZOO,
    Inputs,
    ZooCase,
    call,
    grads_of,
    loss_of,
    max_diff,
    output_tensors,
    reference,
)

import qatpass

from conftest import ACCUM

ort = pytest.importorskip("onnxruntime")

# with `--dist loadgroup` an architecture's tests share one worker, so it trains once
CASES = [pytest.param(c, id=c.name, marks=pytest.mark.xdist_group(c.name)) for c in ZOO]
GROUP_SIZE = 32  # the default group
FP32 = ACCUM[torch.float32]
# onnxruntime's MatMulNBits accumulates in its own block order (see tests/test_export_onnx.py)
ORT_FP32 = {"rtol": 1e-4, "atol": 1e-4}


def named_diff(got: list[str], want: list[str]) -> str:
    return f"unexpected {sorted(set(got) - set(want))}, missing {sorted(set(want) - set(got))}"


@dataclass
class Trained:
    model: nn.Module
    inputs: Inputs
    backend: qatpass.QatBackend
    outputs: list[torch.Tensor]  # the training forward, detached
    grads: dict[str, torch.Tensor | None]
    ref_outputs: list[torch.Tensor]
    ref_grads: dict[str, torch.Tensor | None]
    plain_outputs: list[torch.Tensor]  # nothing quantized


@functools.cache
def trained(case: ZooCase) -> Trained:
    """One qat4(aot_eager) training step of the case's model, and the reference's."""
    model, inputs = case.model(), case.inputs()
    with torch.no_grad():
        plain = output_tensors(call(model, inputs))
    ref = output_tensors(reference(model, case.expected, inputs))
    loss_of(ref).backward()
    ref_grads = grads_of(model)
    torch._dynamo.reset()
    b = qatpass.backend(compiler="aot_eager")
    out = output_tensors(call(torch.compile(model, backend=b), inputs))
    loss_of(out).backward()
    grads = grads_of(model)
    torch._dynamo.reset()
    return Trained(
        model,
        inputs,
        b,
        [o.detach() for o in out],
        grads,
        [o.detach() for o in ref],
        ref_grads,
        plain,
    )


def backend_names(b: qatpass.QatBackend) -> list[str]:
    plan = getattr(b, "plan", None)
    return list(plan.quantized_names) if plan is not None else b.quantized_names


def served_names(qmodel: nn.Module) -> list[str]:
    """The weights a converted model serves packed (from its W4A16 modules)."""
    return sorted(f"{w.module_name}.{w.attr}".lstrip(".") for w in qatpass.packed_weights(qmodel))


# ----------------------------------------------------------------------------- the zoo itself


@pytest.mark.parametrize("case", CASES)
def test_expected_weights_exist_and_divide_by_the_group(case):
    """The hand-written expectation names parameters, each divisible along its reduction dim."""
    params = dict(case.model().named_parameters())
    missing = sorted(set(case.expected) - set(params))
    assert not missing, f"{case}: expected weights that are not parameters: {missing}"
    for n, d in case.expected.items():
        assert params[n].shape[d] % GROUP_SIZE == 0, f"{case}: {n} {tuple(params[n].shape)} dim {d}"


# ----------------------------------------------------------------------------- 1. training


@pytest.mark.parametrize("case", CASES)
def test_training_equals_fake_quant_reference(case):
    t = trained(case)
    assert any(
        not torch.equal(r, p) for r, p in zip(t.ref_outputs, t.plain_outputs, strict=True)
    ), f"{case}: fake-quantizing the expected weights changes nothing; the test has no power"
    assert len(t.outputs) == len(t.ref_outputs)
    for i, (got, ref) in enumerate(zip(t.outputs, t.ref_outputs, strict=True)):
        same = torch.equal(got, ref)
        assert same, (
            f"{case}: training output {i} != reference that fake-quantizes exactly the expected "
            f"weights (max |diff| {max_diff(got, ref):.3g}); the backend quantized: "
            f"{named_diff(backend_names(t.backend), list(case.expected))}"
        )


@pytest.mark.parametrize("case", CASES)
def test_training_gradients_equal_reference(case):
    t = trained(case)
    for n in case.expected:
        g = t.grads[n]
        assert g is not None and bool(g.abs().sum() > 0), f"{case}: no gradient reached {n}"
    assert t.grads.keys() == t.ref_grads.keys()
    for n, ref in t.ref_grads.items():
        got = t.grads[n]
        assert (got is None) == (ref is None), (
            f"{case}: {n} grad {got is None=} vs ref {ref is None=}"
        )
        if ref is not None:
            same = torch.equal(got, ref)
            assert same, f"{case}: grad of {n} != reference's (max |diff| {max_diff(got, ref):.3g})"


# ----------------------------------------------------------------------------- 2. the plan


@pytest.mark.parametrize("case", CASES)
def test_backend_plan_is_the_expected_set(case):
    t = trained(case)
    plan = t.backend.plan
    assert isinstance(plan, qatpass.QuantPlan), type(plan)
    assert plan.quantized_names == sorted(case.expected), (
        f"{case}: plan {named_diff(plan.quantized_names, list(case.expected))}"
    )
    params = dict(t.model.named_parameters())
    for n, d in case.expected.items():
        w = plan.weights[n]
        assert (w.fqn, tuple(w.shape), w.dim, w.group_size) == (
            n,
            tuple(params[n].shape),
            d,
            GROUP_SIZE,
        ), f"{case}: planned {n}: (fqn, shape, dim, group_size)"
        assert w.ops, f"{case}: planned {n} has no ops"
    overlap = sorted(set(plan.skipped) & set(case.expected))
    assert not overlap, f"{case}: weights both planned and skipped: {overlap}"
    for n, s in plan.skipped.items():
        assert s.reason, f"{case}: {n} skipped without a reason"
    for aliases in case.left_alone:  # the head (or the embedding tied to it), MoE routers
        hits = [a for a in aliases if a in plan.skipped]
        assert hits, f"{case}: the matmul weight {aliases} left in high precision is not in skipped"
        assert plan.skipped[hits[0]].matmul_weight, f"{case}: {hits[0]} not marked a matmul weight"


@pytest.mark.parametrize("case", CASES)
def test_plan_dict_round_trip(case):
    plan = trained(case).backend.plan
    d = plan.to_dict()
    back = qatpass.QuantPlan.from_dict(json.loads(json.dumps(d)))
    assert back.to_dict() == d
    assert back.quantized_names == plan.quantized_names
    assert {n: w.dim for n, w in back.weights.items()} == {
        n: w.dim for n, w in plan.weights.items()
    }
    assert {n: s.reason for n, s in back.skipped.items()} == {
        n: s.reason for n, s in plan.skipped.items()
    }


# ----------------------------------------------------------------------------- 3. convert


@functools.cache
def converted(case: ZooCase) -> nn.Module:
    t = trained(case)
    return qatpass.convert(t.model, plan=t.backend.plan).eval()


@pytest.mark.parametrize("case", CASES)
def test_convert_with_plan_serves_the_training_forward(case):
    t = trained(case)
    before = {n: p.detach().clone() for n, p in t.model.named_parameters()}
    qmodel = converted(case)
    assert qmodel is not t.model
    for n, p in t.model.named_parameters():
        same = torch.equal(p, before[n])
        assert same, f"{case}: convert changed the model's {n}"
    assert served_names(qmodel) == sorted(case.expected), (
        f"{case}: convert(plan=b.plan) packs "
        f"{named_diff(served_names(qmodel), list(case.expected))}"
    )
    with torch.no_grad():
        served = output_tensors(call(qmodel, t.inputs))
    assert len(served) == len(t.outputs)
    for i, (got, want) in enumerate(zip(served, t.outputs, strict=True)):
        torch.testing.assert_close(
            got, want, **FP32, msg=lambda m, i=i: f"{case}: served output {i} != training: {m}"
        )


@pytest.mark.parametrize("case", CASES)
def test_convert_from_example_inputs_finds_the_same_plan(case):
    t = trained(case)
    qmodel = qatpass.convert(t.model, t.inputs)
    assert served_names(qmodel) == sorted(case.expected), (
        f"{case}: convert(model, example_inputs) packs "
        f"{named_diff(served_names(qmodel), list(case.expected))}"
    )


# ----------------------------------------------------------------------------- 4. checkpoint


@pytest.mark.parametrize("case", CASES)
def test_compressed_tensors_reload_equals_convert(case, tmp_path):
    t = trained(case)
    qmodel = converted(case)
    path = qatpass.export.save_compressed_tensors(qmodel, tmp_path / "ckpt")
    loaded = qatpass.export.load_compressed_tensors(path).eval()
    with torch.no_grad():
        want = output_tensors(call(qmodel, t.inputs))
        got = output_tensors(call(loaded, t.inputs))
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        same = torch.equal(g, w)
        assert same, (
            f"{case}: reloaded checkpoint output {i} != convert's (max |diff| {max_diff(g, w):.3g})"
        )


# ----------------------------------------------------------------------------- 5. ONNX


def run_ort(sess, inputs: Inputs) -> list[np.ndarray]:
    names = [i.name for i in sess.get_inputs()]
    if isinstance(inputs, dict):
        assert set(names) <= set(inputs), f"ONNX inputs {names}, given {sorted(inputs)}"
        feed = {n: inputs[n].numpy() for n in names}
    else:
        assert len(names) == len(inputs), f"ONNX inputs {names}, given {len(inputs)} tensors"
        feed = {n: x.numpy() for n, x in zip(names, inputs, strict=True)}
    return sess.run(None, feed)


@pytest.mark.parametrize("case", CASES)
def test_onnx_of_the_hf_model_as_is_matches_torch(case, tmp_path):
    t = trained(case)
    qmodel = converted(case)
    path = qatpass.export.to_onnx(qmodel, t.inputs, tmp_path / "model.onnx")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    # the exported shape, then another batch (and sequence length): the dims are dynamic
    for inputs in (t.inputs, case.inputs(batch=3, seq=11 if case.seq_dynamic else 8, seed=1)):
        with torch.no_grad():
            want = output_tensors(call(qmodel, inputs))[0].numpy()
        got = run_ort(sess, inputs)[0]
        assert got.shape == want.shape, (
            f"{case}: onnxruntime output {got.shape}, torch {want.shape}"
        )
        np.testing.assert_allclose(got, want, **ORT_FP32, err_msg=f"{case}: onnxruntime vs torch")


# ----------------------------------------------------------------------------- 6. diff


@pytest.mark.parametrize("case", CASES)
def test_diff_reports_the_expected_set(case):
    model, inputs = case.model(), case.inputs()
    report = qatpass.diff(model, inputs, compiler="aot_eager")
    assert report.quantized_names == sorted(case.expected), (
        f"{case}: diff {named_diff(report.quantized_names, list(case.expected))}"
    )
