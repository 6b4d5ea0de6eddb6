"""ONNX export: W4A16 linears become com.microsoft::MatMulNBits, and the file runs in onnxruntime
on CPU with the torch inference model's numbers, for shapes other than the exported one. HF models
export as they are (default config, use_cache=True): inputs named after the forward's arguments,
dynamic batch and sequence dims (T5's decoder its own), logits out."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_export_pt2 import EXPORT_SHAPE, HF_CASES, RUN_SHAPES, converted, example, hf_case_params
from test_export_pt2 import reference as hf_reference
from tiny_models import tiny_llama
from torch import nn

from qatpass.config import QatConfig
from qatpass.export.onnx import MS_DOMAIN, register_matmul_nbits_schema, to_onnx
from qatpass.lowering import convert
from qatpass.scheme import Int4Scheme

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
transformers = pytest.importorskip("transformers")


# onnxruntime's MatMulNBits dequantizes to fp32 and accumulates in its own block order: the same
# math as the torch op, summed differently (max error seen on the tiny models: 3e-7).
ORT_FP32 = {"rtol": 1e-4, "atol": 1e-4}
SHAPES = [(1, 5), (3, 11)]


def run_ort(path, *inputs: torch.Tensor, **named: torch.Tensor) -> np.ndarray:
    """Run the file on positional inputs (in the graph's input order) or on inputs by name."""
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    if inputs:
        named = dict(zip((i.name for i in sess.get_inputs()), inputs, strict=True))
    feed = {name: x.numpy() for name, x in named.items()}
    return sess.run(None, feed)[0]


def nbits_nodes(path) -> list:
    return [n for n in onnx.load(str(path)).graph.node if n.domain == MS_DOMAIN]


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_tiny_llama_runs_in_onnxruntime(tmp_path, symmetric):
    """The README line as printed: `to_onnx(qmodel, (ids,), path)` on the HF model as it is."""
    qmodel = convert(tiny_llama(), QatConfig(scheme=Int4Scheme(symmetric=symmetric)))
    path = to_onnx(qmodel, (torch.randint(0, 128, (2, 7)),), tmp_path / "llama.onnx")
    nodes = nbits_nodes(path)
    assert len(nodes) == 2 * 7  # q, k, v, o, gate, up, down per layer; lm_head stays float
    assert {n.op_type for n in nodes} == {"MatMulNBits"}
    assert all(len(n.input) == (3 if symmetric else 4) for n in nodes)
    inits = {i.name: i for i in onnx.load(str(path)).graph.initializer}
    q_proj = nodes[0]  # layer 0 q_proj: N=64, K=64, G=32
    b, scales = inits[q_proj.input[1]], inits[q_proj.input[2]]
    assert (b.data_type, list(b.dims)) == (onnx.TensorProto.UINT8, [64, 2, 16])
    assert (scales.data_type, list(scales.dims)) == (onnx.TensorProto.FLOAT, [128])
    if not symmetric:
        zp = inits[q_proj.input[3]]
        assert (zp.data_type, list(zp.dims)) == (onnx.TensorProto.UINT8, [64, 1])
    assert not any(i.data_type == onnx.TensorProto.INT32 for i in inits.values())
    for batch, seq in SHAPES:
        ids = torch.randint(0, 128, (batch, seq))
        with torch.no_grad():
            ref = qmodel(ids).logits.numpy()
        got = run_ort(path, ids)
        assert got.shape == (batch, seq, 128)
        np.testing.assert_allclose(got, ref, **ORT_FP32)


@pytest.mark.parametrize("name", hf_case_params())
def test_hf_model_as_it_is_runs_in_onnxruntime(tmp_path, name):
    case = HF_CASES[name]
    model, qmodel = converted(name)
    inputs = case.inputs(*EXPORT_SHAPE)  # batch 1 (and decoder length 1): stays dynamic
    path = to_onnx(qmodel, example(case, inputs), tmp_path / f"{name}.onnx")
    assert len(nbits_nodes(path)) == case.n_ops - case.dead
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    dims = {"decoder_input_ids": ["batch", "decoder_seq"]}
    assert {i.name: i.shape for i in sess.get_inputs()} == {
        k: dims.get(k, ["batch", "seq"]) for k in inputs
    }
    assert [o.name for o in sess.get_outputs()] == [case.output]
    for shape in RUN_SHAPES:
        inputs = case.inputs(*shape)
        ref = hf_reference(qmodel, case, inputs).numpy()
        np.testing.assert_allclose(run_ort(path, **inputs), ref, **ORT_FP32)
    assert model.config.use_cache and qmodel.config.use_cache  # no config flip left behind
    assert not qmodel.training


def mlp(k: int, bias: bool) -> nn.Module:
    return nn.Sequential(nn.Linear(k, 64, bias=bias), nn.GELU(), nn.Linear(64, 16, bias=bias))


@pytest.mark.parametrize(
    ("k", "scheme"),
    [
        (64, Int4Scheme(group_size=-1)),  # per channel: block_size = K
        (96, Int4Scheme(symmetric=False)),  # 3 blocks: zero points padded to whole bytes
        (128, Int4Scheme(group_size=64, symmetric=False, qrange=(-8, 7))),
    ],
    ids=["channel", "asym-odd-blocks", "asym-g64-q8"],
)
@pytest.mark.parametrize("bias", [False, True])
def test_matmul_nbits_layout(tmp_path, k, scheme, bias):
    qmodel = convert(mlp(k, bias), QatConfig(scheme=scheme, exclude=()))
    path = to_onnx(qmodel, (torch.randn(4, k),), tmp_path / "mlp.onnx", dynamic_axes=(0,))
    first = nbits_nodes(path)[0]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in first.attribute}
    assert attrs["K"] == k and attrs["N"] == 64 and attrs["bits"] == 4
    assert attrs["block_size"] == scheme.group_size_for(k)
    x = torch.randn(9, k)
    with torch.no_grad():
        ref = qmodel(x).numpy()
    np.testing.assert_allclose(run_ort(path, x), ref, **ORT_FP32)


def test_schema_registration_is_idempotent():
    register_matmul_nbits_schema()
    register_matmul_nbits_schema()
    assert onnx.defs.has("MatMulNBits", MS_DOMAIN)


def test_model_is_not_modified(tmp_path):
    qmodel = convert(mlp(64, True))
    before = {k: v.clone() for k, v in qmodel.state_dict().items()}
    to_onnx(qmodel, (torch.randn(2, 64),), tmp_path / "m.onnx", dynamic_axes=(0,))
    after = qmodel.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


# ----------------------------------------------------------------------------- refusals


def test_refuses_unconverted_model(tmp_path):
    with pytest.raises(ValueError, match="no W4A16 linear"):
        to_onnx(mlp(64, False), (torch.randn(2, 64),), tmp_path / "m.onnx", dynamic_axes=(0,))
    assert not (tmp_path / "m.onnx").exists()


def test_refuses_bad_arguments(tmp_path):
    qmodel = convert(mlp(64, False))
    x = (torch.randn(2, 64),)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        to_onnx(lambda x: x, x, tmp_path / "m.onnx")
    with pytest.raises(ValueError, match="dynamic_axes"):
        to_onnx(qmodel, x, tmp_path / "m.onnx", dynamic_axes=(2,))
    with pytest.raises(TypeError, match="must be tensors"):
        to_onnx(qmodel, ([1.0] * 64,), tmp_path / "m.onnx")
    with pytest.raises(IsADirectoryError):
        to_onnx(qmodel, x, tmp_path)
