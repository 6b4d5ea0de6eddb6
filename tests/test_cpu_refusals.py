"""Bad shapes never reach the native C code: the registered CPU ops, `kernels.cpu.linear` /
`grouped_linear` and the native entry points each refuse them with an error naming the
argument (issue 11: before, 8 of 8 such calls crashed the process or read out of bounds)."""

from __future__ import annotations

import pytest
import torch

from qatpass.kernels import cpu as kernels_cpu
from qatpass.kernels.cpu.gemm import gemm_linear
from qatpass.kernels.cpu.native import library, run_native
from qatpass.scheme import Int4Scheme, quantize

from conftest import needs_native

N, K, G = 64, 256, 32


def _args(symmetric=False):
    scheme = Int4Scheme(group_size=G, symmetric=symmetric, qrange=(-7, 7) if symmetric else (-8, 7))
    p = quantize(torch.randn(N, K).bfloat16(), scheme)
    x = torch.randn(3, K).bfloat16()
    return {"x": x, "qweight": p.qweight, "scales": p.scales, "zeros": p.zeros,
            "bias": torch.randn(N).bfloat16(), "group_size": G}  # fmt: skip


# (name, change to the arguments, the words the error must contain)
BAD = [
    ("K of x", lambda a: a.update(x=torch.randn(3, K - 32).bfloat16()), "K"),
    ("qweight too short", lambda a: a.update(qweight=a["qweight"][:, :-4]), "qweight"),
    ("qweight rows", lambda a: a.update(qweight=a["qweight"][:-1]), "scales"),
    ("qweight 1-d", lambda a: a.update(qweight=a["qweight"].reshape(-1)), "qweight"),
    ("qweight dtype", lambda a: a.update(qweight=a["qweight"].long()), "qweight"),
    ("scales groups", lambda a: a.update(scales=a["scales"][:, :-1]), "scales"),
    ("scales rows", lambda a: a.update(scales=a["scales"][:-1]), "scales"),
    ("scales dtype", lambda a: a.update(scales=a["scales"].to(torch.int32)), "scales"),
    ("zeros groups", lambda a: a.update(zeros=a["zeros"][:, :-1]), "zeros"),
    ("zeros dtype", lambda a: a.update(zeros=a["zeros"].int()), "zeros"),
    ("bias length", lambda a: a.update(bias=a["bias"][:-1]), "bias"),
    ("group size not dividing K", lambda a: a.update(group_size=96), "group"),
    ("group size zero", lambda a: a.update(group_size=0), "group"),
]


def _op(a):
    return torch.ops.qatpass.w4a16_linear_cpu(
        a["x"], a["qweight"], a["scales"], a["zeros"], a["bias"], a["group_size"]
    )


def _kernels_linear(a):
    return kernels_cpu.linear(a["x"], a["qweight"], a["scales"], a["zeros"], a["bias"],
                              group_size=a["group_size"])  # fmt: skip


def _run_native(a):
    return run_native(library(), a["x"], a["qweight"], a["scales"], a["zeros"], a["bias"],
                      a["group_size"])  # fmt: skip


def _gemm(a):
    return gemm_linear(library(), a["x"], a["qweight"], a["scales"], a["zeros"], a["bias"],
                       a["group_size"])  # fmt: skip


ENTRIES = {"registered op": _op, "kernels.cpu.linear": _kernels_linear}


@pytest.mark.parametrize("entry", list(ENTRIES))
@pytest.mark.parametrize(("what", "change", "words"), BAD, ids=[b[0] for b in BAD])
def test_bad_shapes_are_refused_by_name(entry, what, change, words):
    a = _args()
    change(a)
    with pytest.raises((ValueError, TypeError, RuntimeError), match=words):
        ENTRIES[entry](a)


@needs_native
@pytest.mark.parametrize("entry", [_run_native, _gemm], ids=["run_native", "gemm_linear"])
@pytest.mark.parametrize(("what", "change", "words"), BAD, ids=[b[0] for b in BAD])
def test_the_native_entries_check_the_invariants_themselves(entry, what, change, words):
    """Even called directly, past every public validator, the C code gets checked buffers."""
    a = _args()
    change(a)
    with pytest.raises(ValueError, match="native kernel"):
        entry(a)


