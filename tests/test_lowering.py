"""The W4A16 ops (CPU fast path and fallback) and the backend's inference-mode graph lowering."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny_models import tiny_llama, tiny_qwen3_moe
from torch import nn

import qatpass
from qatpass.config import QatConfig
from qatpass.kernels.cpu.int4pack import _REPACKS, cpu_pack_reason, dequant_linear
from qatpass.lowering.modules import W4A16Linear
from qatpass.passes.lower_w4a16 import lowered_fqns, refresh_compiled
from qatpass.scheme import Int4Scheme, dequantize, quantize

from conftest import ACCUM, EXACT

w4a16_linear = torch.ops.qatpass.w4a16_linear
w4a16_grouped = torch.ops.qatpass.w4a16_grouped_linear
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _packed(n: int, k: int, scheme: Int4Scheme, dtype: torch.dtype, experts: int = 0):
    shape = (experts, n, k) if experts else (n, k)
    return quantize(torch.randn(shape).to(dtype), scheme)


def _exact_weight_ref(x, p, bias):
    """fp32 x @ (fp32 dequantized W).T rounded to x.dtype: what the aten int4 kernel computes."""
    y = x.float() @ dequantize(p, torch.float32).t()
    return (y if bias is None else y + bias.float()).to(x.dtype)


@pytest.mark.parametrize("m", [1, 3, 16, 33])
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("has_bias", [False, True])
def test_fallback_equals_dequantize_then_linear(m, group_size, symmetric, dtype, has_bias):
    p = _packed(48, 256, Int4Scheme(group_size=group_size, symmetric=symmetric), dtype)
    x = torch.randn(m, 256).to(dtype)
    bias = torch.randn(48).to(dtype) if has_bias else None
    y = dequant_linear(x, p.qweight, p.scales, p.zeros, bias, group_size=group_size)
    ref = F.linear(x, dequantize(p, dtype), bias)
    assert y.dtype == dtype and y.shape == (m, 48)
    torch.testing.assert_close(y, ref, **EXACT)


@pytest.mark.parametrize("m", [1, 3, 16, 33])
@pytest.mark.parametrize("group_size", [32, 64, 128, -1, 512])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("has_bias", [False, True])
@pytest.mark.usefixtures("no_native_kernel")
def test_cpu_fast_path(m, group_size, dtype, has_bias):
    scheme = Int4Scheme(group_size=group_size, scale_dtype=dtype)
    p = _packed(64, 512, scheme, dtype)
    assert cpu_pack_reason(64, p.group_size, True, dtype, dtype) is None
    x = torch.randn(2, m, 512).to(dtype)  # leading dims are kept
    bias = torch.randn(64).to(dtype) if has_bias else None
    y = w4a16_linear(x, p.qweight, p.scales, None, bias, group_size=group_size)
    assert y.shape == (2, m, 64) and y.dtype == dtype
    torch.testing.assert_close(y, _exact_weight_ref(x, p, bias), **ACCUM[dtype])
    # and the fake-quant forward up to the rounding of the weights (which the kernel skips) and
    # of both outputs to dtype: a few units of 2^-9 (bf16) / 2^-12 (fp16), in norm
    ref = F.linear(x, dequantize(p, dtype), bias).float()
    rel = (y.float() - ref).norm() / ref.norm()
    assert rel < 4 * (2**-9 if dtype == torch.bfloat16 else 2**-12)


@pytest.mark.parametrize("lead", [(), (3,), (2, 3)])
def test_module_call_skips_the_dispatcher_only_where_nothing_watches(lead):
    """In eager CPU inference a module call goes straight to `kernels.cpu.linear`; under a
    dispatch mode, or with autograd on, it goes through the op, and the results are the same
    bits either way."""
    from torch.utils._python_dispatch import TorchDispatchMode

    lin = nn.Linear(256, 64).to(torch.bfloat16)
    module = W4A16Linear.from_linear(lin, Int4Scheme())
    x = torch.randn(*lead, 256).bfloat16()
    seen = []

    class Seen(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    with torch.no_grad():
        direct = module(x)
        with Seen():
            watched = module(x)
    assert any(name.startswith("qatpass.w4a16_linear") for name in seen), seen
    xg = x.clone().requires_grad_(True)
    graded = module(xg)
    assert graded.grad_fn is not None
    assert direct.shape == (*lead, 64)
    assert torch.equal(direct, watched) and torch.equal(direct, graded.detach())
    ref = torch.ops.qatpass.w4a16_linear(
        x, module.qweight, module.scales, None, module.bias, group_size=32
    )
    assert torch.equal(direct, ref)


@pytest.mark.usefixtures("no_native_kernel")
def test_cpu_fast_path_is_exact_at_small_m():
    """At M=1 the kernel's fp32 dot rounded once equals the fp32 reference rounded once."""
    p = _packed(64, 256, Int4Scheme(), torch.bfloat16)
    x = torch.randn(1, 256).bfloat16()
    y = w4a16_linear(x, p.qweight, p.scales, group_size=32)
    torch.testing.assert_close(y, _exact_weight_ref(x, p, None), **EXACT)


