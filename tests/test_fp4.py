"""FP4 (NVFP4, MXFP4) through the same pass: the formats against references written here from
their specifications, fake == real bit for bit, the pass on a tiny Llama and MoE models, convert,
and compressed-tensors checkpoints read by the compressed_tensors library itself.

The references are deliberately not qatpass's code: E2M1 and E4M3 rounding pick the nearest
value of an enumerated grid (ties to the even code / mantissa), the MX exponent comes from
`math.frexp`, and blocks are walked one at a time.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from zoo_models import ZOO, call, output_tensors

import qatpass
from qatpass.config import QatConfig
from qatpass.scheme import dequantize, fake_quantize_values, parse_scheme, quantize
from qatpass.scheme_fp4 import Fp4Scheme, e2m1_codes, e2m1_decode, e2m1_round, e4m3_round

from conftest import ACCUM, EXACT

NV, MX = Fp4Scheme("nvfp4"), Fp4Scheme("mxfp4")
SCHEMES = {"nvfp4": NV, "mxfp4": MX}
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
F32 = torch.float32

# ----------------------------------------------------------------------------- references

# E2M1: sign | exponent (2 bits, bias 1) | mantissa (1 bit); exponent 0 is subnormal (0, 0.5)
E2M1 = [(0.5 * m if e == 0 else (1 + 0.5 * m) * 2.0 ** (e - 1)) for e in range(4) for m in range(2)]
assert E2M1 == [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]

# E4M3 (fn): exponent 4 bits, bias 7, mantissa 3 bits; no infinities, S.1111.111 is NaN
E4M3 = sorted(
    {
        (m / 8 * 2.0**-6 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7))
        for e in range(16)
        for m in range(8)
    }
    - {(1 + 7 / 8) * 2.0**8}
)
assert E4M3[-1] == 448.0 and E4M3[1] == 2.0**-9


def ref_nearest(x: float, grid: list[float]) -> int:
    """Index of the grid value nearest |x| (saturating at the top), ties to the even index."""
    a = min(abs(x), grid[-1])
    best = min(range(len(grid)), key=lambda i: (abs(grid[i] - a), i % 2))
    return best


def ref_e2m1(x: float) -> float:
    v = E2M1[ref_nearest(x, E2M1)]
    return -v if math.copysign(1.0, x) < 0 else v


def ref_e4m3(x: float) -> float:
    # E4M3's grid index parity is its mantissa's parity (8 values per binade, 0 included)
    return E4M3[ref_nearest(x, E4M3)]


def f32(x: float) -> float:
    """x rounded to float32 (one IEEE fp32 operation's result)."""
    return torch.tensor(x, dtype=F32).item()


def ref_nvfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(dequantized fp32 [N, K], block scales [N, K/16], global scale) of fp32 w, block by block."""
    n, k = w.shape
    amax = max(abs(v) for v in w.flatten().tolist())
    gs = f32(2688.0 / f32(max(amax, torch.finfo(F32).tiny)))
    if not math.isfinite(gs):
        gs = 1.0
    out, scales = torch.empty(n, k, dtype=F32), torch.empty(n, k // 16, dtype=F32)
    for r in range(n):
        for b in range(k // 16):
            block = w[r, 16 * b : 16 * (b + 1)].tolist()
            # amax / 6 as qatpass writes it, amax * fp32(1/6) (see qatpass.scheme_fp4)
            raw = f32(f32(max(abs(v) for v in block) * f32(1 / 6)) * gs)
            s = ref_e4m3(min(max(raw, 2.0**-9), 448.0))
            scales[r, b] = s
            eff = f32(s / gs)
            for i, v in enumerate(block):
                out[r, 16 * b + i] = f32(ref_e2m1(f32(v / eff)) * eff)
    return out, scales, gs


def ref_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dequantized fp32 [N, K], E8M0 exponents e [N, K/32]) of fp32 w (OCP MX v1.0)."""
    n, k = w.shape
    out, exps = torch.empty(n, k, dtype=F32), torch.empty(n, k // 32, dtype=torch.int32)
    for r in range(n):
        for b in range(k // 32):
            block = w[r, 32 * b : 32 * (b + 1)].tolist()
            amax = max(abs(v) for v in block)
            # shared exponent = floor(log2(amax)) - emax(E2M1) = floor(log2(amax)) - 2
            e = -127 if amax == 0 else math.frexp(amax)[1] - 1 - 2
            e = min(max(e, -127), 127)
            exps[r, b] = e
            for i, v in enumerate(block):
                out[r, 32 * b + i] = f32(ref_e2m1(v / 2.0**e) * 2.0**e)
    return out, exps


def weights(
    seed: int, n: int, k: int, log2_scale: int, dtype=F32, zero_block=False
) -> torch.Tensor:
    """Random [n, k] weights: blocks of 16 of very different magnitudes (small E4M3 scales),
    about 10% exact zeros, optionally an all-zero first block of 32."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k // 16, 16, generator=g) * 2.0**log2_scale
    w = w * 2.0 ** torch.randint(-16, 1, (n, k // 16, 1), generator=g).float()
    w = w.reshape(n, k) * (torch.rand(n, k, generator=g) < 0.9)
    if zero_block:
        w[0, :32] = 0
    return w.to(dtype)


# ----------------------------------------------------------------------------- the element format


def test_e2m1_codes_decode_to_the_grid():
    codes = torch.arange(16, dtype=torch.uint8)
    values = e2m1_decode(codes)
    assert values.tolist() == E2M1 + [-v for v in E2M1]
    assert torch.signbit(values[8])  # code 8 is -0.0
    assert torch.equal(e2m1_codes(values), codes)


@pytest.mark.parametrize(
    "x, want",
    [(0.25, 0.0), (0.75, 1.0), (1.25, 1.0), (1.75, 2.0), (2.5, 2.0), (3.5, 4.0), (5.0, 4.0),
     (5.01, 6.0), (7.0, 6.0), (1e30, 6.0), (-0.26, -0.5), (-5.0, -4.0)],
)  # fmt: skip
def test_e2m1_ties_to_even_and_saturates(x, want):
    y = torch.tensor([x], dtype=F32)
    got = torch.where(torch.signbit(y), -e2m1_round(y), e2m1_round(y))
    assert got.item() == want == ref_e2m1(x)


@settings(max_examples=300, deadline=None)
@given(st.floats(width=32, allow_nan=False, allow_infinity=False))
def test_e2m1_round_matches_reference(x):
    y = torch.tensor([x], dtype=F32)
    assert e2m1_decode(e2m1_codes(y)).item() == ref_e2m1(x)


@settings(max_examples=300, deadline=None)
@given(st.floats(min_value=2.0**-9, max_value=448.0, width=32))
def test_e4m3_round_matches_reference_and_torch(x):
    v = torch.tensor([x], dtype=F32)
    got = e4m3_round(v).item()
    assert got == ref_e4m3(x) == v.to(torch.float8_e4m3fn).float().item()


def test_e4m3_round_covers_the_grid():
    grid = torch.tensor(E4M3[1:], dtype=F32)  # every positive value, subnormals included
    assert torch.equal(e4m3_round(grid), grid)
    mids = (grid[1:] + grid[:-1]) / 2  # exact ties: to the even mantissa
    assert e4m3_round(mids).tolist() == [ref_e4m3(m) for m in mids.tolist()]


# ----------------------------------------------------------------------------- the schemes


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    n=st.integers(1, 3),
    blocks=st.integers(1, 4),
    log2_scale=st.integers(-30, 30),
)
def test_nvfp4_matches_reference(seed, n, blocks, log2_scale):
    w = weights(seed, n, 32 * blocks, log2_scale)
    want, scales, gs = ref_nvfp4(w)
    p = quantize(w, NV)
    assert p.scales.dtype == torch.float8_e4m3fn and p.global_scale.dtype == F32
    assert p.global_scale.item() == gs
    torch.testing.assert_close(p.scales.float(), scales, **EXACT)
    torch.testing.assert_close(dequantize(p), want, **EXACT)


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    n=st.integers(1, 3),
    blocks=st.integers(1, 3),
    log2_scale=st.integers(-140, 120),
)
def test_mxfp4_matches_reference(seed, n, blocks, log2_scale):
    w = weights(seed, n, 32 * blocks, log2_scale)
    want, exps = ref_mxfp4(w)
    p = quantize(w, MX)
    assert p.scales.dtype == torch.uint8 and p.global_scale is None
    torch.testing.assert_close(p.scales.to(torch.int32) - 127, exps, **EXACT)
    torch.testing.assert_close(dequantize(p), want, **EXACT)


@settings(max_examples=30, deadline=None)
@given(
    fmt=st.sampled_from(list(SCHEMES)),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
    log2_scale=st.integers(-12, 12),
    dim=st.sampled_from([0, 1]),
)
def test_fake_quant_equals_dequantize_of_quantize(fmt, dtype, seed, log2_scale, dim):
    s = SCHEMES[fmt]
    w = weights(seed, 64, 64, log2_scale, dtype, zero_block=True)
    dq = dequantize(quantize(w, s, dim=dim))
    assert dq.dtype == dtype
    assert torch.equal(fake_quantize_values(w, s, dim), dq)
    assert torch.equal(qatpass.fake_quantize(w, s, dim).detach(), dq)
    # bit for bit, signs of zeros included
    assert torch.equal(torch.signbit(fake_quantize_values(w, s, dim)), torch.signbit(dq))


def test_nvfp4_zero_tensor_and_zero_blocks():
    p = quantize(torch.zeros(4, 32), NV)
    assert p.global_scale.item() == 1.0  # 448 * 6 / 0 is not finite
    assert torch.equal(p.scales.float(), torch.full((4, 2), 2.0**-9))  # never 0
    assert torch.equal(dequantize(p), torch.zeros(4, 32))


def test_nvfp4_subnormal_block_scales():
    w = torch.randn(2, 64)
    w[1] *= 2e-5  # row 1's blocks are far below the tensor's amax
    p = quantize(w, NV)
    s = p.scales.float()[1]
    assert bool(((s < 2.0**-6) & (s > 0)).all())  # E4M3 subnormals
    torch.testing.assert_close(dequantize(p), ref_nvfp4(w)[0], **EXACT)


def test_mxfp4_ocp_exponent_and_saturation():
    w = torch.zeros(1, 96)
    w[0, 0] = 6.0 * 2.0**-3  # amax 6 * 2**-3: e = -3, exact
    w[0, 32] = 7.0  # floor(log2 7) - 2 = 0: 7 saturates to 6 (the OCP rule)
    p = quantize(w, MX)  # block 2 is all zeros: e = -127
    assert (p.scales.to(torch.int32) - 127).tolist() == [[-3, 0, -127]]
    dq = dequantize(p)
    assert dq[0, 0].item() == 0.75 and dq[0, 32].item() == 6.0
    assert torch.equal(dq[0, 64:], torch.zeros(32))


def test_fp16_weights_at_the_edge_stay_finite():
    w = torch.full((2, 32), 65504.0, dtype=torch.float16)
    w[1] = -w[1]
    for s in SCHEMES.values():
        dq = dequantize(quantize(w, s))
        assert bool(torch.isfinite(dq).all()) and torch.equal(fake_quantize_values(w, s), dq)


def test_refusals_and_bytes_per_weight():
    assert "block size 16" in NV.check_quantizable((8, 24), 1)
    assert "block size 32" in MX.check_quantizable((8, 48), 1)
    with pytest.raises(ValueError, match="block size 32"):
        quantize(torch.randn(8, 48), MX)
    with pytest.raises(ValueError, match="format must be one of"):
        Fp4Scheme("fp4")
    assert NV.bytes_per_weight(4096) == 0.5625 and MX.bytes_per_weight(4096) == 0.53125
    assert qatpass.Int4Scheme().bytes_per_weight(4096) == 0.5625  # g32, bf16 scales
    p = quantize(torch.randn(64, 128), NV)
    assert p.nbytes() == 64 * 128 * 0.5625 + 4


def test_scheme_names_dicts_and_config():
    for name, s in SCHEMES.items():
        assert parse_scheme(name) == s == Fp4Scheme.from_dict(s.to_dict())
        assert QatConfig.from_options({"scheme": name}).scheme == s
        assert QatConfig(scheme=s.to_dict()).scheme == s
    with pytest.raises(ValueError, match="one of 'int4', 'nvfp4', 'mxfp4'"):
        QatConfig(scheme="fp8")


def test_ste_gradient_is_identity():
    w = torch.randn(16, 64, requires_grad=True)
    for s in SCHEMES.values():
        g = torch.randn(16, 64)
        (qatpass.fake_quantize(w, s) * g).sum().backward()
        assert torch.equal(w.grad, g)
        w.grad = None


# ----------------------------------------------------------------------------- the pass, convert


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 32))


def mlp_reference(m: nn.Module, s: Fp4Scheme, x: torch.Tensor) -> torch.Tensor:
    h = F.gelu(F.linear(x, qatpass.fake_quantize(m[0].weight, s), m[0].bias))
    return F.linear(h, qatpass.fake_quantize(m[2].weight, s), m[2].bias)


@pytest.mark.parametrize("fmt", list(SCHEMES))
def test_pass_train_and_inference_on_an_mlp(fmt):
    m, x, s = mlp(), torch.randn(5, 64), SCHEMES[fmt]
    torch._dynamo.reset()
    y = torch.compile(m, backend="qat4", options={"scheme": fmt, "compiler": "aot_eager"})(x)
    ref = mlp_reference(m, s, x)
    assert torch.equal(y, ref)
    b = qatpass.backend(scheme=s, mode="inference", compiler="aot_eager")
    torch._dynamo.reset()
    with torch.no_grad():
        yi = torch.compile(m, backend=b)(x)
    torch.testing.assert_close(yi, ref.detach(), **ACCUM[F32])  # the CPU kernel's order
    assert b.plan.scheme == s
    torch._dynamo.reset()


@pytest.mark.parametrize("fmt", list(SCHEMES))
def test_convert_serves_dequantized_weights(fmt):
    m, x, s = mlp(), torch.randn(3, 7, 64), SCHEMES[fmt]
    q = qatpass.convert(m, scheme=fmt)
    with torch.no_grad():
        y = q(x)
        w0, w2 = (dequantize(quantize(m[i].weight, s)) for i in (0, 2))
        want = F.linear(F.gelu(F.linear(x, w0, m[0].bias)), w2, m[2].bias)
    torch.testing.assert_close(y, want, **ACCUM[F32])  # the CPU kernel sums in its own order
    assert q[0].packed().scheme == s
    # refresh repacks in place
    with torch.no_grad():
        m[0].weight.mul_(2)
    qatpass.refresh(q, m)
    torch.testing.assert_close(q[0].packed().scheme.dequantize(q[0].packed()),
                               dequantize(quantize(m[0].weight, s)), **EXACT)  # fmt: skip
    # bf16 activations: x @ dequantize(p, bf16).T
    xb = x.bfloat16()
    with torch.no_grad():
        got = qatpass.convert(m.bfloat16(), scheme=s)[0](xb)
    wb = dequantize(quantize(m[0].weight, s), torch.bfloat16)
    torch.testing.assert_close(got, F.linear(xb, wb, m[0].bias), **ACCUM[torch.bfloat16])


def test_serving_op_gradient_wrt_activations():
    m, s = mlp(), NV
    q = qatpass.convert(m, scheme=s)
    x = torch.randn(4, 64, requires_grad=True)
    q[0](x).sum().backward()
    w = dequantize(q[0].packed())
    torch.testing.assert_close(x.grad, torch.ones(4, 64) @ w, **EXACT)


ZOO_CASES = {c.name: c for c in ZOO}


def zoo_reference(model, case, s, inputs):
    params = dict(model.named_parameters())
    fq = {n: qatpass.fake_quantize(params[n], s, dim=d) for n, d in case.expected.items()}
    return torch.func.functional_call(model, fq, inputs)


@pytest.mark.parametrize("fmt", list(SCHEMES))
@pytest.mark.parametrize("name", ["llama", "qwen3_moe", "gpt_oss"])
def test_zoo_training_convert_and_checkpoint(name, fmt, tmp_path):
    """Training == fake-quant reference bit for bit; convert with the plan serves it; a
    compressed-tensors checkpoint reloads to the converted model exactly."""
    case, s = ZOO_CASES[name], SCHEMES[fmt]
    model, inputs = case.model(), case.inputs()
    ref = output_tensors(zoo_reference(model, case, s, inputs))
    torch._dynamo.reset()
    b = qatpass.backend(scheme=s, compiler="aot_eager")
    out = output_tensors(call(torch.compile(model, backend=b), inputs))
    torch._dynamo.reset()
    assert torch.equal(out[0], ref[0])
    assert sorted(b.plan.quantized_names) == sorted(case.expected)
    q = qatpass.convert(model, plan=b.plan)
    with torch.no_grad():
        served = output_tensors(call(q, inputs))
    torch.testing.assert_close(served[0], ref[0].detach(), rtol=1e-5, atol=1e-5)
    qatpass.export.save_compressed_tensors(q, tmp_path / "ckpt")
    loaded = qatpass.export.load_compressed_tensors(tmp_path / "ckpt", model=model)
    with torch.no_grad():
        again = output_tensors(call(loaded, inputs))
    torch.testing.assert_close(again[0], served[0], **EXACT)
    assert loaded.qatpass_plan.scheme == s


# ----------------------------------------------------------------------------- compressed-tensors


ctlib = pytest.importorskip("compressed_tensors")
from compressed_tensors.entrypoints.convert.converters.ct_dequantizer import (  # noqa: E402
    CompressedTensorsDequantizer,
)
from compressed_tensors.quantization import QuantizationConfig  # noqa: E402
from safetensors.torch import load_file  # noqa: E402


@pytest.mark.parametrize("fmt", list(SCHEMES))
@pytest.mark.parametrize("name", ["llama", "qwen3_moe"])
def test_library_decompresses_to_qatpass_dequantize(name, fmt, tmp_path):
    case, s = ZOO_CASES[name], SCHEMES[fmt]
    model = case.model()
    qatpass.export.save_compressed_tensors(model, tmp_path / "ckpt", QatConfig(scheme=s))
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    qc = QuantizationConfig.model_validate(cfg["quantization_config"])
    assert qc.format == f"{fmt}-pack-quantized"
    files = load_file(tmp_path / "ckpt" / "model.safetensors")
    out = CompressedTensorsDequantizer(tmp_path / "ckpt", dtype=torch.bfloat16).validate(files)
    q = qatpass.convert(model, scheme=s)
    checked = 0
    for e in qatpass.packed_weights(q):
        dq = dequantize(e.packed, torch.bfloat16)
        prefix = f"{e.module_name}."
        if e.kind == "linear":
            parts = {e.module_name: dq}
        elif e.attr == "gate_up_proj":
            half = dq.shape[1] // 2
            parts = {f"{prefix}{i}.gate_proj": dq[i, :half] for i in range(dq.shape[0])}
            parts |= {f"{prefix}{i}.up_proj": dq[i, half:] for i in range(dq.shape[0])}
        else:
            parts = {f"{prefix}{i}.{e.attr}": dq[i] for i in range(dq.shape[0])}
        for mname, want in parts.items():
            got = out.pop(f"{mname}.weight")
            assert got.dtype == torch.bfloat16
            assert torch.equal(got.view(torch.int16), want.contiguous().view(torch.int16)), mname
            checked += 1
    assert checked >= 7
    if fmt == "nvfp4":
        files = load_file(tmp_path / "ckpt" / "model.safetensors")  # validate() consumed them
        gs = files[f"{qatpass.packed_weights(q)[0].module_name}.weight_global_scale"]
        assert gs.dtype == F32 and gs.shape == (1,)


def test_torch_export_of_an_fp4_model():
    m, x = mlp(), torch.randn(2, 64)
    q = qatpass.convert(m, scheme=NV)
    ep = torch.export.export(q, (x,))
    assert any("fp4_linear" in str(n.target) for n in ep.graph.nodes)
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(x), q(x), **EXACT)


def test_to_onnx_refuses_fp4_and_says_why(tmp_path):
    pytest.importorskip("onnx")
    q = qatpass.convert(mlp(), scheme=MX)
    with pytest.raises(ValueError, match="onnxruntime .* runs no FP4 ONNX graph"):
        qatpass.export.to_onnx(q, torch.randn(2, 64), tmp_path / "m.onnx")


def test_onnxruntime_has_no_cpu_kernel_for_fp4():
    """The fact behind the refusal: onnxruntime CPU cannot dequantize FLOAT4E2M1 (opset 23)."""
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper, numpy_helper

    w = helper.make_tensor("w", TensorProto.FLOAT4E2M1, [4, 32], vals=bytes(64), raw=True)
    s = numpy_helper.from_array(torch.ones(4, 2).numpy(), "s")
    node = helper.make_node("DequantizeLinear", ["w", "s"], ["y"], axis=1, block_size=16)
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 32])
    g = helper.make_graph([node], "g", [], [out], initializer=[w, s])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 23)], ir_version=11)
    with pytest.raises(Exception, match="NOT_IMPLEMENTED"):
        ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("fmt", list(SCHEMES))
@pytest.mark.parametrize("impl", ["grouped_mm", "batched_mm"])
def test_inference_lowering_uses_the_fp4_ops(impl, fmt):
    """mode="inference" puts every planned matmul of a MoE model on the FP4 ops, no fake quant."""
    from tiny_models import tiny_qwen3_moe

    graphs = []

    class Capture(qatpass.QatBackend):
        def __call__(self, gm, example_inputs):
            gm, _ = self.transform(gm, example_inputs)
            graphs.append(gm)
            return gm.forward

    model, ids = tiny_qwen3_moe(impl), torch.randint(0, 128, (1, 5))
    torch._dynamo.reset()
    with torch.no_grad():
        y = torch.compile(model, backend=Capture(QatConfig(mode="inference", scheme=fmt)))(ids)
        want = qatpass.convert(model, ids, scheme=fmt)(ids)
    torch._dynamo.reset()
    targets = [n.target for g in graphs for n in g.graph.nodes]
    assert targets.count(torch.ops.qatpass.fp4_linear.default) == 8
    assert targets.count(torch.ops.qatpass.fp4_grouped_linear.default) == 4
    assert all(g.meta["qatpass_lowering"] == {"packed": 12, "fake_quant": 0} for g in graphs)
    torch.testing.assert_close(y.logits, want.logits, rtol=1e-5, atol=1e-5)


def test_diff_reports_fp4_fake_equals_real():
    m, x = mlp(), torch.randn(2, 64)
    report = qatpass.diff(m, x, scheme="nvfp4", compiler="aot_eager")
    assert report.config["scheme"] == {"format": "nvfp4"}
    assert report.layers and all(r.fake_vs_real_max_abs == 0 for r in report.layers)
    assert "scheme nvfp4" in report.text()


@pytest.mark.parametrize("fmt", list(SCHEMES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 3, 9])
def test_cpu_kernel_is_x_at_dequantized_weight(fmt, dtype, m):
    """The native FP4 kernel == x @ dequantize(p, float32).T in fp64 terms (summation order)."""
    from qatpass.kernels.cpu.fp4_native import fp4_kernel_reason, fp4_native_linear

    if fp4_kernel_reason(dtype) is not None:
        pytest.skip(fp4_kernel_reason(dtype))
    s = SCHEMES[fmt]
    w = weights(3, 40, 128, 0, zero_block=True)
    p = quantize(w, s)
    x = torch.randn(m, 128).to(dtype)
    y = fp4_native_linear(x, p.qweight, p.scales, p.global_scale, fmt)
    want = x.double() @ dequantize(p, F32).double().t()
    assert y.dtype == F32
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5)
    # the op: bias, leading dims, output dtype
    bias = torch.randn(40).to(dtype)
    x3 = torch.randn(2, m, 128).to(dtype)
    got = torch.ops.qatpass.fp4_linear(x3, p.qweight, p.scales, p.global_scale, bias, fmt=fmt)
    ref = F.linear(x3.float(), dequantize(p, F32), bias.float()).to(dtype)
    assert got.dtype == dtype and got.shape == (2, m, 40)
    torch.testing.assert_close(got, ref, **ACCUM[dtype])


@pytest.mark.parametrize("fmt", list(SCHEMES))
def test_triton_kernel_is_x_at_dequantized_weight(fmt):
    """The Triton FP4 kernel (interpreter on CPU, as conftest sets) == x @ dequantize(p).T."""
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device or TRITON_INTERPRET=1")
    from qatpass.kernels.triton.fp4 import fp4_matmul

    device = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
    s = SCHEMES[fmt]
    w = weights(5, 40, 96, 0, zero_block=True)  # N, K not multiples of the tiles
    p = quantize(w, s)
    for m, dtype in ((1, F32), (5, torch.bfloat16)):
        x = torch.randn(m, 96).to(dtype)
        gs = None if p.global_scale is None else p.global_scale.to(device)
        y = fp4_matmul(x.to(device), p.qweight.to(device), p.scales.to(device), gs, fmt)
        want = x.double() @ dequantize(p, F32).double().t()
        torch.testing.assert_close(y.cpu().double(), want, rtol=1e-5, atol=1e-5)


# The Triton FP4 kernels' own tests (GEMV, GEMM, split-K, sm_90 and sm_100 compile) are in
# tests/test_triton_fp4.py.
