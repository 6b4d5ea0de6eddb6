"""The tensor-core GEMV's lane contract (gemv._mma_word), on an emulated warp.

No GPU runs the inline mma.sync here, so this checks the algebra the kernel relies on: with the
PTX ISA's m16n8k16 fragment layout and the weight tile's layout (4 lanes along K, lane
4g + t holding words 4t..4t+3 of row g), two mma per word with the zero A rows g + 8 leave in
every lane of a quad its row's dot over the quad's words, so the sum over a row's lanes and
elements, times 1/4, is the row's dot with x. With 16 lanes along K (the layout the report
refuses) the same code is wrong.

Several rows of x (gemv._mma_rows, M = 2..16): lane 4n + t' supplies B column n with x row
8 b + n (the x row of its lane group, rows >= M reading row M - 1), and lane 4g + t's c0, c1
come out as weight row g's dots with x rows 8 b + 2t and 8 b + 2t + 1 (gemv._rows_out).
"""

from __future__ import annotations

import numpy as np
import pytest


def _mma(a_regs, b_regs, c_regs):
    """mma.sync.m16n8k16 on a warp: a_regs[lane] = 4 pairs, b_regs[lane] = 2 pairs,
    c_regs[lane] = 4 floats (PTX ISA fragment layouts for .bf16/.f16 A, B and f32 C/D)."""
    a = np.zeros((16, 16))
    b = np.zeros((16, 8))
    c = np.zeros((16, 8))
    for lane in range(32):
        g, t = divmod(lane, 4)
        for r, (row, col) in enumerate(
            ((g, 2 * t), (g + 8, 2 * t), (g, 2 * t + 8), (g + 8, 2 * t + 8))
        ):
            a[row, col : col + 2] = a_regs[lane][r]
        for r, k in enumerate((2 * t, 2 * t + 8)):
            b[k : k + 2, g] = b_regs[lane][r]
        c[g, 2 * t : 2 * t + 2] = c_regs[lane][:2]
        c[g + 8, 2 * t : 2 * t + 2] = c_regs[lane][2:]
    d = a @ b + c
    return [
        (d[g, 2 * t], d[g, 2 * t + 1], d[g + 8, 2 * t], d[g + 8, 2 * t + 1])
        for g, t in (divmod(lane, 4) for lane in range(32))
    ]


def _warp_gemv(w, x, lanes_along_k):
    """The kernel's per-step math for one warp: w [rows, 128] weights, x [128]."""
    rows_per_warp = 32 // lanes_along_k
    words_per_lane = 16 // lanes_along_k

    def lane_words(lane):  # the blocked layout: lanes fastest along K, 4 words a lane (or more)
        row, col = divmod(lane, lanes_along_k)
        return row, [col * words_per_lane + i for i in range(words_per_lane)]

    acc = np.zeros((32, words_per_lane))
    for i in range(words_per_lane):  # one mma chain per element, as the inline asm does

        def pairs(v, word):
            return [(v[8 * word + j], v[8 * word + j + 4]) for j in range(4)]

        wt = [pairs(w[lane_words(lane)[0]], lane_words(lane)[1][i]) for lane in range(32)]
        xp = [pairs(x, lane_words(lane)[1][i]) for lane in range(32)]
        zero = (0.0, 0.0)
        d1 = _mma([(q[0], zero, q[1], zero) for q in wt], [(p[0], p[1]) for p in xp],
                  [(acc[lane, i], acc[lane, i], 0.0, 0.0) for lane in range(32)])  # fmt: skip
        d2 = _mma([(q[2], zero, q[3], zero) for q in wt], [(p[2], p[3]) for p in xp], d1)
        acc[:, i] = [d[0] for d in d2]
    out = np.zeros(rows_per_warp)
    for lane in range(32):
        out[lane_words(lane)[0]] += acc[lane].sum()
    return out * 0.25


def test_four_lanes_along_k_give_each_rows_dot_product():
    rng = np.random.default_rng(0)
    w = rng.integers(-8, 8, size=(8, 128)).astype(float)
    x = rng.standard_normal(128)
    np.testing.assert_allclose(_warp_gemv(w, x, 4), w @ x, rtol=1e-12)


def test_sixteen_lanes_along_k_would_be_wrong():
    rng = np.random.default_rng(1)
    w = rng.integers(-8, 8, size=(2, 128)).astype(float)
    x = rng.standard_normal(128)
    assert not np.allclose(_warp_gemv(w, x, 16), w @ x)


def _warp_gemv_rows(w, xs, x_row_of_lane=lambda lane: lane // 4):
    """gemv._mma_rows's per-step math for one warp (4 lanes along K): w [8, 128] weights (row
    g on lane group g), xs [M, 128], M <= 16 -> out [M, 8] from the lanes' (c0, c1) per block."""
    m = xs.shape[0]
    blocks = 1 if m <= 8 else 2

    def pairs(v, word):
        return [(v[8 * word + j], v[8 * word + j + 4]) for j in range(4)]

    acc = np.zeros((blocks, 32, 4, 2))  # block, lane, register (word 4t + i), (c0, c1)
    zero = (0.0, 0.0)
    for i in range(4):
        wt = [pairs(w[lane // 4], 4 * (lane % 4) + i) for lane in range(32)]
        for b in range(blocks):
            rows = [min(8 * b + x_row_of_lane(lane), m - 1) for lane in range(32)]
            xp = [pairs(xs[rows[lane]], 4 * (lane % 4) + i) for lane in range(32)]
            c = [(*acc[b, lane, i], 0.0, 0.0) for lane in range(32)]
            d1 = _mma([(q[0], zero, q[1], zero) for q in wt], [(p[0], p[1]) for p in xp], c)
            d2 = _mma([(q[2], zero, q[3], zero) for q in wt], [(p[2], p[3]) for p in xp], d1)
            acc[b, :, i] = [d[:2] for d in d2]
    out = np.zeros((8 * blocks, 8))
    for b in range(blocks):
        for lane in range(32):
            g, t = divmod(lane, 4)
            for j in range(2):  # _rows_out: the lane's words summed, column 2t + j
                out[8 * b + 2 * t + j, g] += acc[b, lane, :, j].sum()
    return out[:m]


@pytest.mark.parametrize("m", [1, 2, 3, 5, 8, 9, 12, 16])
def test_x_rows_in_the_b_columns_give_every_rows_dot_products(m):
    rng = np.random.default_rng(m)
    w = rng.integers(-8, 8, size=(8, 128)).astype(float)
    xs = rng.standard_normal((m, 128))
    np.testing.assert_allclose(_warp_gemv_rows(w, xs), xs @ w.T, rtol=1e-12)


def test_x_rows_by_the_wrong_lane_would_be_wrong():
    """B columns must follow the lane group (lane // 4), not the lane's position along K."""
    rng = np.random.default_rng(2)
    w = rng.integers(-8, 8, size=(8, 128)).astype(float)
    xs = rng.standard_normal((8, 128))
    assert not np.allclose(_warp_gemv_rows(w, xs, lambda lane: lane % 4), xs @ w.T)
