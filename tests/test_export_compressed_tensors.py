"""compressed-tensors `pack-quantized` export: files, the compressed_tensors library's reading of
them (bit-exact), the in-memory state dict, loading back, and every refusal."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import MOE_INTERMEDIATE
from tiny_models import export_llama as tiny_llama
from tiny_models import export_moe as tiny_moe

import qatpass
from qatpass.config import QatConfig
from qatpass.export import compressed_tensors as ct
from qatpass.export import safetensors_io
from qatpass.export.compressed_tensors import (
    load_compressed_tensors,
    packed_state_dict,
    read_checkpoint,
    save_compressed_tensors,
)
from qatpass.lowering import convert
from qatpass.scheme import Int4Scheme

from conftest import EXACT

transformers = pytest.importorskip("transformers")
ctlib = pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors.pack_quantized.helpers import (  # noqa: E402
    pack_to_int32,
    unpack_from_int32,
)
from compressed_tensors.entrypoints.convert.converters.ct_dequantizer import (  # noqa: E402
    CompressedTensorsDequantizer,
)
from compressed_tensors.quantization import QuantizationConfig  # noqa: E402

MOE_I = MOE_INTERMEDIATE


MODELS = {"llama": tiny_llama, "moe": tiny_moe}
SCHEMES = {
    "sym-g32": Int4Scheme(),
    "asym-g32": Int4Scheme(symmetric=False),
    "sym-channel": Int4Scheme(group_size=-1),
    "asym-g64-q8": Int4Scheme(group_size=64, symmetric=False, qrange=(-8, 7)),
}


def expected_dequantized(model, scheme: Int4Scheme) -> dict[str, torch.Tensor]:
    """Per-module weights the checkpoint stands for, from qatpass's own formulas, in bf16."""
    out = {}
    for s in qatpass.select_weights(model, QatConfig(scheme=scheme))[0]:
        w = dict(model.named_parameters())[s.fqn]
        dq = qatpass.dequantize(qatpass.quantize(w, scheme, dim=s.dim), scheme.scale_dtype)
        if s.kind == "linear":
            out[s.module_name] = dq
            continue
        for e in range(dq.shape[0]):
            if s.attr == "gate_up_proj":
                out[f"{s.module_name}.{e}.gate_proj"] = dq[e, :MOE_I]
                out[f"{s.module_name}.{e}.up_proj"] = dq[e, MOE_I:]
            else:
                out[f"{s.module_name}.{e}.{s.attr}"] = dq[e]
    return out


@pytest.mark.parametrize("scheme_id", list(SCHEMES))
@pytest.mark.parametrize("model_id", list(MODELS))
def test_library_decompresses_to_qatpass_dequantize(tmp_path, model_id, scheme_id):
    model, scheme = MODELS[model_id](), SCHEMES[scheme_id]
    save_compressed_tensors(model, tmp_path / "ckpt", QatConfig(scheme=scheme))
    dequantizer = CompressedTensorsDequantizer(tmp_path / "ckpt", dtype=scheme.scale_dtype)
    files = load_file(tmp_path / "ckpt" / "model.safetensors")
    out = dequantizer.validate(files)  # also refuses leftover / orphan qparams
    expected = expected_dequantized(model, scheme)
    assert len(expected) > 0
    for name, ref in expected.items():
        torch.testing.assert_close(out.pop(f"{name}.weight"), ref, **EXACT)
    # everything else is the model's own tensors, as they are
    state = model.state_dict()
    selected = qatpass.select_weights(model, QatConfig(scheme=scheme))[0]
    assert set(out) == set(state) - {s.fqn for s in selected}
    for name, t in out.items():
        torch.testing.assert_close(t, state[name], **EXACT)