@pytest.mark.usefixtures("no_native_kernel")
def test_cpu_repack_is_cached_and_follows_in_place_writes():
    """The aten repack is built once per weight and rebuilt after an in-place write (refresh)."""
    p = _packed(64, 256, Int4Scheme(), torch.bfloat16)
    x = torch.randn(1, 256).bfloat16()
    w4a16_linear(x, p.qweight, p.scales, group_size=32)
    first = _REPACKS[p.qweight][1][0]
    w4a16_linear(x, p.qweight, p.scales, group_size=32)
    assert _REPACKS[p.qweight][1][0] is first
    new = quantize(torch.randn(64, 256).bfloat16(), Int4Scheme())
    p.qweight.copy_(new.qweight)
    p.scales.copy_(new.scales)
    y = w4a16_linear(x, p.qweight, p.scales, group_size=32)
    assert _REPACKS[p.qweight][1][0] is not first
    torch.testing.assert_close(y, _exact_weight_ref(x, new, None), **EXACT)


@pytest.mark.parametrize(
    ("n", "group_size", "symmetric", "scale_dtype", "dtype", "why"),
    [
        (64, 32, True, torch.bfloat16, torch.float32, "activation dtype"),
        (64, 32, True, torch.bfloat16, torch.float16, "scale dtype"),
        (64, 32, False, torch.bfloat16, torch.bfloat16, "asymmetric"),
        (40, 32, True, torch.bfloat16, torch.bfloat16, "multiple of 16"),
        (64, 16, True, torch.bfloat16, torch.bfloat16, "multiple of 32"),
    ],
)
def test_cpu_fast_path_refusals(n, group_size, symmetric, scale_dtype, dtype, why):
    assert why in cpu_pack_reason(n, group_size, symmetric, scale_dtype, dtype)


@pytest.mark.usefixtures("no_native_kernel")
def test_fp32_activations_fall_back_without_the_native_kernel():
    p = _packed(64, 128, Int4Scheme(), torch.bfloat16)
    x = torch.randn(3, 128)  # fp32 activations: aten's int4 GEMM does not apply
    y = w4a16_linear(x, p.qweight, p.scales, group_size=32)
    torch.testing.assert_close(y, F.linear(x, dequantize(p, torch.float32)), **EXACT)


@pytest.mark.parametrize(("fast", "symmetric"), [(False, False), (True, True)])
@pytest.mark.usefixtures("no_native_kernel")
def test_grouped_op(fast, symmetric):
    p = _packed(32, 64, Int4Scheme(symmetric=symmetric), torch.bfloat16, experts=4)
    x = torch.randn(7, 64).bfloat16()
    ids = torch.tensor([3, 0, 3, 1, 3, 0, 1])  # unsorted, expert 2 unused
    bias = torch.randn(4, 32).bfloat16()
    y = w4a16_grouped(x, p.qweight, p.scales, ids, p.zeros, bias, group_size=32)
    if fast:  # the kernel's weights are the fp32 dequant, not rounded to bf16
        w = dequantize(p, torch.float32)
        rows = [F.linear(x[t].float(), w[ids[t]], bias[ids[t]].float()) for t in range(7)]
        torch.testing.assert_close(y, torch.stack(rows).bfloat16(), **ACCUM[torch.bfloat16])
    else:
        w = dequantize(p, torch.bfloat16)
        ref = torch.stack([F.linear(x[t], w[ids[t]], bias[ids[t]]) for t in range(7)])
        torch.testing.assert_close(y, ref, **EXACT)


