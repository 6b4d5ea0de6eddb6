"""torch.export (.pt2): the qatpass op stays visible (also after run_decompositions), the file
saves, and a fresh Python process that imported qatpass loads and runs it with equal outputs."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from tiny_models import Logits
from tiny_models import export_llama as tiny_llama
from tiny_models import export_moe as tiny_moe
from torch import nn

from qatpass.config import QatConfig
from qatpass.export.torch_export import load_pt2, qatpass_op_nodes, to_pt2
from qatpass.lowering import convert
from qatpass.scheme import Int4Scheme

from conftest import ACCUM, EXACT

transformers = pytest.importorskip("transformers")


MODELS = {"llama": tiny_llama, "moe": tiny_moe}

FRESH = textwrap.dedent(
    """
    import sys, torch
    import qatpass, qatpass.export
    ids = torch.load(sys.argv[1])
    outs = [qatpass.export.load_pt2(path).module()(ids) for path in sys.argv[3:]]
    torch.save(outs, sys.argv[2])
    """
)


def run_fresh(paths, ids, tmp_path) -> list[torch.Tensor]:
    """Outputs of the .pt2 files run in a new Python process (one process for all files)."""
    torch.save(ids, tmp_path / "ids.pt")
    cmd = [sys.executable, "-c", FRESH, str(tmp_path / "ids.pt"), str(tmp_path / "o.pt")]
    proc = subprocess.run([*cmd, *map(str, paths)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(tmp_path / "o.pt")


def test_pt2_round_trip_in_fresh_process(tmp_path):
    ids = torch.randint(0, 128, (3, 5))  # another (batch, seq) than exported
    paths, refs = [], []
    for model_id, build in MODELS.items():
        qmodel = Logits(convert(build()))
        path = to_pt2(qmodel, (torch.randint(0, 128, (2, 7)),), tmp_path / f"{model_id}.pt2")
        ep = torch.export.load(str(path))
        n_ops = len(qatpass_op_nodes(ep.graph_module))
        assert n_ops == 14 if model_id == "llama" else n_ops == 2 * (4 + 2)
        assert len(qatpass_op_nodes(ep.run_decompositions().graph_module)) == n_ops
        with torch.no_grad():
            refs.append(qmodel(ids))
        paths.append(path)
    for got, ref in zip(run_fresh(paths, ids, tmp_path), refs, strict=True):
        torch.testing.assert_close(got, ref, **EXACT)


def test_decomposed_program_keeps_op_and_numbers(tmp_path):
    qmodel = Logits(convert(tiny_llama(), QatConfig(scheme=Int4Scheme(symmetric=False))))
    path = to_pt2(qmodel, (torch.randint(0, 128, (2, 6)),), tmp_path / "d.pt2", decompose=True)
    ep = load_pt2(path)
    assert len(qatpass_op_nodes(ep.graph_module)) == 14
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        # decomposed attention / norms sum in another order than the fused kernels
        torch.testing.assert_close(ep.module()(ids), qmodel(ids), **ACCUM[torch.float32])


def test_static_shapes(tmp_path):
    qmodel = convert(
        nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8)), QatConfig(exclude=())
    )
    x = torch.randn(4, 64)
    ep = load_pt2(to_pt2(qmodel, x, tmp_path / "s.pt2", dynamic_axes=()))
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(x), qmodel(x), **EXACT)


# ----------------------------------------------------------------------------- refusals


def test_refuses_unconverted_model(tmp_path):
    with pytest.raises(ValueError, match="no qatpass op"):
        to_pt2(nn.Linear(64, 8), (torch.randn(2, 64),), tmp_path / "m.pt2", dynamic_axes=(0,))
    assert not (tmp_path / "m.pt2").exists()


def test_refuses_bad_arguments(tmp_path):
    qmodel = convert(nn.Sequential(nn.Linear(64, 8)), QatConfig(exclude=()))
    with pytest.raises(TypeError, match="torch.nn.Module"):
        to_pt2("model", (torch.randn(2, 64),), tmp_path / "m.pt2")
    with pytest.raises(TypeError, match="tensor or a tuple"):
        to_pt2(qmodel, {"x": torch.randn(2, 64)}, tmp_path / "m.pt2")
    with pytest.raises(ValueError, match="dynamic_axes"):
        to_pt2(qmodel, (torch.randn(2, 64),), tmp_path / "m.pt2", dynamic_axes=(3,))
    with pytest.raises(ValueError, match="size >= 2"):
        to_pt2(qmodel, (torch.randn(1, 64),), tmp_path / "m.pt2")
    with pytest.raises(IsADirectoryError):
        to_pt2(qmodel, (torch.randn(2, 64),), tmp_path)
    with pytest.raises(FileNotFoundError):
        load_pt2(tmp_path / "missing.pt2")


def cli_factory():
    torch.manual_seed(0)
    return tiny_llama(), (torch.randint(0, 128, (2, 7)),)


def test_cli_pt2(tmp_path):
    from qatpass.cli import main

    out = tmp_path / "m.pt2"
    argv = [
        "export",
        "--format",
        "pt2",
        "--model",
        "test_export_pt2:cli_factory",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    ep = load_pt2(out)
    assert len(qatpass_op_nodes(ep.graph_module)) == 14
    model, (ids,) = cli_factory()
    with torch.no_grad():
        ref = convert(model)(ids).logits
        torch.testing.assert_close(ep.module()(ids), ref, **EXACT)
    assert main(argv) == 2  # exists: refused without --overwrite