@pytest.mark.parametrize("model_id", list(MODELS))
def test_config_json(tmp_path, model_id):
    model = MODELS[model_id]()
    save_compressed_tensors(model, tmp_path / "c", QatConfig(scheme=Int4Scheme(group_size=64)))
    cfg = json.loads((tmp_path / "c" / "config.json").read_text())
    assert cfg["model_type"] == model.config.model_type
    assert cfg["architectures"] == [type(model).__name__]
    qc = cfg["quantization_config"]
    parsed = QuantizationConfig.model_validate(qc)  # the library accepts it as is
    assert parsed.format == "pack-quantized" and parsed.quant_method == "compressed-tensors"
    (group,) = parsed.config_groups.values()
    assert group.targets == ["Linear"]
    w = group.weights
    assert (w.num_bits, w.type, w.symmetric, w.strategy, w.group_size) == (
        4,
        "int",
        True,
        "group",
        64,
    )
    assert group.input_activations is None
    assert qc["qatpass"]["scheme"] == Int4Scheme(group_size=64).to_dict()
    if model_id == "moe":
        assert qc["ignore"] == ["model.layers.0.mlp.gate", "model.layers.1.mlp.gate", "lm_head"]
    else:
        assert qc["ignore"] == ["lm_head"]


def test_channel_strategy_config(tmp_path):
    save_compressed_tensors(
        tiny_llama(), tmp_path / "c", QatConfig(scheme=Int4Scheme(group_size=-1))
    )
    qc = json.loads((tmp_path / "c" / "config.json").read_text())["quantization_config"]
    w = QuantizationConfig.model_validate(qc).config_groups["group_0"].weights
    assert (w.strategy, w.group_size) == ("channel", None)


