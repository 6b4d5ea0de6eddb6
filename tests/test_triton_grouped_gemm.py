"""The sorted-by-expert grouped GEMM (MoE prefill) against the per-row reference, in the
Triton interpreter (fp32 dot operands there), and the plan that picks it by routed rows."""

from __future__ import annotations

import os

import pytest
import torch

import qatpass
from qatpass.kernels.triton import grouped_gemm, plan, w4a16_grouped_matmul

from conftest import ACCUM, EXACT

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
    reason="needs a CUDA device or TRITON_INTERPRET=1",
)
DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"


def _packed(shape, group_size, symmetric):
    scheme = qatpass.Int4Scheme(
        group_size=group_size, symmetric=symmetric, qrange=(-7, 7) if symmetric else (-8, 7)
    )
    w = torch.randn(shape) + (0.0 if symmetric else 0.5)
    p = qatpass.quantize(w, scheme)
    return p, tuple(None if t is None else t.to(DEVICE) for t in (p.qweight, p.scales, p.zeros))


def _reference(x, p, ids, bias=None):
    w = qatpass.dequantize(p, dtype=x.dtype).float().to(x.device)
    ref = torch.stack([x[t].float() @ w[e].T for t, e in enumerate(ids.tolist())])
    return ref if bias is None else ref + bias[ids].float()


@pytest.mark.parametrize(
    ("t", "e", "n", "k", "group_size", "symmetric", "dtype", "with_bias"),
    [
        (40, 3, 40, 192, 32, True, torch.float32, True),  # an expert's rows span tiles
        (64, 4, 72, 256, 64, False, torch.bfloat16, False),
        (48, 2, 24, 128, 128, False, torch.float16, True),
        (33, 8, 16, 64, 32, True, torch.bfloat16, True),  # rows < 4 per expert: forced below
    ],
)
def test_grouped_gemm_matches_per_row_reference(t, e, n, k, group_size, symmetric, dtype,
                                                with_bias):  # fmt: skip
    p, (qweight, scales, zeros) = _packed((e, n, k), group_size, symmetric)
    x = torch.randn(t, k, dtype=dtype, device=DEVICE)
    ids = torch.randint(0, e, (t,), device=DEVICE)
    ids[:3] = 0  # expert 0 used; some expert may get none
    bias = torch.randn(e, n, dtype=dtype, device=DEVICE) if with_bias else None
    chosen = plan.plan_grouped(t, n, k, group_size, e)
    if chosen.kernel != "grouped_gemm":
        chosen = plan.GroupedPlan("grouped_gemm", 16, 16, 32)
    y = grouped_gemm.w4a16_grouped_gemm(
        x, qweight, scales, zeros, expert_ids=ids, group_size=group_size, bias=bias, plan=chosen
    )
    assert y.shape == (t, n) and y.dtype == dtype
    torch.testing.assert_close(y.float(), _reference(x, p, ids, bias), **ACCUM[dtype])


def test_grouped_matmul_takes_the_gemm_for_many_rows_and_agrees_with_the_per_row_kernel():
    """The public op: few rows run the per-row kernel, many the sorted GEMM; on the same rows
    the two give the same values up to fp32 summation order."""
    e, n, k = 2, 32, 128
    p, (qweight, scales, zeros) = _packed((e, n, k), 32, False)
    assert plan.plan_grouped(7, n, k, 32, e).kernel == "grouped"
    assert plan.plan_grouped(16, n, k, 32, e).kernel == "grouped_gemm"
    x = torch.randn(16, k, dtype=torch.float32, device=DEVICE)
    ids = torch.tensor([1, 0] * 8, device=DEVICE)
    many = w4a16_grouped_matmul(x, qweight, scales, zeros, expert_ids=ids, group_size=32)
    few = torch.cat([
        w4a16_grouped_matmul(x[i:i + 4], qweight, scales, zeros, expert_ids=ids[i:i + 4],
                             group_size=32)
        for i in range(0, 16, 4)
    ])  # fmt: skip
    torch.testing.assert_close(many, few, **ACCUM[torch.float32])


def test_grouped_gemm_bad_expert_ids_give_nan_rows_only():
    """The device-side guard (GPU ids are not range-checked on the host): a row whose id lies
    outside [0, E) comes out NaN, the other rows are right."""
    e, n, k = 3, 16, 64
    p, (qweight, scales, _) = _packed((e, n, k), 32, True)
    x = torch.randn(20, k, dtype=torch.float32, device=DEVICE)
    ids = torch.randint(0, e, (20,), device=DEVICE)
    ids[5], ids[11] = -1, e
    y = grouped_gemm.w4a16_grouped_gemm(
        x, qweight, scales, None, expert_ids=ids, group_size=32, bias=None,
        plan=plan.GroupedPlan("grouped_gemm", 16, 16, 32),
    )  # fmt: skip
    bad = torch.zeros(20, dtype=torch.bool)
    bad[[5, 11]] = True
    assert y[bad].isnan().all() and not y[~bad].isnan().any()
    good = ids.clamp(0, e - 1)
    torch.testing.assert_close(y[~bad], _reference(x, p, good)[~bad], **ACCUM[torch.float32])


def test_tile_table_covers_each_expert_in_whole_tiles():
    ids = torch.tensor([2, 0, 2, 2, 1, 2, 0, 2, 2])  # expert 2: 6 rows, 2 tiles of 4
    order, expert, row0, row_end = grouped_gemm.tile_table(ids, 4, 4)
    assert torch.equal(ids[order], ids.sort(stable=True).values)
    assert expert.shape[0] == -(-9 // 4) + 4 + 1  # the bound the grid uses
    used = row_end > row0
    assert expert[used].tolist() == [0, 1, 2, 2]
    assert row0[used].tolist() == [0, 2, 3, 7] and row_end[used].tolist() == [2, 3, 9, 9]
    torch.testing.assert_close(row_end[~used], torch.zeros_like(row_end[~used]), **EXACT)


def test_grouped_plan_grows_the_tile_with_rows_per_expert():
    assert plan.plan_grouped(8 * 4, 4096, 4096, 32, 8).block_m == 16
    assert plan.plan_grouped(8 * 30, 4096, 4096, 32, 8).block_m == 32
    big = plan.plan_grouped(8 * 512, 4096, 4096, 128, 8)
    assert (big.kernel, big.block_m, big.block_n, big.block_k) == ("grouped_gemm", 64, 128, 64)
    assert plan.plan_grouped(8 * 512, 4096, 4096, 32, 8).block_k == 32
