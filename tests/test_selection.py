"""Eager selection (convert, export) agrees with the graph pass (training) on HF models."""

from __future__ import annotations

import pytest
import torch
from tiny_models import LLAMA_QUANTIZED, MOE_QUANTIZED, tiny_llama, tiny_qwen3_moe
from torch import nn

import qatpass
from qatpass.config import QatConfig
from qatpass.lowering.convert import module_plan
from qatpass.selection import select_weights


@pytest.mark.parametrize(
    "make, expected",
    [(tiny_llama, LLAMA_QUANTIZED), (lambda: tiny_qwen3_moe("batched_mm"), MOE_QUANTIZED)],
)
def test_eager_selection_matches_the_graph_pass(make, expected):
    model = make()
    selected, skipped = select_weights(model)
    assert {s.fqn for s in selected} == expected
    b = qatpass.backend(compiler="eager")
    torch.compile(model, backend=b)(torch.randint(0, 128, (1, 8)))
    assert set(b.quantized_names) == {s.fqn for s in selected}
    dims = {q.fqn: q.dim for g in b.summaries for q in g.quantized}
    assert all(dims[s.fqn] == s.dim for s in selected)
    assert any(s.fqn == "lm_head.weight" and "output head" in s.reason for s in skipped)


def test_selection_kinds_filters_and_reasons():
    model = nn.ModuleDict(
        {"a": nn.Linear(64, 8), "b": nn.Linear(40, 8), "lm_head": nn.Linear(64, 8)}
    )
    selected, skipped = select_weights(model, QatConfig.from_options({"group_size": 32}))
    assert [(s.fqn, s.kind, s.dim) for s in selected] == [("a.weight", "linear", 1)]
    reasons = {s.fqn: s.reason for s in skipped}
    assert "not divisible by group_size 32" in reasons["b.weight"]
    assert "excluded by filter" in reasons["lm_head.weight"]


def test_tied_linears_are_selected_once():
    a, b = nn.Linear(32, 32), nn.Linear(32, 32)
    b.weight = a.weight
    model = nn.Sequential(a, b)
    selected, skipped = select_weights(model)
    assert [s.fqn for s in selected] == ["0.weight", "1.weight"]  # one tensor, two servers
    plan, _ = module_plan(model)
    assert plan.quantized_names == ["0.weight"] and plan.weights["0.weight"].aliases == (
        "1.weight",
    )
    qmodel = qatpass.convert(model)
    assert qmodel[0].qweight is qmodel[1].qweight  # quantized once, served by both