def test_moe_per_expert_names_and_split(tmp_path):
    model = tiny_moe()
    save_compressed_tensors(model, tmp_path / "c")
    files = load_file(tmp_path / "c" / "model.safetensors")
    fused = qatpass.quantize(model.model.layers[1].mlp.experts.gate_up_proj)
    for e in range(4):
        base = f"model.layers.1.mlp.experts.{e}"
        assert torch.equal(files[f"{base}.gate_proj.weight_packed"], fused.qweight[e, :MOE_I])
        assert torch.equal(files[f"{base}.up_proj.weight_packed"], fused.qweight[e, MOE_I:])
        assert files[f"{base}.down_proj.weight_packed"].shape == (64, MOE_I // 8)
        assert files[f"{base}.down_proj.weight_shape"].tolist() == [64, MOE_I]
    assert not any(k.endswith("gate_up_proj") or k.endswith("experts.down_proj") for k in files)


@pytest.mark.parametrize("n", [8, 12, 33])
def test_zero_point_packing_matches_library(n):
    zeros = torch.randint(-8, 8, (n, 3), dtype=torch.int8)
    packed = ct.pack_zero_points(zeros)
    torch.testing.assert_close(packed, pack_to_int32(zeros, 4, packed_dim=0), **EXACT)
    torch.testing.assert_close(ct.unpack_zero_points(packed, n), zeros, **EXACT)


def test_weight_packed_is_library_packing():
    p = qatpass.quantize(torch.randn(24, 64))
    codes = qatpass.unpack_int4(p.qweight)
    torch.testing.assert_close(pack_to_int32(codes, 4), p.qweight, **EXACT)
    torch.testing.assert_close(
        unpack_from_int32(p.qweight, 4, torch.Size([24, 64])), codes, **EXACT
    )


def test_weight_shape_dtype_is_library_dtype(tmp_path):
    save_compressed_tensors(tiny_llama(), tmp_path / "c")
    files = load_file(tmp_path / "c" / "model.safetensors")
    shape = files["model.layers.0.mlp.down_proj.weight_shape"]
    assert shape.dtype == torch.tensor(torch.Size([1, 2])).dtype == torch.int64
    assert shape.tolist() == [64, 128]


@pytest.mark.parametrize("model_id", list(MODELS))
def test_packed_state_dict_equals_files(tmp_path, model_id):
    model = MODELS[model_id]()
    sd = packed_state_dict(model)
    save_compressed_tensors(model, tmp_path / "c")
    files = load_file(tmp_path / "c" / "model.safetensors")
    assert sd.keys() == files.keys()
    for k in sd:
        torch.testing.assert_close(sd[k], files[k], **EXACT)


def test_sharded_checkpoint(tmp_path):
    model = tiny_moe()
    save_compressed_tensors(model, tmp_path / "c", max_shard_size="20KB")
    index = json.loads((tmp_path / "c" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert not (tmp_path / "c" / "model.safetensors").exists()
    sd = packed_state_dict(model)
    assert set(index["weight_map"]) == set(sd)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in sd.values())
    tensors = safetensors_io.read_tensors(tmp_path / "c")
    for k in sd:
        torch.testing.assert_close(tensors[k], sd[k], **EXACT)


def test_tied_embeddings_follow_save_pretrained(tmp_path):
    model = tiny_llama(tie=True)
    save_compressed_tensors(model, tmp_path / "c")
    files = load_file(tmp_path / "c" / "model.safetensors")
    assert "lm_head.weight" not in files and "model.embed_tokens.weight" in files
    cfg = json.loads((tmp_path / "c" / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is True
    assert "lm_head" in cfg["quantization_config"]["ignore"]


def test_model_is_not_modified(tmp_path):
    model = tiny_moe()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    save_compressed_tensors(model, tmp_path / "c", QatConfig(scheme=Int4Scheme(symmetric=False)))
    packed_state_dict(model)
    after = model.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        torch.testing.assert_close(after[k], before[k], **EXACT)


@pytest.mark.parametrize("model_id", list(MODELS))
@pytest.mark.parametrize("scheme_id", ["sym-g32", "asym-g64-q8"])
def test_read_checkpoint_gives_back_packed_weights(tmp_path, model_id, scheme_id):
    model, scheme = MODELS[model_id](), SCHEMES[scheme_id]
    save_compressed_tensors(model, tmp_path / "c", QatConfig(scheme=scheme))
    _, read_scheme, packed, _ = read_checkpoint(tmp_path / "c")
    assert read_scheme == scheme
    gathered = ct._gather(model, packed)
    params = dict(model.named_parameters())
    selected = qatpass.select_weights(model, QatConfig(scheme=scheme))[0]
    assert {(s.module_name, s.attr) for s in selected} == set(gathered)
    for s in selected:
        kind, got = gathered[(s.module_name, s.attr)]
        ref = qatpass.quantize(params[s.fqn], scheme, dim=s.dim)
        assert kind == s.kind and got.shape == ref.shape and got.dim == ref.dim
        torch.testing.assert_close(got.qweight, ref.qweight, **EXACT)
        torch.testing.assert_close(got.scales, ref.scales, **EXACT)
        if scheme.symmetric:
            assert got.zeros is None
        else:
            torch.testing.assert_close(got.zeros, ref.zeros, **EXACT)


@pytest.mark.parametrize("model_id", list(MODELS))
@pytest.mark.parametrize("scheme_id", ["sym-g32", "asym-g64-q8"])
def test_load_matches_convert(tmp_path, model_id, scheme_id):
    model, config = MODELS[model_id](), QatConfig(scheme=SCHEMES[scheme_id])
    save_compressed_tensors(model, tmp_path / "c", config)
    ids = torch.randint(0, 128, (2, 7))
    qmodel = convert(model, config)
    with torch.no_grad():
        ref = qmodel(ids).logits
        for skeleton in (None, MODELS[model_id]()):
            loaded = load_compressed_tensors(tmp_path / "c", model=skeleton)
            torch.testing.assert_close(loaded(ids).logits, ref, **EXACT)
    # and the loaded model writes the same checkpoint again
    resaved = packed_state_dict(loaded)
    files = load_file(tmp_path / "c" / "model.safetensors")
    assert resaved.keys() == files.keys()
    for k in files:
        torch.testing.assert_close(resaved[k], files[k], **EXACT)


def test_load_bf16_model(tmp_path):
    model = tiny_llama().to(torch.bfloat16)
    save_compressed_tensors(model, tmp_path / "c")
    loaded = load_compressed_tensors(tmp_path / "c")
    assert loaded.dtype == torch.bfloat16
    ids = torch.randint(0, 128, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, convert(model)(ids).logits, **EXACT)


@pytest.mark.parametrize("model_id", list(MODELS))
def test_converted_model_exports_the_same_checkpoint(tmp_path, model_id):
    model = MODELS[model_id]()
    config = QatConfig(scheme=Int4Scheme(symmetric=False))
    qmodel = convert(model, config)
    from_training = packed_state_dict(model, config)
    from_converted = packed_state_dict(qmodel)
    assert from_converted.keys() == from_training.keys()
    for k in from_training:
        torch.testing.assert_close(from_converted[k], from_training[k], **EXACT)
    save_compressed_tensors(qmodel, tmp_path / "c")
    _, scheme, _, _ = read_checkpoint(tmp_path / "c")
    assert scheme == config.scheme
    with pytest.raises(ValueError, match="disagrees with config.scheme"):
        packed_state_dict(qmodel, QatConfig())


def test_load_checkpoint_without_qatpass_record(tmp_path):
    """A checkpoint from another tool (no qatpass key): compressed-tensors' (-8, 7) convention."""
    model = tiny_llama()
    save_compressed_tensors(model, tmp_path / "c")
    _rewrite_config(tmp_path / "c", lambda c: c["quantization_config"].pop("qatpass"))
    _, scheme, _, _ = read_checkpoint(tmp_path / "c")
    assert scheme.qrange == (-8, 7) and scheme.group_size == 32 and scheme.symmetric
    ids = torch.randint(0, 128, (2, 5))
    with torch.no_grad():  # stored codes and scales: the same weights whatever the qrange
        ref = convert(model)(ids).logits
        torch.testing.assert_close(
            load_compressed_tensors(tmp_path / "c")(ids).logits, ref, **EXACT
        )


def test_load_leaves_the_skeleton_alone(tmp_path):
    save_compressed_tensors(tiny_llama(), tmp_path / "c")
    skeleton = tiny_llama()
    before = {k: v.clone() for k, v in skeleton.state_dict().items()}
    load_compressed_tensors(tmp_path / "c", model=skeleton)
    assert all(torch.equal(before[k], v) for k, v in skeleton.state_dict().items())
    assert all(isinstance(m, torch.nn.Linear) for m in [skeleton.model.layers[0].mlp.up_proj])


# ----------------------------------------------------------------------------- refusals


def test_refuses_existing_non_empty_dir(tmp_path):
    out = tmp_path / "c"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        save_compressed_tensors(tiny_llama(), out)
    assert (out / "keep.txt").read_text() == "x"
    save_compressed_tensors(tiny_llama(), out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]  # no temp dirs left


def test_empty_existing_dir_is_fine(tmp_path):
    (tmp_path / "c").mkdir()
    save_compressed_tensors(tiny_llama(), tmp_path / "c")
    assert (tmp_path / "c" / "config.json").is_file()


def test_refuses_file_as_out_dir(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(FileExistsError, match="not a directory"):
        save_compressed_tensors(tiny_llama(), tmp_path / "f")


def test_refuses_unwritable_parent(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(PermissionError, match="cannot write"):
        save_compressed_tensors(tiny_llama(), tmp_path / "file" / "c")


def test_nothing_half_written_on_failure(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise OSError("disk full")

    out = tmp_path / "c"
    out.mkdir()
    (out / "old.txt").write_text("old")
    monkeypatch.setattr(ct, "write_shards", boom)
    with pytest.raises(OSError, match="disk full"):
        save_compressed_tensors(tiny_llama(), out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]
    assert [p.name for p in out.iterdir()] == ["old.txt"]


def test_refuses_when_nothing_is_quantized(tmp_path):
    with pytest.raises(ValueError, match="nothing to pack"):
        save_compressed_tensors(tiny_llama(), tmp_path / "c", QatConfig(include=("nomatch",)))
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize(
    ("size", "error"),
    [("5 parsecs", ValueError), (0, ValueError), (1.5, TypeError), (True, TypeError)],
)
def test_refuses_bad_max_shard_size(tmp_path, size, error):
    with pytest.raises(error, match="max_shard_size"):
        save_compressed_tensors(tiny_llama(), tmp_path / "c", max_shard_size=size)


def test_refuses_bad_model_and_config(tmp_path):
    with pytest.raises(TypeError, match="torch.nn.Module"):
        save_compressed_tensors({"w": torch.zeros(2)}, tmp_path / "c")
    with pytest.raises(TypeError, match="QatConfig"):
        packed_state_dict(tiny_llama(), config={"group_size": 32})


@pytest.fixture
def saved(tmp_path):
    save_compressed_tensors(tiny_llama(), tmp_path / "c", max_shard_size="40KB")
    return tmp_path / "c"


def _shard(path):
    return sorted(path.glob("model-*.safetensors"))[0]


def test_load_refuses_truncated_file(saved):
    shard = _shard(saved)
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(ValueError, match=shard.name):
        read_checkpoint(saved)


def test_load_refuses_garbage_header(saved):
    shard = _shard(saved)
    shard.write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match=shard.name):
        read_checkpoint(saved)


def test_load_refuses_missing_shard(saved):
    _shard(saved).unlink()
    with pytest.raises(FileNotFoundError, match="missing"):
        read_checkpoint(saved)


def _rewrite_config(path, edit):
    cfg = json.loads((path / "config.json").read_text())
    edit(cfg)
    (path / "config.json").write_text(json.dumps(cfg))


def _weights(cfg):
    return cfg["quantization_config"]["config_groups"]["group_0"]["weights"]


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda c: _weights(c).update(group_size=64), "group_size 64"),
        (lambda c: _weights(c).update(group_size=48), "not runnable"),
        (lambda c: _weights(c).update(symmetric=False), "symmetric=False"),
        (lambda c: _weights(c).update(num_bits=8), "4-bit"),
        (lambda c: _weights(c).update(strategy="tensor"), "strategy"),
        (lambda c: c["quantization_config"].update(format="int-quantized"), "pack-quantized"),
        (lambda c: c.pop("quantization_config"), "no quantization_config"),
    ],
)
def test_load_refuses_config_that_disagrees(saved, edit, match):
    _rewrite_config(saved, edit)
    with pytest.raises(ValueError, match=match):
        read_checkpoint(saved)


def test_load_refuses_tampered_tensors(tmp_path):
    model = tiny_llama()
    sd = packed_state_dict(model)
    cases = {
        "weight_packed dtype": (
            "model.layers.0.mlp.up_proj.weight_packed",
            lambda t: t.to(torch.int64),
        ),
        "weight_packed shape": ("model.layers.0.mlp.up_proj.weight_packed", lambda t: t[:, :4]),
        "weight_scale shape": ("model.layers.0.mlp.up_proj.weight_scale", lambda t: t[:, :1]),
        "weight_shape": ("model.layers.0.mlp.up_proj.weight_shape", lambda t: t * 2),
        "missing weight_scale": ("model.layers.0.mlp.up_proj.weight_scale", None),
    }
    cfg = json.dumps(
        {**model.config.to_dict(), "quantization_config": ct.quantization_config(Int4Scheme(), [])}
    )
    for i, (name, change) in enumerate(cases.values()):
        tensors = dict(sd)
        if change is None:
            del tensors[name]
        else:
            tensors[name] = change(tensors[name]).contiguous()
        d = tmp_path / str(i)
        d.mkdir()
        safetensors_io.write_shards(tensors, d)
        (d / "config.json").write_text(cfg)
        with pytest.raises(ValueError, match="model.layers.0.mlp.up_proj"):
            read_checkpoint(d)


def test_load_refuses_other_model(tmp_path):
    save_compressed_tensors(tiny_llama(), tmp_path / "c")
    _, _, packed, _ = read_checkpoint(tmp_path / "c")
    with pytest.raises(ValueError, match="not a linear or expert"):
        ct._gather(tiny_moe(), packed)
    with pytest.raises(ValueError, match="not a linear or expert"):
        load_compressed_tensors(tmp_path / "c", model=tiny_moe())
    bigger = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=128,
            hidden_size=64,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    with pytest.raises(ValueError, match="weight_shape"):
        load_compressed_tensors(tmp_path / "c", model=bigger)


def test_load_refuses_missing_tensor(tmp_path):
    model = tiny_llama()
    sd = packed_state_dict(model)
    del sd["model.norm.weight"]
    safetensors_io.write_shards(sd, tmp_path)
    cfg = {**model.config.to_dict(), "architectures": ["LlamaForCausalLM"]}
    cfg["quantization_config"] = ct.quantization_config(Int4Scheme(), ["lm_head"])
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="model.norm.weight"):
        load_compressed_tensors(tmp_path)


# ----------------------------------------------------------------------------- CLI


def cli_factory():
    torch.manual_seed(0)
    return tiny_llama(), (torch.randint(0, 128, (2, 7)),)


def test_cli_factory_spec(tmp_path, capsys):
    from qatpass.cli import main

    out = tmp_path / "c"
    spec = "test_export_compressed_tensors:cli_factory"
    argv = ["export", "--format", "compressed-tensors", "--model", spec, "--out", str(out)]
    assert main([*argv, "--group-size", "64"]) == 0
    assert "wrote compressed-tensors" in capsys.readouterr().out
    _, scheme, _, _ = read_checkpoint(out)
    assert scheme.group_size == 64
    expected = packed_state_dict(cli_factory()[0], QatConfig(scheme=Int4Scheme(group_size=64)))
    files = load_file(out / "model.safetensors")
    assert files.keys() == expected.keys()
    assert all(torch.equal(files[k], expected[k]) for k in files)
    assert main(argv) == 2  # exists: refused without --overwrite
    assert "overwrite" in capsys.readouterr().err
    assert main([*argv, "--overwrite"]) == 0


def test_cli_hf_directory_spec(tmp_path):
    from qatpass.export.cli import main

    model = tiny_llama()
    model.save_pretrained(tmp_path / "hf")
    out = tmp_path / "c"
    assert (
        main(["--format", "compressed-tensors", "--model", str(tmp_path / "hf"), "--out", str(out)])
        == 0
    )
    files = load_file(out / "model.safetensors")
    expected = packed_state_dict(model)
    assert all(torch.equal(files[k], expected[k]) for k in expected)


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("no_such_module_xyz:f", "cannot import"),
        ("json:no_such_factory", "no callable"),
        ("json:dumps", "dumps"),
        ("not-a-spec", "neither"),
    ],
)
def test_cli_refuses_bad_model_spec(tmp_path, capsys, spec, match):
    from qatpass.export.cli import main

    argv = ["--format", "compressed-tensors", "--model", spec, "--out", str(tmp_path / "c")]
    assert main(argv) == 2
    assert match in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_cli_refuses_bad_group_size_and_format(tmp_path, capsys):
    from qatpass.export.cli import main

    spec = "test_export_compressed_tensors:cli_factory"
    argv = ["--format", "compressed-tensors", "--model", spec, "--out", str(tmp_path / "c")]
    assert main([*argv, "--group-size", "48"]) == 2
    assert "group_size" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--format", "gguf", "--model", spec, "--out", str(tmp_path / "c")])


