"""torch.export (.pt2): HF models export as they are (default config, use_cache=True) to programs
that return logits with dynamic batch and sequence dims; the qatpass op stays visible (also after
run_decompositions); a fresh Python process that imported qatpass loads and runs the files at
other shapes with equal outputs; the user's model is left as it was."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Callable
from typing import Any, NamedTuple

import pytest
import torch
from tiny_models import tiny_llama, tiny_qwen3_moe
from torch import nn

from qatpass.config import QatConfig
from qatpass.export.torch_export import (
    export_call,
    export_program,
    load_pt2,
    qatpass_op_nodes,
    to_pt2,
)
from qatpass.lowering import convert, packed_weights
from qatpass.scheme import Int4Scheme

from conftest import ACCUM, EXACT

transformers = pytest.importorskip("transformers")

# ----------------------------------------------------------------------------- HF models as they are


def tiny_bert() -> nn.Module:
    cfg = transformers.BertConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
    )
    return transformers.BertModel(cfg).eval()


def tiny_t5() -> nn.Module:
    cfg = transformers.T5Config(
        vocab_size=128,
        d_model=64,
        d_kv=16,
        d_ff=128,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        decoder_start_token_id=0,
    )
    return transformers.T5ForConditionalGeneration(cfg).eval()


def tiny_gpt2() -> nn.Module:
    cfg = transformers.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64)
    return transformers.GPT2LMHeadModel(cfg).eval()


def ids(batch: int, seq: int, dec: int) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.randint(0, 128, (batch, seq))}


def bert_inputs(batch: int, seq: int, dec: int) -> dict[str, torch.Tensor]:
    return {
        "input_ids": torch.randint(0, 128, (batch, seq)),
        "attention_mask": torch.ones(batch, seq, dtype=torch.long),
        "token_type_ids": torch.zeros(batch, seq, dtype=torch.long),
    }


def t5_inputs(batch: int, seq: int, dec: int) -> dict[str, torch.Tensor]:
    return {
        "input_ids": torch.randint(0, 128, (batch, seq)),
        "attention_mask": torch.ones(batch, seq, dtype=torch.long),
        "decoder_input_ids": torch.randint(0, 128, (batch, dec)),
    }


class HFCase(NamedTuple):
    build: Callable[[], nn.Module]  # the model with its default config (use_cache=True)
    inputs: Callable[[int, int, int], dict[str, torch.Tensor]]  # (batch, seq, decoder seq)
    positional: bool  # give the exporter the example as a tuple (else the dict)
    output: str  # the field the export returns
    n_ops: int  # qatpass ops in the exported graph
    tol: dict = EXACT  # exported program vs eager
    dead: int = 0  # ops feeding no output (BERT's pooler): torch.export keeps them, ONNX drops them


HF_CASES = {
    "llama": HFCase(tiny_llama, ids, True, "logits", 14),
    "llama-tied": HFCase(lambda: tiny_llama(tie_word_embeddings=True), ids, True, "logits", 14),
    "bert": HFCase(tiny_bert, bert_inputs, False, "last_hidden_state", 2 * 6 + 1, dead=1),
    # T5's exported attention sums in another order than eager (max difference seen 1e-6)
    "t5": HFCase(tiny_t5, t5_inputs, False, "logits", 2 * 6 + 2 * 10, ACCUM[torch.float32]),
    "qwen3-moe": HFCase(lambda: tiny_qwen3_moe(None, head_dim=16), ids, True, "logits", 2 * 6),
    "gpt2": HFCase(tiny_gpt2, ids, True, "logits", 2 * 4),
}
SLOW_CASES = {"t5", "qwen3-moe"}
EXPORT_SHAPE = (1, 6, 1)  # batch 1 and decoder length 1: grown to 2 for tracing, stay dynamic
RUN_SHAPES = [(3, 11, 4), (1, 1, 3)]


def hf_case_params() -> list:
    return [
        pytest.param(name, marks=[pytest.mark.slow] if name in SLOW_CASES else [])
        for name in HF_CASES
    ]


def example(case: HFCase, inputs: dict[str, torch.Tensor]) -> Any:
    return tuple(inputs.values()) if case.positional else inputs


def reference(model: nn.Module, case: HFCase, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """What the HF model as it is computes, read off its own output."""
    with torch.no_grad():
        return getattr(model(**inputs), case.output)


def converted(name: str) -> tuple[nn.Module, nn.Module]:
    """(model, convert(model)), with at least one weight packed."""
    model = HF_CASES[name].build()
    qmodel = convert(model)
    assert packed_weights(qmodel), f"convert packed no weight of {name}"
    return model, qmodel


FRESH = textwrap.dedent(
    """
    import sys, torch
    import qatpass, qatpass.export
    runs = torch.load(sys.argv[1])
    outs = []
    for path, inputs, positional in runs:
        program = qatpass.export.load_pt2(path).module()
        outs.append(program(*inputs.values()) if positional else program(**inputs))
    torch.save(outs, sys.argv[2])
    """
)


def run_fresh(runs: list[tuple[str, dict, bool]], tmp_path) -> list[torch.Tensor]:
    """Outputs of (path, inputs, positional) runs in a new Python process (one for all runs)."""
    torch.save(runs, tmp_path / "runs.pt")
    cmd = [sys.executable, "-c", FRESH, str(tmp_path / "runs.pt"), str(tmp_path / "o.pt")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(tmp_path / "o.pt")


@pytest.mark.parametrize("name", hf_case_params())
def test_hf_model_as_it_is_round_trip_in_fresh_process(tmp_path, name):
    case = HF_CASES[name]
    model, qmodel = converted(name)
    path = to_pt2(qmodel, example(case, case.inputs(*EXPORT_SHAPE)), tmp_path / f"{name}.pt2")
    ep = torch.export.load(str(path))
    assert len(qatpass_op_nodes(ep.graph_module)) == case.n_ops
    assert ep.graph_module.graph.find_nodes(op="output")[0].args[0][0].meta["val"].dim() == 3
    runs, refs = [], []
    for shape in RUN_SHAPES:
        inputs = case.inputs(*shape)
        runs.append((str(path), inputs, case.positional))
        refs.append(reference(qmodel, case, inputs))
    for got, ref in zip(run_fresh(runs, tmp_path), refs, strict=True):
        torch.testing.assert_close(got, ref, **case.tol)
    assert model.config.use_cache and qmodel.config.use_cache  # no config flip left behind
    assert not qmodel.training


def test_gpt2_float_exports_with_dynamic_shapes():
    """The wrapper on GPT-2 (cache, Conv1D) needs no convert: the float program runs elsewhere."""
    model = tiny_gpt2()
    case = HF_CASES["gpt2"]
    ep = export_program(model, example(case, case.inputs(*EXPORT_SHAPE)))
    for shape in RUN_SHAPES:
        inputs = case.inputs(*shape)
        with torch.no_grad():
            torch.testing.assert_close(
                ep.module()(*inputs.values()), reference(model, case, inputs), **EXACT
            )


def test_export_call_dims():
    """One batch Dim for all inputs, seq for encoder inputs, decoder_seq for decoder_* inputs;
    size-1 example dims repeated to 2; float feature inputs get only a batch dim."""
    model = tiny_t5()
    inputs = t5_inputs(1, 5, 1)
    call = export_call(model, inputs)
    assert call.args == () and list(call.kwargs) == list(inputs)
    assert {k: tuple(v.shape) for k, v in call.kwargs.items()} == {
        "input_ids": (2, 5),
        "attention_mask": (2, 5),
        "decoder_input_ids": (2, 2),
    }
    names = {k: {d: dim.__name__ for d, dim in v.items()} for k, v in call.dynamic_shapes.items()}
    assert names == {
        "input_ids": {0: "batch", 1: "seq"},
        "attention_mask": {0: "batch", 1: "seq"},
        "decoder_input_ids": {0: "batch", 1: "decoder_seq"},
    }
    assert torch.equal(call.kwargs["input_ids"], inputs["input_ids"].repeat(2, 1))
    mlp = nn.Linear(8, 4)
    call = export_call(mlp, (torch.randn(3, 8),))
    assert list(inspect_names(call.module)) == ["input"]  # nn.Linear.forward(input)
    assert {d: dim.__name__ for d, dim in call.dynamic_shapes["input"].items()} == {0: "batch"}
    assert export_call(mlp, torch.randn(3, 8), dynamic_axes=()).dynamic_shapes is None


def inspect_names(module: nn.Module) -> list[str]:
    import inspect

    return list(inspect.signature(module.forward).parameters)


def test_size_one_example_is_not_specialised(tmp_path):
    """torch.export would fix a size-1 dynamic dim to 1 (an error with a Dim); the grown example
    gives a program that runs at batch 1 and at other batches."""
    qmodel = convert(nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8)), exclude=())
    with pytest.raises(Exception, match="specialized"):
        torch.export.export(
            qmodel, (torch.randn(1, 64),), dynamic_shapes=({0: torch.export.Dim("batch")},)
        )
    ep = load_pt2(to_pt2(qmodel, torch.randn(1, 64), tmp_path / "b1.pt2"))
    for batch in (1, 5):
        x = torch.randn(batch, 64)
        with torch.no_grad():
            torch.testing.assert_close(ep.module()(x), qmodel(x), **EXACT)


def test_decomposed_program_keeps_op_and_numbers(tmp_path):
    qmodel = convert(tiny_llama(), QatConfig(scheme=Int4Scheme(symmetric=False)))
    ids6 = torch.randint(0, 128, (2, 6))
    path = to_pt2(qmodel, (ids6,), tmp_path / "d.pt2", decompose=True)
    ep = load_pt2(path)
    assert len(qatpass_op_nodes(ep.graph_module)) == 14
    ids9 = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        # decomposed attention / norms sum in another order than the fused kernels
        torch.testing.assert_close(ep.module()(ids9), qmodel(ids9).logits, **ACCUM[torch.float32])


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
    x = torch.randn(2, 64)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        to_pt2("model", (x,), tmp_path / "m.pt2")
    with pytest.raises(TypeError, match="a tensor, a tuple of tensors or a dict"):
        to_pt2(qmodel, "x", tmp_path / "m.pt2")
    with pytest.raises(TypeError, match="must be tensors, got list for 'input'"):
        to_pt2(qmodel, ([1.0] * 64,), tmp_path / "m.pt2")
    with pytest.raises(ValueError, match="keys must be argument names"):
        to_pt2(qmodel, {"not a name": x}, tmp_path / "m.pt2")
    with pytest.raises(ValueError, match="dynamic_axes"):
        to_pt2(qmodel, (x,), tmp_path / "m.pt2", dynamic_axes=(3,))
    with pytest.raises(ValueError, match="fixes dim 1 of 'input' to a constant"):
        to_pt2(qmodel, (x,), tmp_path / "m.pt2", dynamic_axes=(0, 1))  # K of a Linear
    with pytest.raises(
        ValueError, match="disagree on the batch size: input_ids 2, attention_mask 3"
    ):
        export_call(
            tiny_llama(),
            {"input_ids": torch.zeros(2, 4, dtype=torch.long), "attention_mask": torch.ones(3, 4)},
        )
    with pytest.raises(ValueError, match="batch size 0"):
        to_pt2(qmodel, (torch.randn(0, 64),), tmp_path / "m.pt2")
    with pytest.raises(IsADirectoryError):
        to_pt2(qmodel, (x,), tmp_path)
    with pytest.raises(FileNotFoundError):
        load_pt2(tmp_path / "missing.pt2")