def test_grouped_op_bad_ids():
    p = _packed(32, 64, Int4Scheme(), torch.float32, experts=2)
    x = torch.randn(3, 64)
    with pytest.raises(ValueError, match=r"lie in \[0, 2\)"):
        w4a16_grouped(x, p.qweight, p.scales, torch.tensor([0, 2, 1]), group_size=32)
    with pytest.raises(ValueError, match="2 expert ids for 3 rows"):
        w4a16_grouped(x, p.qweight, p.scales, torch.tensor([0, 1]), group_size=32)
    with pytest.raises(TypeError, match="expert_ids"):
        w4a16_grouped(x, p.qweight, p.scales, torch.tensor([0.0, 1.0, 1.0]), group_size=32)


def _bad_args():
    p = _packed(32, 64, Int4Scheme(), torch.float32)
    x = torch.randn(2, 64)
    ok = {"x": x, "qweight": p.qweight, "scales": p.scales, "group_size": 32}
    return [
        ({**ok, "x": x.to(torch.int32)}, TypeError, "x must be"),
        ({**ok, "x": torch.randn(2, 48)}, ValueError, "x has K=48"),
        ({**ok, "qweight": p.qweight.view(torch.uint8)}, TypeError, "qweight must be int32"),
        ({**ok, "qweight": p.qweight[None]}, ValueError, r"qweight must be \[N, K/8\]"),
        ({**ok, "group_size": 48}, ValueError, "not divisible by group_size 48"),
        ({**ok, "scales": p.scales[:, :1]}, ValueError, "scales must have shape"),
        ({**ok, "zeros": torch.zeros(32, 2)}, TypeError, "zeros must be int8"),
        ({**ok, "bias": torch.zeros(31)}, ValueError, "bias must have shape"),
        ({**ok, "scales": p.scales.to("meta")}, ValueError, "scales is on meta"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_args())))
def test_op_refuses_bad_input(case):
    kwargs, exc, match = _bad_args()[case]
    if exc is None:  # an incomplete cache is ignored, not an error
        w4a16_linear(**kwargs)
        return
    with pytest.raises(exc, match=match):
        w4a16_linear(**kwargs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_op_under_compile_aot_eager(dtype):
    lin = W4A16Linear(_packed(64, 128, Int4Scheme(), dtype), torch.randn(64).to(dtype))
    x = torch.randn(5, 128).to(dtype)
    compiled = torch.compile(lin, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), lin(x), **EXACT)


def test_op_under_inductor():
    lin = W4A16Linear(_packed(64, 128, Int4Scheme(), torch.bfloat16), None)
    assert lin.cpu_fast_path_reason is None
    x = torch.randn(4, 128).bfloat16()
    compiled = torch.compile(lin, backend="inductor", fullgraph=True)
    torch.testing.assert_close(compiled(x), lin(x), **ACCUM[torch.bfloat16])


class _Logits(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(ids, use_cache=False).logits


def test_export_keeps_op_and_reads_canonical_buffers():
    qmodel = _Logits(qatpass.lowering.convert(tiny_llama().to(torch.bfloat16)))
    ids = torch.randint(0, 128, (2, 5))
    ep = torch.export.export(qmodel, (ids,))
    nodes = [n for n in ep.graph.nodes if n.target is torch.ops.qatpass.w4a16_linear.default]
    assert len(nodes) == 14
    names = {**ep.graph_signature.inputs_to_buffers, **ep.graph_signature.inputs_to_parameters}
    used = {names.get(a.name, a.name) for n in nodes for a in n.all_input_nodes}
    assert any(u.endswith("q_proj.qweight") for u in used)
    assert not any("cpu_" in u for u in used)  # the CPU repack stays out of exports
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(ids), qmodel(ids), **ACCUM[torch.bfloat16])


# --- inference mode of the qat4 backend -------------------------------------------------------


