"""The train-mode pass on Dynamo graphs: which weights, which dim, one node each, filters, skips."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qatpass
from qatpass.config import QatConfig
from qatpass.passes.weight_uses import find_weight_uses

from conftest import EXACT


class Recorder:
    """A backend that runs the qat4 transform and keeps the rewritten graphs."""

    def __init__(self, **options):
        self.backend = qatpass.backend(compiler="eager", **options)
        self.graphs: list[torch.fx.GraphModule] = []
        self.placeholders: list[list[str]] = []

    def __call__(self, gm, example_inputs):
        before = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
        fn = self.backend(gm, example_inputs)
        self.placeholders.append(before)
        self.graphs.append(gm)
        return fn

    @property
    def quantized(self) -> dict[str, int]:
        return {q.fqn: q.dim for s in self.backend.summaries for q in s.quantized}

    @property
    def skipped(self) -> dict[str, str]:
        return {q.fqn: q.reason for s in self.backend.summaries for q in s.skipped}


def fq_nodes(gm):
    return [n for n in gm.graph.nodes if n.target is torch.ops.qatpass.fake_quantize_int4.default]


class ManyOps(nn.Module):
    """One parameter per way a weight can reach a matmul."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 64)
        self.w_kn = nn.Parameter(torch.randn(64, 32))  # x @ w: reduction dim 0
        self.w_t = nn.Parameter(torch.randn(32, 64))  # x @ w.T: dim 1
        self.w_ein = nn.Parameter(torch.randn(64, 32))  # einsum "bk,kn->bn": dim 0
        self.experts = nn.Parameter(torch.randn(4, 32, 64))  # bmm on w[idx]: dim 2
        self.w_perm = nn.Parameter(torch.randn(2, 64, 16))  # permute + reshape: dim 1
        self.w_chunk = nn.Parameter(torch.randn(64, 64))  # chunk along N, then linear: dim 1
        self.addmm_w = nn.Parameter(torch.randn(64, 32))  # addmm(b, x, w): dim 0
        self.norm = nn.LayerNorm(64)

    def forward(self, x, idx):
        h = self.norm(self.fc(x))
        a = h @ self.w_kn
        b = h @ self.w_t.T
        c = torch.einsum("bk,kn->bn", h, self.w_ein)
        d = torch.bmm(self.experts[idx], h.unsqueeze(-1)).squeeze(-1)
        e = h @ self.w_perm.permute(1, 0, 2).reshape(64, 32)
        f1, f2 = self.w_chunk.chunk(2, dim=0)
        f = F.linear(h, f1) + F.linear(h, f2)
        g = torch.addmm(torch.zeros(32), h, self.addmm_w)
        return a + b + c + d + e + f + g


def test_every_matmul_form_is_found_with_its_reduction_dim():
    m = ManyOps()
    rec = Recorder()
    x, idx = torch.randn(8, 64), torch.randint(0, 4, (8,))
    torch.compile(m, backend=rec, fullgraph=True)(x, idx)
    assert rec.quantized == {
        "fc.weight": 1,
        "w_kn": 0,
        "w_t": 1,
        "w_ein": 0,
        "experts": 2,
        "w_perm": 1,
        "w_chunk": 1,
        "addmm_w": 0,
    }
    assert "not a matmul weight" in rec.skipped["norm.weight"]
    assert "not a matmul weight" in rec.skipped["fc.bias"]
    (gm,) = rec.graphs
    assert len(fq_nodes(gm)) == 8


def test_output_equals_reference_with_fake_quantized_parameters():
    m = ManyOps()
    x, idx = torch.randn(8, 64), torch.randint(0, 4, (8,))
    rec = Recorder()
    out = torch.compile(m, backend=rec, fullgraph=True)(x, idx)
    dims = rec.quantized
    ref = ManyOps()
    ref.load_state_dict(m.state_dict())
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name in dims:
                p.copy_(qatpass.fake_quantize(p, dim=dims[name]))
    torch.testing.assert_close(out, ref(x, idx), **EXACT)


def test_placeholders_keep_number_and_order():
    rec = Recorder()
    torch.compile(ManyOps(), backend=rec)(torch.randn(8, 64), torch.randint(0, 4, (8,)))
    for gm, before in zip(rec.graphs, rec.placeholders, strict=True):
        assert [n.name for n in gm.graph.nodes if n.op == "placeholder"] == before


