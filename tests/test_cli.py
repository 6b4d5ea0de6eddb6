"""The CLIs as a user runs them: `qatpass export` and `qatpass diff` in a subprocess whose cwd holds
the user's files, both loading models through `qatpass.model_spec.load_model_spec`."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import LLAMA_QUANTIZED, tiny_llama
from torch import nn

from qatpass.export.torch_export import load_pt2, qatpass_op_nodes
from qatpass.lowering import convert
from qatpass.model_spec import EXAMPLE_BATCH, SpecError, hf_example_inputs, load_model_spec

from conftest import EXACT

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
# the `qatpass` console script: its sys.path[0] is its own folder, not the cwd
ORT = {"rtol": 1e-4, "atol": 1e-4}  # onnxruntime's MatMulNBits sums in its own order
LAUNCHER = "import sys\nfrom qatpass.cli import main\nsys.exit(main())\n"

FACTORIES = textwrap.dedent(
    """
    import torch
    from torch import nn


    def mlp():
        torch.manual_seed(0)
        # 2.weight has K=48: not a multiple of the default group 32, left in high precision
        model = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 16))
        return model, (torch.randn(3, 64),)


    def llama():
        import transformers

        torch.manual_seed(0)
        config = transformers.LlamaConfig(
            vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2,
        )
        return transformers.LlamaForCausalLM(config).eval()  # a bare model: default example
    """
)


def qatpass_cli(cwd: Path, *argv: str) -> subprocess.CompletedProcess:
    """`qatpass ARGV` as the console script runs it, in `cwd`, importing this checkout."""
    launcher = cwd / "bin" / "qatpass_launcher.py"
    launcher.parent.mkdir(exist_ok=True)
    launcher.write_text(LAUNCHER)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(launcher), *argv]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture
def user_dir(tmp_path: Path, monkeypatch):
    """A folder with the user's factories; what the in-process loader imports is dropped after."""
    (tmp_path / "mymodels.py").write_text(FACTORIES)
    monkeypatch.setattr(sys, "path", list(sys.path))
    before = set(sys.modules)
    yield tmp_path
    for name in set(sys.modules) - before:
        if name == "mymodels" or name.startswith("qatpass_model_spec_"):
            del sys.modules[name]


def run_ort(path: Path, **inputs: torch.Tensor) -> np.ndarray:
    ort = pytest.importorskip("onnxruntime")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {k: v.numpy() for k, v in inputs.items()})[0]


@pytest.mark.parametrize("command", ["export", "diff"])
def test_help_states_the_model_spec_and_factory_contract(tmp_path, command):
    proc = qatpass_cli(tmp_path, command, "--help")
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())
    for words in (
        "module:factory",
        "path/to/file.py:factory",
        "HF transformers model directory",
        "returns (model, example_inputs) or just a model",
        "a dict of keyword tensors",
        "batch 2",
    ):
        assert words in text


def test_export_onnx_module_from_cwd_warns_with_count(user_dir):
    onnx = pytest.importorskip("onnx")
    proc = qatpass_cli(user_dir, "export", "--format", "onnx", "--model", "mymodels:mlp", "--out",
                       "m.onnx")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "wrote onnx to m.onnx" in proc.stdout
    warning = [line for line in proc.stderr.splitlines() if line.startswith("WARNING qatpass")]
    assert len(warning) == 1 and "1 weight(s) stay in high precision" in warning[0]
    assert "2.weight: reduction dim 1 of size 48 is not divisible by group_size 32" in warning[0]
    nodes = [
        n for n in onnx.load(str(user_dir / "m.onnx")).graph.node if n.op_type == "MatMulNBits"
    ]
    assert len(nodes) == 1
    model, _ = load_model_spec(str(user_dir / "mymodels.py") + ":mlp")
    x = torch.randn(5, 64)  # another batch than the example's 3
    with torch.no_grad():
        ref = convert(model)(x).numpy()
    np.testing.assert_allclose(run_ort(user_dir / "m.onnx", input=x), ref, **ORT)


def test_export_pt2_file_spec_bare_hf_model(user_dir):
    out = user_dir / "out" / "llama.pt2"
    proc = qatpass_cli(user_dir, "export", "--format", "pt2", "--model", "mymodels.py:llama",
                       "--out", "out/llama.pt2")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    # lm_head is left alone by the filters: no warning from qatpass (other packages may warn)
    assert "WARNING qatpass" not in proc.stderr
    ep = load_pt2(out)
    assert len(qatpass_op_nodes(ep.graph_module)) == 14
    model, example = load_model_spec(str(user_dir / "mymodels.py") + ":llama")
    assert list(example) == ["input_ids"] and example["input_ids"].shape == (EXAMPLE_BATCH, 16)
    qmodel = convert(model)
    for batch, seq in [(1, 5), (3, 9)]:
        ids = torch.randint(0, 128, (batch, seq))
        with torch.no_grad():
            torch.testing.assert_close(ep.module()(input_ids=ids), qmodel(ids).logits, **EXACT)
    proc = qatpass_cli(user_dir, "export", "--format", "pt2", "--model", "mymodels.py:llama",
                       "--out", "out/llama.pt2")  # fmt: skip
    assert proc.returncode == 2 and "--overwrite" in proc.stderr