def test_transformers_loads_the_checkpoint(tmp_path):
    """HF transformers' compressed-tensors loader reads our files into the same weights."""
    model = tiny_llama()
    save_compressed_tensors(model, tmp_path / "c")
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "c", quantization_config=transformers.CompressedTensorsConfig(dequantize=True)
    )
    state = hf.state_dict()
    for name, ref in expected_dequantized(model, Int4Scheme()).items():
        # the library dequantizes in the scales' dtype (bf16): our values, rounded to bf16
        torch.testing.assert_close(state[f"{name}.weight"].to(ref.dtype), ref, **EXACT)
    torch.testing.assert_close(state["model.norm.weight"], model.model.norm.weight, **EXACT)


@pytest.mark.parametrize("scheme_id", list(SCHEMES))
def test_library_compressor_with_fp32_scales_is_fp32_dequantize(scheme_id):
    """In fp32 (scales widened losslessly) the library's decompress is qatpass.dequantize exactly."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme

    scheme = SCHEMES[scheme_id]
    qc = ct.quantization_config(scheme, [])["config_groups"]["group_0"]
    w = torch.randn(40, 128)
    p = qatpass.quantize(w, scheme)
    state = {
        k.removeprefix("m."): v
        for k, v in ct._module_tensors("m", p.qweight, p.scales.float(), p.zeros, 128).items()
    }
    out = PackedQuantizationCompressor.decompress(state, QuantizationScheme.model_validate(qc))
    torch.testing.assert_close(out["weight"], qatpass.dequantize(p), **EXACT)


def test_the_plan_travels_into_the_checkpoint_and_back(tmp_path):
    model = tiny_llama()
    b = qatpass.backend(compiler="aot_eager")
    ids = torch.randint(0, 128, (2, 8))
    torch.compile(model, backend=b)(ids)
    qmodel = qatpass.convert(model, plan=b.plan)
    out = qatpass.export.save_compressed_tensors(qmodel, tmp_path / "ckpt")
    cfg = json.loads((out / "config.json").read_text())
    recorded = cfg["quantization_config"]["qatpass"]["plan"]
    assert qatpass.QuantPlan.from_dict(recorded).quantized_names == b.plan.quantized_names
    loaded = qatpass.export.load_compressed_tensors(out)
    assert loaded.qatpass_plan.quantized_names == b.plan.quantized_names
    assert loaded.qatpass_plan.skipped["lm_head.weight"].reason.startswith("the output head")
    # a tampered plan is refused with the file's name
    recorded["version"] = 99
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"config.json: the recorded qatpass plan"):
        qatpass.export.load_compressed_tensors(out)