def _train_forward(model, ids):
    torch._dynamo.reset()
    with torch.no_grad():
        return torch.compile(model, backend=qatpass.backend(compiler="aot_eager"))(ids).logits


def _inference(model, compiler="aot_eager"):
    torch._dynamo.reset()
    backend = qatpass.backend(compiler=compiler, mode="inference")
    return torch.compile(model, backend=backend), backend


@pytest.mark.parametrize(
    ("make", "dtype"),
    [
        (tiny_llama, torch.float32),
        (tiny_llama, torch.bfloat16),
        (lambda: tiny_qwen3_moe("grouped_mm"), torch.float32),  # transformers' grouped_mm op
        (lambda: tiny_qwen3_moe("grouped_mm"), torch.bfloat16),  # torch._grouped_mm
        (lambda: tiny_qwen3_moe("batched_mm"), torch.bfloat16),  # gather + bmm
    ],
)
def test_inference_mode_matches_fake_quant_training(make, dtype):
    model = make().to(dtype)
    ids = torch.randint(0, 128, (2, 7))
    compiled, backend = _inference(model)
    with torch.no_grad():
        y = compiled(ids).logits
    assert backend.summaries and all(s.mode == "inference" for s in backend.summaries)
    torch.testing.assert_close(y, _train_forward(model, ids), **ACCUM[dtype])


def _lowered_graph(model, inputs, config=None):
    """The graphs the backend's inference mode produced for model, and the model's output."""
    graphs = []

    class Capture(qatpass.QatBackend):
        def __call__(self, gm, example_inputs):
            gm, _ = self.transform(gm, example_inputs)
            graphs.append(gm)
            return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(model, backend=Capture(config or QatConfig(mode="inference")))(inputs)
    return graphs, out


@pytest.mark.parametrize("impl", ["grouped_mm", "batched_mm"])
def test_lowered_graph_holds_the_ops_and_no_fake_quant(impl):
    graphs, _ = _lowered_graph(tiny_qwen3_moe(impl), torch.randint(0, 128, (1, 5)))
    targets = [n.target for g in graphs for n in g.graph.nodes]
    assert targets.count(torch.ops.qatpass.w4a16_linear.default) == 8
    assert targets.count(torch.ops.qatpass.w4a16_grouped_linear.default) == 4
    assert torch.ops.qatpass.fake_quantize_int4.default not in targets
    assert all(g.meta["qatpass_lowering"] == {"packed": 12, "fake_quant": 0} for g in graphs)


class _Odd(nn.Module):
    """A linear weight reached through .t() and matmul: no lowering pattern, fake quant instead."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(32, 64))
        self.fc = nn.Linear(32, 16)

    def forward(self, x):
        return self.fc(torch.matmul(x, self.w.t()))


def test_unmatched_use_gets_fake_quant():
    model = _Odd()
    x = torch.randn(3, 64)
    captured, y = _lowered_graph(model, x, QatConfig(mode="inference", exclude=()))
    assert captured[0].meta["qatpass_lowering"] == {"packed": 1, "fake_quant": 1}
    torch._dynamo.reset()
    with torch.no_grad():
        ref = torch.compile(model, backend=qatpass.backend(compiler="aot_eager", exclude=()))(x)
    torch.testing.assert_close(y, ref, **ACCUM[torch.float32])


def test_refresh_compiled_after_optimizer_step():
    model = tiny_llama().to(torch.bfloat16)
    ids = torch.randint(0, 128, (2, 7))
    compiled, _ = _inference(model)
    with torch.no_grad():
        before = compiled(ids).logits
    assert set(lowered_fqns()) >= {"model.layers.0.self_attn.q_proj.weight"}
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model.train()
    trainer = torch.compile(model, backend=qatpass.backend(compiler="aot_eager"))
    trainer(ids, labels=ids).loss.backward()
    opt.step()
    model.eval()
    assert refresh_compiled(model) == 14
    with torch.no_grad():
        after = compiled(ids).logits  # same compiled graph, repacked constants
    assert not torch.equal(after, before)
    torch.testing.assert_close(after, _train_forward(model, ids), **ACCUM[torch.bfloat16])