def test_hf_directory_export_and_diff_load_alike(tmp_path):
    torch.manual_seed(0)
    model = tiny_llama()  # default config: use_cache=True
    model.save_pretrained(tmp_path / "hf")
    proc = qatpass_cli(tmp_path, "export", "--format", "onnx", "--model", "hf", "--out", "m.onnx")
    assert proc.returncode == 0, proc.stderr[-3000:]
    qmodel = convert(model)
    for batch, seq in [(1, 4), (3, 11)]:
        ids = torch.randint(0, 128, (batch, seq))
        with torch.no_grad():
            ref = qmodel(ids).logits.numpy()
        np.testing.assert_allclose(run_ort(tmp_path / "m.onnx", input_ids=ids), ref, **ORT)
    proc = qatpass_cli(tmp_path, "diff", "hf", "--seq-len", "8")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert all(fqn in proc.stdout for fqn in LLAMA_QUANTIZED)


def test_bad_spec_exits_2_in_both_clis(user_dir):
    for argv in (["diff", "mymodels:missing"],
                 ["export", "--format", "pt2", "--model", "mymodels:missing", "--out", "x.pt2"]):  # fmt: skip
        proc = qatpass_cli(user_dir, *argv)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert "error: 'mymodels' has no callable 'missing'" in proc.stderr
    assert not (user_dir / "x.pt2").exists()


# ----------------------------------------------------------------------------- the loader itself


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("nowhere_module_xyz:make", "cannot import module 'nowhere_module_xyz'"),
        ("mymodels:missing", "'mymodels' has no callable 'missing'"),
        ("missing.py:make", "no file"),
        ("not-a-spec", "neither an existing directory nor 'module:factory'"),
        (":make", "must be 'module:factory'"),
    ],
)
def test_bad_specs(user_dir, monkeypatch, spec, message):
    monkeypatch.chdir(user_dir)
    with pytest.raises(SpecError, match=re.escape(message)):
        load_model_spec(spec)


def test_factory_results(user_dir, monkeypatch):
    monkeypatch.chdir(user_dir)
    (user_dir / "more.py").write_text(
        "import torch\nfrom torch import nn\n"
        "def plain():\n    return nn.Linear(4, 4)\n"
        "def three():\n    return 3\n"
        "def kw():\n    return nn.Linear(4, 4), {'input': torch.randn(2, 4)}\n"
        "def bad_inputs():\n    return nn.Linear(4, 4), 3.0\n"
    )
    model, inputs = load_model_spec("more.py:kw")
    assert isinstance(model, nn.Linear) and list(inputs) == ["input"]
    with pytest.raises(SpecError, match="Linear is not a transformers model"):
        load_model_spec("more.py:plain")
    with pytest.raises(SpecError, match=r"must return \(model, example_inputs\) or a model"):
        load_model_spec("more.py:three")
    with pytest.raises(SpecError, match="example_inputs of type float"):
        load_model_spec("more.py:bad_inputs")
    with pytest.raises(SpecError, match="without config.json"):
        load_model_spec(str(user_dir))


def test_hf_examples_have_batch_two_and_own_decoder_length(tmp_path):
    t5 = transformers.T5ForConditionalGeneration(
        transformers.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=1,
                              num_heads=4, decoder_start_token_id=0)
    )  # fmt: skip
    t5.save_pretrained(tmp_path / "t5")
    model, inputs = load_model_spec(str(tmp_path / "t5"), seq_len=10)
    assert isinstance(model, transformers.T5ForConditionalGeneration) and not model.training
    assert {k: tuple(v.shape) for k, v in inputs.items()} == {
        "input_ids": (2, 10),
        "decoder_input_ids": (2, 5),
    }
    assert all(int(v.max()) < 64 for v in inputs.values())
    vit = transformers.ViTModel(
        transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                               intermediate_size=64, image_size=16, patch_size=8)
    )  # fmt: skip
    assert hf_example_inputs(vit)["pixel_values"].shape == (2, 3, 16, 16)


def test_export_compressed_tensors_nvfp4_loads_back_equal_to_convert(user_dir):
    from qatpass.export import load_compressed_tensors
    from qatpass.scheme_fp4 import Fp4Scheme

    proc = qatpass_cli(user_dir, "export", "--format", "compressed-tensors", "--model",
                       "mymodels.py:llama", "--out", "ckpt", "--scheme", "nvfp4")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = json.loads((user_dir / "ckpt" / "config.json").read_text())
    groups = config["quantization_config"]["config_groups"]
    assert {g["format"] for g in groups.values()} == {"nvfp4-pack-quantized"}
    model, _ = load_model_spec(str(user_dir / "mymodels.py") + ":llama")
    ids = torch.randint(0, 128, (2, 7))
    with torch.no_grad():
        ref = convert(model, scheme=Fp4Scheme("nvfp4"))(ids).logits
        out = load_compressed_tensors(user_dir / "ckpt")(ids).logits
    torch.testing.assert_close(out, ref, **EXACT)


def test_export_fp4_refuses_a_group_size(user_dir):
    proc = qatpass_cli(user_dir, "export", "--format", "compressed-tensors", "--model",
                       "mymodels.py:llama", "--out", "ckpt", "--scheme", "mxfp4",
                       "--group-size", "64")  # fmt: skip
    assert proc.returncode != 0 and "--group-size is an INT4 option" in proc.stderr