@needs_native
def test_the_native_entries_refuse_x_of_the_wrong_rank_or_device():
    a = _args()
    a["x"] = a["x"][None]
    with pytest.raises(ValueError, match="2-d"):
        _run_native(a)
    a = _args()
    a["x"] = a["x"].half()
    with pytest.raises(ValueError, match="bfloat16/float32"):
        _run_native(a)
    a = _args()
    a["x"] = a["x"].float()
    with pytest.raises(ValueError, match="bfloat16"):
        _gemm(a)


def test_the_registered_op_refuses_x_that_is_not_2d():
    a = _args()
    a["x"] = a["x"][None]
    with pytest.raises(ValueError, match=r"\[M, K\]"):
        _op(a)


@pytest.mark.parametrize("layout", ["strided x", "transposed qweight"])
def test_strided_inputs_are_read_right(layout):
    """Valid but non-contiguous tensors: the C code gets unit-stride rows (or a copy)."""
    a = _args(symmetric=True)
    p_w = dequantize_weight(a)
    ref = torch.nn.functional.linear(a["x"].float(), p_w, a["bias"].float())
    if layout == "strided x":
        wide = torch.randn(3, 2 * K).bfloat16()
        wide[:, ::2] = a["x"]
        a["x"] = wide[:, ::2]
    else:
        a["qweight"] = a["qweight"].t().contiguous().t()
    torch.testing.assert_close(_op(a).float(), ref, atol=5e-2, rtol=2e-2)


def dequantize_weight(a):
    from qatpass.kernels.cpu.int4pack import dequant_weight

    return dequant_weight(a["qweight"], a["scales"], a["zeros"], group_size=G, dtype=torch.float32)


GROUPED_BAD = [
    ("expert id too large", lambda a: a.update(ids=torch.tensor([0, 2, 1])), "expert_ids"),
    ("negative expert id", lambda a: a.update(ids=torch.tensor([0, -1, 1])), "expert_ids"),
    ("ids length", lambda a: a.update(ids=torch.tensor([0, 1])), "expert ids"),
    ("ids dtype", lambda a: a.update(ids=torch.tensor([0.0, 1.0, 1.0])), "expert_ids"),
    ("qweight without experts", lambda a: a.update(qweight=a["qweight"][0]), "qweight"),
    ("scales of one expert fewer", lambda a: a.update(scales=a["scales"][:1]), "scales"),
    ("scales groups", lambda a: a.update(scales=a["scales"][..., :-1]), "scales"),
    ("bias per expert", lambda a: a.update(bias=a["bias"][0]), "bias"),
]


def _grouped_args():
    p = quantize(torch.randn(2, N, K).bfloat16(), Int4Scheme(group_size=G))
    return {"x": torch.randn(3, K).bfloat16(), "qweight": p.qweight, "scales": p.scales,
            "zeros": None, "bias": torch.randn(2, N).bfloat16(), "ids": torch.tensor([0, 1, 1])}  # fmt: skip


@pytest.mark.parametrize("entry", ["registered op", "kernels.cpu.grouped_linear"])
@pytest.mark.parametrize(("what", "change", "words"), GROUPED_BAD, ids=[b[0] for b in GROUPED_BAD])
def test_the_grouped_entries_refuse_bad_shapes(entry, what, change, words):
    a = _grouped_args()
    change(a)
    if entry == "registered op":
        call = torch.ops.qatpass.w4a16_grouped_linear_cpu
        args = (a["x"], a["qweight"], a["scales"], a["zeros"], a["bias"], a["ids"], G)
        with pytest.raises((ValueError, TypeError, RuntimeError), match=words):
            call(*args)
    else:
        with pytest.raises((ValueError, TypeError, RuntimeError, IndexError)):
            kernels_cpu.grouped_linear(a["x"], a["qweight"], a["scales"], a["zeros"], a["bias"],
                                       a["ids"], group_size=G)  # fmt: skip


def test_the_grouped_op_matches_per_expert_linears():
    a = _grouped_args()
    y = torch.ops.qatpass.w4a16_grouped_linear_cpu(
        a["x"], a["qweight"], a["scales"], None, a["bias"], a["ids"], G
    )
    for t, e in enumerate(a["ids"].tolist()):
        want = kernels_cpu.linear(a["x"][t : t + 1], a["qweight"][e], a["scales"][e], None,
                                  a["bias"][e], group_size=G)  # fmt: skip
        torch.testing.assert_close(y[t : t + 1], want, rtol=0, atol=0)