def test_tied_weight_is_quantized_once():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(32, 32, bias=False)
            self.b = nn.Linear(32, 32, bias=False)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.b(self.a(x)) + F.linear(x, self.a.weight)

    rec = Recorder()
    torch.compile(Tied(), backend=rec)(torch.randn(2, 32))
    (gm,) = rec.graphs
    assert len(fq_nodes(gm)) == 1
    assert len(rec.quantized) == 1


def test_conflicting_reduction_dims_are_skipped():
    class Square(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(32, 32))

        def forward(self, x):
            return F.linear(x, self.w) + x @ self.w

    rec = Recorder()
    torch.compile(Square(), backend=rec)(torch.randn(2, 32))
    assert "different reduction dims" in rec.skipped["w"]
    assert rec.quantized == {}


def test_non_divisible_weight_is_skipped_with_one_log_line(caplog):
    m = nn.Sequential(nn.Linear(48, 16), nn.Linear(16, 64))
    rec = Recorder()
    with caplog.at_level(logging.INFO, logger="qatpass"):
        torch.compile(m, backend=rec)(torch.randn(2, 48))
    assert "not divisible by group_size 32" in rec.skipped["0.weight"]
    assert "not divisible by group_size 32" in rec.skipped["1.weight"]
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert len([m for m in infos if "0.weight" in m]) == 1 and "skipped 0.weight" in infos[-2]
    # a default run says so at WARNING, with the count, once
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warning.startswith("qat4: 2 matmul weight(s) left in high precision")


@pytest.mark.parametrize(
    "options, expected",
    [
        ({}, {"layers.0.weight", "layers.1.weight", "head.weight"}),
        ({"exclude": [r"^head\."]}, {"layers.0.weight", "layers.1.weight"}),
        ({"include": [r"layers\.1"]}, {"layers.1.weight"}),
        ({"include": [r"layers"], "exclude": [r"\.0\."]}, {"layers.1.weight"}),
    ],
)
def test_include_exclude_filters(options, expected):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 32)
            self.layers = nn.ModuleList([nn.Linear(32, 32) for _ in range(2)])
            self.head = nn.Linear(32, 10)

        def forward(self, ids):
            h = self.emb(ids)
            for layer in self.layers:
                h = layer(h)
            return self.head(h)

    rec = Recorder(**options)
    torch.compile(Net(), backend=rec)(torch.randint(0, 10, (2, 3)))
    assert set(rec.quantized) == expected
    assert "not a matmul weight" in rec.skipped["emb.weight"]


def test_default_filters_keep_lm_head_embeddings_and_router():
    cfg = QatConfig()
    assert cfg.selects("lm_head.weight") is not None
    assert cfg.selects("model.embed_tokens.weight") is not None
    assert cfg.selects("model.layers.0.mlp.gate.weight") is not None
    assert cfg.selects("model.layers.0.mlp.gate_proj.weight") is None
    assert cfg.selects("model.layers.0.mlp.experts.gate_up_proj") is None


def test_nan_weight_is_reported_at_compile():
    m = nn.Linear(32, 32)
    with torch.no_grad():
        m.weight[0, 0] = float("nan")
    with pytest.raises(Exception, match="non-finite"):
        torch.compile(m, backend=Recorder())(torch.randn(2, 32))


@pytest.mark.parametrize(
    "options, match",
    [
        ({"group_sise": 32}, "unknown qat4 option"),
        ({"group_size": 33}, "power of two"),
        ({"mode": "serve"}, "mode must be one of"),
        ({"compiler": "tvm"}, "compiler must be one of"),
        ({"exclude": ["("]}, "not a valid regex"),
    ],
)
def test_bad_options_raise_clear_errors(options, match):
    with pytest.raises((ValueError, TypeError), match=match):
        QatConfig.from_options(options)


def test_find_weight_uses_without_example_inputs_uses_meta():
    captured = {}

    def backend(gm, example_inputs):
        captured["infos"] = find_weight_uses(gm, None, names={})
        return gm.forward

    torch.compile(nn.Linear(32, 16), backend=backend)(torch.randn(2, 32))
    by_name = {i.fqn: i for i in captured["infos"]}
    assert by_name["weight"].dims == {1}
    assert by_name["weight"].shape == (16, 32)
