"""`qatpass.convert` / `refresh` / `packed_weights`: packed models equal the fake-quant forward."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from tiny_models import LLAMA_QUANTIZED, MOE_QUANTIZED, tiny_llama, tiny_qwen3_moe
from torch import nn

import qatpass
from qatpass.config import QatConfig
from qatpass.kernels.cpu.native import disabled
from qatpass.lowering import (
    W4A16Experts,
    W4A16Linear,
    convert,
    install_packed,
    packed_weights,
    refresh,
)
from qatpass.scheme import Int4Scheme, dequantize, quantize
from qatpass.selection import select_weights

from conftest import ACCUM, EXACT, needs_native


def _fake_quant_copy(model: nn.Module, config: QatConfig | None = None) -> nn.Module:
    """Eager reference: the model with each selected weight replaced by dequantize(quantize(w))."""
    config = config or QatConfig()
    ref = copy.deepcopy(model)
    selected, _ = select_weights(ref, config)
    params = dict(ref.named_parameters())
    with torch.no_grad():
        for s in selected:
            p = params[s.fqn]
            p.copy_(dequantize(quantize(p, config.scheme, s.dim)))
    return ref


def _compiled_training_forward(model, ids):
    torch._dynamo.reset()
    with torch.no_grad():
        return torch.compile(model, backend=qatpass.backend(compiler="aot_eager"))(ids).logits


MODELS = {
    "llama": tiny_llama,
    "moe_eager": lambda: tiny_qwen3_moe("eager"),
    "moe_batched_mm": lambda: tiny_qwen3_moe("batched_mm"),
    "moe_grouped_mm": lambda: tiny_qwen3_moe("grouped_mm"),
}


@pytest.mark.parametrize("model_id", list(MODELS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_convert_matches_fake_quant_forward(model_id, dtype):
    model = MODELS[model_id]().to(dtype)
    ids = torch.randint(0, 128, (2, 7))
    qmodel = convert(model)
    with torch.no_grad():
        y = qmodel(ids).logits
        eager_ref = _fake_quant_copy(model)(ids).logits
    torch.testing.assert_close(y, eager_ref, **ACCUM[dtype])
    if model_id != "moe_eager":  # the eager experts loop is not captured by torch.compile
        torch.testing.assert_close(y, _compiled_training_forward(model, ids), **ACCUM[dtype])


@pytest.mark.parametrize("model_id", ["llama", "moe_grouped_mm"])
def test_convert_replaces_the_selected_modules(model_id):
    model = MODELS[model_id]()
    qmodel = convert(model)
    entries = packed_weights(qmodel)
    want = LLAMA_QUANTIZED if model_id == "llama" else MOE_QUANTIZED
    got = {f"{e.module_name}.{e.attr}" for e in entries}
    assert got == want
    state = qmodel.state_dict()
    params = dict(model.named_parameters())
    for e in entries:
        assert all(name in state for name in e.names)
        assert not any("cpu_" in name for name in e.names)
        ref = quantize(params[f"{e.module_name}.{e.attr}"], Int4Scheme(), e.packed.dim)
        torch.testing.assert_close(e.packed.qweight, ref.qweight, **EXACT)
        torch.testing.assert_close(e.packed.scales, ref.scales, **EXACT)
        assert e.packed.shape == ref.shape and e.packed.dtype == ref.dtype
    assert not any(isinstance(m, nn.Linear) and "proj" in n for n, m in qmodel.named_modules())
    assert isinstance(qmodel.lm_head, nn.Linear)  # excluded by default
    kinds = {type(m) for m in qmodel.modules()}
    assert W4A16Linear in kinds
    assert (W4A16Experts in kinds) == (model_id != "llama")


def test_convert_leaves_the_model_untouched():
    model = tiny_qwen3_moe()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    types = [type(m) for m in model.modules()]
    convert(model)
    assert [type(m) for m in model.modules()] == types
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_convert_inplace_and_config_forms():
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16))
    scheme = Int4Scheme(group_size=64, symmetric=False)
    a = convert(model, scheme=scheme, exclude=())
    b = convert(model, QatConfig(scheme=scheme, exclude=()))  # config given positionally
    c = convert(model, config=QatConfig(scheme=scheme), exclude=(), include=r"^0\.")
    x = torch.randn(5, 64)
    torch.testing.assert_close(a(x), b(x), **EXACT)
    assert isinstance(c[0], W4A16Linear) and isinstance(c[2], nn.Linear)
    assert a[0].group_size == 64 and a[0].zeros is not None
    assert isinstance(a[2], nn.Linear)  # K=32 is not divisible by group_size 64: left as is
    same = convert(model, exclude=(), inplace=True)
    assert same is model and isinstance(model[0], W4A16Linear)


def test_convert_root_linear():
    linear = nn.Linear(64, 16)
    qlinear = convert(linear, exclude=())
    assert isinstance(qlinear, W4A16Linear)
    x = torch.randn(3, 64)
    ref = nn.functional.linear(x, dequantize(quantize(linear.weight)), linear.bias)
    torch.testing.assert_close(qlinear(x), ref, **ACCUM[torch.float32])
    with disabled():  # the fallback is the fake-quant forward bit for bit
        torch.testing.assert_close(qlinear(x), ref, **EXACT)


@needs_native
def test_native_cpu_kernel_is_taken_without_a_repack():
    for dtype in (torch.bfloat16, torch.float32):
        qmodel = convert(tiny_llama().to(dtype))
        q_proj = qmodel.model.layers[0].self_attn.q_proj
        assert q_proj.cpu_path == "native" and q_proj.cpu_fast_path_reason is None
        assert set(q_proj.state_dict()) == {"qweight", "scales"}  # no repack held


@pytest.mark.usefixtures("no_native_kernel")
def test_aten_int4_path_is_taken_for_bf16():
    qmodel = convert(tiny_llama().to(torch.bfloat16))
    q_proj = qmodel.model.layers[0].self_attn.q_proj
    assert q_proj.cpu_path == "int4pack" and q_proj.cpu_fast_path_reason is None
    assert set(q_proj.state_dict()) == {"qweight", "scales"}  # the repack is the kernel's cache
    fp32 = convert(tiny_llama()).model.layers[0].self_attn.q_proj
    assert fp32.cpu_path == "dequant"
    assert "activation dtype" in fp32.cpu_fast_path_reason


@pytest.mark.parametrize("model_id", ["llama", "moe_grouped_mm"])
def test_refresh_after_optimizer_step(model_id):
    model = MODELS[model_id]().to(torch.bfloat16)
    ids = torch.randint(0, 128, (2, 7))
    qmodel = convert(model)
    buffers = {n: b.data_ptr() for n, b in qmodel.named_buffers()}
    compiled = torch.compile(qmodel, backend="aot_eager")
    with torch.no_grad():
        before = compiled(ids).logits
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model(ids, labels=ids).loss.backward()
    opt.step()
    model.eval()
    assert refresh(qmodel, model) is qmodel
    assert {n: b.data_ptr() for n, b in qmodel.named_buffers()} == buffers  # in place
    fresh = convert(model)
    for a, b in zip(packed_weights(qmodel), packed_weights(fresh), strict=True):
        torch.testing.assert_close(a.packed.qweight, b.packed.qweight, **EXACT)
        torch.testing.assert_close(a.packed.scales, b.packed.scales, **EXACT)
    with torch.no_grad():
        after = compiled(ids).logits  # the compiled graph reads the refreshed buffers
        assert not torch.equal(after, before)
        torch.testing.assert_close(after, fresh(ids).logits, **EXACT)


def test_install_packed_round_trip():
    model = tiny_qwen3_moe()
    qmodel = convert(model)
    weights = {(e.module_name, e.attr): (e.kind, e.packed) for e in packed_weights(qmodel)}
    rebuilt = install_packed(copy.deepcopy(model), weights)
    ids = torch.randint(0, 128, (1, 6))
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(ids).logits, qmodel(ids).logits, **EXACT)


def test_refusals():
    model = nn.Sequential(nn.Linear(64, 32))
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        convert("model")
    with pytest.raises(TypeError, match="scheme must be a QuantScheme"):
        convert(model, scheme={"group_size": 32})
    bad = nn.Sequential(nn.Linear(64, 32))
    with torch.no_grad():
        bad[0].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        convert(bad, exclude=())
    with pytest.raises(ValueError, match="no packed modules"):
        refresh(model, model)
    qmodel = convert(model, exclude=())
    with pytest.raises(ValueError, match="no module"):
        refresh(qmodel, nn.Sequential())
    with pytest.raises(ValueError, match=r"0\.weight has shape \(32, 32\) in model"):
        refresh(qmodel, nn.Sequential(nn.Linear(32, 32)))
    p = quantize(torch.randn(16, 64))
    with pytest.raises(ValueError, match="packed shape"):
        install_packed(nn.Sequential(nn.Linear(64, 32)), {("0", "weight"): ("linear", p)})
    with pytest.raises(ValueError, match="unknown kind"):
        install_packed(nn.Sequential(nn.Linear(64, 16)), {("0", "weight"): ("conv", p)})


def test_k_not_divisible_by_group_is_left_in_high_precision():
    model = nn.Sequential(nn.Linear(48, 16))  # 48 % 32 != 0
    qmodel = convert(model, exclude=())
    assert isinstance(qmodel[0], nn.Linear)
    assert packed_weights(qmodel) == []


def test_wrong_device_input_is_refused():
    qlinear = convert(nn.Linear(64, 16), exclude=())
    with pytest.raises(ValueError, match="is on cpu but x is on meta"):
        qlinear(torch.randn(2, 64, device="meta"))
    with pytest.raises(TypeError, match="x must be float16, bfloat16 or float32"):
        qlinear(torch.ones(2, 64, dtype=torch.int64))


def _tiny_gpt_oss(impl: str) -> nn.Module:
    """Experts stored transposed [E, K, N], with biases and a custom gate (clamped SwiGLU)."""
    import transformers

    cfg = transformers.GptOssConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_local_experts=4,
        num_experts_per_tok=2,
        layer_types=["full_attention"],
    )
    cfg._experts_implementation = impl
    model = transformers.GptOssForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("_bias"):
                p.normal_(0, 0.1)
    return model


@pytest.mark.parametrize("impl", ["eager", "grouped_mm"])
def test_convert_transposed_experts_with_bias_and_custom_gate(impl):
    model = _tiny_gpt_oss(impl)
    qmodel = convert(model)
    experts = qmodel.model.layers[0].mlp.experts
    assert isinstance(experts, W4A16Experts) and experts.is_transposed and experts.has_bias
    ids = torch.randint(0, 128, (2, 6))
    with torch.no_grad():
        y = qmodel(ids).logits
        ref = _fake_quant_copy(model)(ids).logits
    torch.testing.assert_close(y, ref, **ACCUM[torch.float32])


def test_dtype_casts_keep_the_scales():
    linear = nn.Linear(64, 32).bfloat16()
    qlinear = convert(linear, exclude=()).half()
    assert qlinear.scales.dtype == torch.bfloat16 and qlinear.bias.dtype == torch.float16
    x = torch.randn(3, 64).half()
    p = quantize(linear.weight)
    ref = nn.functional.linear(x, dequantize(p, torch.float16), linear.bias.half())
    torch.testing.assert_close(qlinear(x), ref, **EXACT)


def test_per_channel_with_k_not_a_power_of_two():
    from qatpass.lowering import convert

    scheme = qatpass.Int4Scheme(group_size=-1)
    m = torch.nn.Linear(48, 16)
    x = torch.randn(2, 48)
    ref = torch.nn.functional.linear(x, qatpass.fake_quantize(m.weight, scheme), m.bias)
    torch.testing.assert_close(convert(m, scheme)(x), ref, rtol=1e-5, atol=1e-5)


def test_refresh_is_all_or_nothing_and_names_the_bad_weight():
    model = tiny_llama()
    qmodel = convert(model)
    before = {k: v.clone() for k, v in qmodel.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)  # every weight changes ...
        model.model.layers[1].mlp.down_proj.weight[3, 5] = float("nan")  # ... and a late one is bad
    with pytest.raises(ValueError, match=r"refresh: model\.layers\.1\.mlp\.down_proj\.weight: "):
        refresh(qmodel, model)
    after = qmodel.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing was written


def test_convert_names_the_bad_weight_and_leaves_the_model_alone():
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[0].self_attn.k_proj.weight[0, 0] = float("inf")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"convert: model\.layers\.0\.self_attn\.k_proj\.weight"):
        convert(model)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert type(model.model.layers[0].self_attn.k_proj) is torch.nn.Linear


class _BareLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(32, 64))

    def forward(self, x):
        return F.linear(x, self.w)


def test_a_bare_parameter_is_served_packed_and_survives_deepcopy():
    from qatpass.lowering.packed_tensor import PackedTensor

    model, x = _BareLinear(), torch.randn(3, 64)
    qmodel = convert(model, (x,))
    assert isinstance(qmodel.w, PackedTensor) and qmodel.w.shape == (32, 64)
    twin = copy.deepcopy(qmodel)
    assert isinstance(twin.w, PackedTensor) and twin.w.packed.qweight is not qmodel.w.packed.qweight
    torch.testing.assert_close(twin(x), qmodel(x), **EXACT)
    ref = F.linear(x, qatpass.fake_quantize(model.w.detach(), dim=1))
    torch.testing.assert_close(qmodel(x), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"parameters model code uses directly \(\['w'\]\)"):
        qatpass.export.save_compressed_tensors(qmodel, "unused")
