"""The graph-diff tool: structure and numbers on tiny HF Llama / Qwen3-MoE, HTML (parsed and
rendered in headless chromium), JSON, the CLI and QATPASS_DEBUG_DIR dumps."""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import struct
import subprocess
from html.parser import HTMLParser

import pytest
import torch
import torch.nn.functional as F
from tiny_models import tiny_llama, tiny_qwen3_moe
from torch import nn

import qatpass
from qatpass.cli import main as qatpass_main
from qatpass.config import DEFAULT_EXCLUDE
from qatpass.debug_dump import dump_graph
from qatpass.graph_diff import DiffReport, diff, sqnr_db
from qatpass.graph_diff.cli import main as diff_main
from qatpass.graph_diff.numbers import DEQUANT_PATH, KERNEL_PATH
from qatpass.graph_diff.structure import diff_nodes, snapshot
from qatpass.kernels.cpu.int4pack import CPU_PATH_NAMES
from qatpass.kernels.cpu.native import kernel_unavailable_reason
from qatpass.passes.plan import QuantPlan
from qatpass.report import GraphSummary, QuantizedParam

transformers = pytest.importorskip("transformers")

FQ_OP = "qatpass::fake_quantize_int4"
LLAMA_PROJ = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
LLAMA_MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
# default excludes (lm_head, embeddings, routers) plus o_proj
EXCLUDE = [*DEFAULT_EXCLUDE, r"o_proj"]
LLAMA_QUANTIZED = {f"model.layers.{i}.{m}.weight" for i in range(2) for m in LLAMA_PROJ + LLAMA_MLP}
MOE_QUANTIZED = {f"model.layers.{i}.{m}.weight" for i in range(2) for m in LLAMA_PROJ} | {
    f"model.layers.{i}.mlp.experts.{p}" for i in range(2) for p in ("gate_up_proj", "down_proj")
}


class Small(nn.Module):
    """A quantized linear, a linear whose K=40 is not divisible by 32, and a norm."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 40)
        self.odd = nn.Linear(40, 16)
        self.norm = nn.LayerNorm(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.odd(torch.relu(self.fc(x))))


class Broken(nn.Module):
    """Two linears with a graph break between them."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(32, 32)
        self.b = nn.Linear(32, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.a(x)
        torch._dynamo.graph_break()
        return self.b(x)


@pytest.fixture(scope="module")
def llama_case():
    torch.manual_seed(0)
    model = tiny_llama()
    ids = torch.randint(0, 128, (2, 8))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    report = diff(model, (ids,), exclude=EXCLUDE)
    return model, ids, state, report


@pytest.fixture(scope="module")
def moe_report():
    torch.manual_seed(0)
    model = tiny_qwen3_moe()
    return model, diff(model, (torch.randint(0, 128, (1, 8)),), exclude=EXCLUDE)


# --- structure ---
def test_llama_one_fake_quant_node_per_quantized_param(llama_case):
    _, _, _, report = llama_case
    assert len(report.graphs) == 1 and report.graph_break_count == 0
    g = report.graphs[0]
    assert set(report.quantized_names) == LLAMA_QUANTIZED
    assert len(g.added) == len(LLAMA_QUANTIZED) == 12
    assert {c.op for c in g.added} == {FQ_OP}
    assert {c.fqn for c in g.added} == LLAMA_QUANTIZED
    assert g.nodes_after - g.nodes_before == 12 and g.removed == []
    # every quantized weight feeds exactly one linear, now rewired to the fake-quant node
    assert len(g.rewired) == 12 and {c.op for c in g.rewired} == {"linear"}
    for fqn in LLAMA_QUANTIZED:
        (added,) = [c for c in g.changes_for(fqn) if c.kind == "added"]
        (rewired,) = [c for c in g.changes_for(fqn) if c.kind == "rewired"]
        assert added.node in rewired.detail.split("->")[1]
        assert added.group_size == 32 and added.dim == 1
        assert added.shape == tuple(dict(llama_case[0].named_parameters())[fqn].shape)


def test_excluded_and_non_matmul_params_are_skipped_with_reasons(llama_case):
    _, _, _, report = llama_case
    skipped = {s.fqn: s for s in report.skipped(matmul_weights_only=False)}
    for i in range(2):
        s = skipped[f"model.layers.{i}.self_attn.o_proj.weight"]
        assert s.matmul_weight and s.reason == "excluded by filter 'o_proj'"
    assert skipped["lm_head.weight"].reason.startswith("the output head")
    assert skipped["model.embed_tokens.weight"].reason == "not a matmul weight (used by embedding)"
    assert not skipped["model.norm.weight"].matmul_weight
    text = report.text()
    assert (
        "left alone: model.layers.0.self_attn.o_proj.weight 64x64: excluded by filter 'o_proj'"
        in text
    )


def test_node_diff_ties_replacements_to_the_parameter():
    """A lowering-style rewrite: linear(x, w, b) -> matmul(x, t(packed)) + b on a constant."""

    def f(x, w, b):
        return F.linear(x, w, b).relu()

    gm = torch.fx.symbolic_trace(f)
    before = snapshot(gm)
    gm.register_buffer("packed", torch.zeros(4, 8))
    linear = next(n for n in gm.graph.nodes if n.op == "call_function" and n.target is F.linear)
    with gm.graph.inserting_before(linear):
        const = gm.graph.get_attr("packed")
        t = gm.graph.call_function(torch.t, (const,))
        mm = gm.graph.call_function(torch.matmul, (linear.args[0], t))
        add = gm.graph.call_function(torch.add, (mm, linear.args[2]))
    linear.replace_all_uses_with(add)
    gm.graph.erase_node(linear)
    gm.recompile()
    after = snapshot(gm)
    params = {"w": "fc.weight", "b": "fc.bias"}
    changes = diff_nodes(before, after, params, quantized=["fc.weight"])
    assert [(c.kind, c.op, c.fqn) for c in changes] == [
        ("added", "get_attr", "fc.weight"),
        ("added", "t", "fc.weight"),
        ("added", "matmul", "fc.weight"),
        ("added", "add", "fc.weight"),  # reads the bias, but replaces the quantized linear
        ("rewired", "relu", "fc.weight"),
        ("removed", "linear", "fc.weight"),
    ]
    assert changes[0].detail == "packed"
    # without knowing what was quantized, a node is tied to the parameter it reads
    plain = diff_nodes(before, after, params)
    assert [c.fqn for c in plain if c.op == "add"] == ["fc.bias"]


def test_inference_mode_ties_every_rewrite_to_its_parameter(tmp_path):
    pytest.importorskip(
        "qatpass.passes.lower_w4a16", reason="the inference lowering is not in this tree yet"
    )
    report = diff(Small(), (torch.randn(3, 64),), mode="inference")
    assert report.quantized_names == ["fc.weight"]
    (g,) = report.graphs
    assert g.mode == "inference" and "w4a16_linear" in g.after_code
    # linear(x, w) replaced by w4a16_linear(x, qweight, scales, ...) on packed constants
    assert [(c.op, c.fqn) for c in g.removed] == [("linear", "fc.weight")]
    assert [c.op for c in g.added].count("qatpass::w4a16_linear") == 1
    assert {c.op for c in g.added} == {"get_attr", "qatpass::w4a16_linear"}
    assert {c.fqn for c in g.added} == {"fc.weight"}
    assert [(c.op, c.fqn) for c in g.rewired] == [("relu", "fc.weight")]
    assert report.layer("fc.weight").fake_vs_real_max_abs == 0.0
    parser = _Collector()
    parser.feed(report.to_html(tmp_path / "inference.html").read_text())
    colour = {(side, node): cls for side, node, cls in parser.code_cells}
    assert colour[("b", g.removed[0].node)] == "del"
    w4a16 = next(c.node for c in g.added if c.op == "qatpass::w4a16_linear")
    assert colour[("a", w4a16)] == "ins"


def test_shape_not_divisible_is_skipped():
    report = diff(Small(), (torch.randn(3, 64),))
    assert report.quantized_names == ["fc.weight"]
    skipped = {s.fqn: s for s in report.skipped(matmul_weights_only=False)}
    assert skipped["odd.weight"].matmul_weight
    assert skipped["odd.weight"].reason == (
        "reduction dim 1 of size 40 is not divisible by group_size 32"
    )
    assert skipped["norm.weight"].reason.startswith("not a matmul weight")
    assert len(report.graphs[0].added) == 1


def test_graph_breaks_are_counted_with_reasons():
    report = diff(Broken(), (torch.randn(2, 32),))
    assert len(report.graphs) == 2
    assert report.graph_break_count == 1
    assert "graph_break" in report.graph_breaks[0].reason
    assert set(report.quantized_names) == {"a.weight", "b.weight"}
    assert [len(g.added) for g in report.graphs] == [1, 1]
    assert "1 graph break(s)" in report.text()


def test_moe_experts_get_weight_numbers(moe_report):
    model, report = moe_report
    assert set(report.quantized_names) == MOE_QUANTIZED
    g = report.graphs[0]
    assert len(g.added) == 10 and {c.fqn for c in g.added} == MOE_QUANTIZED
    params = dict(model.named_parameters())
    experts = [r for r in report.layers if r.kind == "experts"]
    assert len(experts) == 4
    for row in experts:
        assert row.shape == tuple(params[row.fqn].shape) and len(row.shape) == 3
        assert row.dim == 2 and row.group_size == 32
        assert row.fake_vs_real_max_abs == 0.0
        assert 15.0 < row.weight_sqnr_db < 30.0
        # the experts module's output with this parameter fake-quantized, on the calls it saw
        assert row.calls == 1 and 10.0 < row.output_sqnr_fake_db < 35.0
        assert row.output_sqnr_real_db is None
    skipped = {s.fqn: s.reason for s in report.skipped()}
    assert skipped["model.layers.0.mlp.gate.weight"].startswith("a MoE router")


def test_moe_eager_experts_are_reported_as_not_captured():
    model = tiny_qwen3_moe("eager")
    report = diff(model, (torch.randint(0, 128, (1, 8)),), exclude=EXCLUDE)
    expected = {
        f"model.layers.{i}.mlp.experts.{p}" for i in range(2) for p in ("gate_up_proj", "down_proj")
    }
    assert set(report.not_captured) == expected
    assert report.graph_break_count > 0
    assert not expected & set(report.quantized_names)
    assert "NOT quantized" in report.text()


# --- numbers ---
def test_llama_numbers_match_the_scheme(llama_case):
    model, ids, _, report = llama_case
    assert {r.fqn for r in report.layers} == LLAMA_QUANTIZED
    for row in report.layers:
        assert row.kind == "linear" and row.calls == 1
        assert row.fake_vs_real_max_abs == 0.0
        assert 15.0 < row.weight_sqnr_db < 30.0
        assert 10.0 < row.output_sqnr_fake_db < 35.0
        if row.real_kernel.startswith("qatpass native"):  # fp32 dot in another order
            assert row.output_fake_vs_real_max_abs < 1e-5
            assert row.output_sqnr_real_db == pytest.approx(row.output_sqnr_fake_db, abs=0.01)
        else:  # dequantize + F.linear: the fake-quant forward bit for bit
            assert row.real_kernel.startswith(("dequantize + F.linear", DEQUANT_PATH))
            assert row.output_fake_vs_real_max_abs == 0.0
            assert row.output_sqnr_real_db == row.output_sqnr_fake_db
    keys = [r.output_sqnr_fake_db for r in report.layers]
    assert keys == sorted(keys)  # worst first

    # recompute one layer by hand from the scheme's functions
    fqn = "model.layers.1.mlp.down_proj.weight"
    w = dict(model.named_parameters())[fqn].detach()
    dq = qatpass.dequantize(qatpass.quantize(w, qatpass.Int4Scheme(group_size=32)))
    row = report.layer(fqn)
    assert row.weight_sqnr_db == pytest.approx(
        10 * math.log10(float((w.double() ** 2).sum() / ((w.double() - dq.double()) ** 2).sum())),
        abs=1e-9,
    )
    assert row.weight_max_abs_err == pytest.approx(float((w - dq).abs().max()), abs=0)
    seen = []
    down = model.get_submodule("model.layers.1.mlp.down_proj")
    handle = down.register_forward_hook(lambda m, a, o: seen.append(a[0]))
    try:
        with torch.no_grad():
            model(ids)
    finally:
        handle.remove()
    ref = F.linear(seen[0], w)
    assert row.output_sqnr_fake_db == pytest.approx(sqnr_db(ref, F.linear(seen[0], dq)), abs=1e-9)


def test_bf16_real_path_is_a_cpu_int4_kernel():
    """bf16 activations take an int4 kernel on CPU: close to fake quant, not bit-equal."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 48)).to(torch.bfloat16)
    report = diff(model, (torch.randn(4, 128, dtype=torch.bfloat16),))
    assert len(report.layers) == 2
    for row in report.layers:
        assert row.fake_vs_real_max_abs == 0.0  # the weights agree bit for bit
        assert abs(row.output_sqnr_real_db - row.output_sqnr_fake_db) < 1.0
        assert row.output_fake_vs_real_max_abs < 0.05
        if report.real_path == KERNEL_PATH:
            native = kernel_unavailable_reason() is None
            assert row.real_kernel == CPU_PATH_NAMES["native" if native else "int4pack"]
        else:
            assert row.real_kernel == DEQUANT_PATH


def test_model_is_untouched(llama_case):
    model, _, state, _ = llama_case
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert not model.training
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks
    assert all(p.grad is None for p in model.parameters())


def test_keyword_inputs_and_a_model_without_weights():
    torch.manual_seed(0)
    report = diff(nn.Linear(64, 16), {"input": torch.randn(3, 64)})
    assert report.quantized_names == ["weight"]
    row = report.layer("weight")
    assert row.calls == 1 and row.output_fake_vs_real_max_abs < 1e-6  # fp32, any sum order
    empty = diff(nn.ReLU(), (torch.randn(3),))
    assert empty.layers == [] and empty.quantized_names == []
    assert "(no quantized parameters)" in empty.text()
    with pytest.raises(KeyError, match="no quantized layer named 'nope'"):
        empty.layer("nope")


def test_sqnr_db():
    ref = torch.ones(100)
    assert sqnr_db(ref, ref * 1.1) == pytest.approx(20.0)
    assert sqnr_db(ref, ref.clone()) == math.inf
    with pytest.raises(ValueError, match="equal shapes"):
        sqnr_db(ref, torch.ones(10))


# --- bad input ---
def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="unknown qat4 option"):
        diff(Small(), (torch.randn(2, 64),), group_sise=32)
    with pytest.raises(TypeError, match="must be a torch.nn.Module"):
        diff(lambda x: x, (torch.randn(2, 64),))
    with pytest.raises(TypeError, match="example_inputs must be"):
        diff(Small(), 3)
    with pytest.raises(ValueError, match="either a QatConfig or options"):
        diff(Small(), (torch.randn(2, 64),), qatpass.QatConfig(), group_size=64)
    with pytest.raises(ValueError, match="not a valid regex"):
        diff(Small(), (torch.randn(2, 64),), exclude=["("])
    model = Small()
    with torch.no_grad():
        model.fc.weight[3, 5] = float("nan")
    with pytest.raises(ValueError, match=r"fc.weight \(40, 64\) has 1 non-finite"):
        diff(model, (torch.randn(2, 64),))


# --- JSON / text / HTML ---
def test_json_is_strict_and_complete(llama_case, tmp_path):
    report: DiffReport = llama_case[3]
    path = report.to_json(tmp_path / "sub" / "d.json")
    data = json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"non-strict {c}"))
    assert data["format"] == "qatpass.diff/1"
    assert {r["fqn"] for r in data["layers"]} == LLAMA_QUANTIZED
    assert data["config"]["scheme"]["group_size"] == 32
    assert len(data["graphs"][0]["changes"]) == 24
    assert data["layers"][0]["fake_vs_real_max_abs"] == 0.0


class _Collector(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.layers: list[str] = []
        self.code_cells: list[tuple[str, str, str]] = []  # (side, node, colour)
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append((tag, a))
        if tag == "tr" and "data-layer" in a:
            self.layers.append(a["data-layer"])
        if tag == "td" and "data-node" in a:
            side, *cls = a.get("class", "").split()
            self.code_cells.append((side, a["data-node"], " ".join(cls)))

    def handle_data(self, data):
        self.text.append(data)


def test_html_is_self_contained_and_lists_every_layer(llama_case, tmp_path):
    report: DiffReport = llama_case[3]
    page = report.to_html(tmp_path / "d.html").read_text()
    parser = _Collector()
    parser.feed(page)
    parser.close()
    assert sorted(parser.layers) == sorted(LLAMA_QUANTIZED)
    text = "".join(parser.text)
    for fqn in LLAMA_QUANTIZED:
        assert text.count(fqn) >= 3  # table, chart, node changes
    for tag, attrs in parser.tags:
        assert "src" not in attrs and not (tag == "link"), (tag, attrs)
        assert not attrs.get("href"), (tag, attrs)
    assert "@import" not in page and "url(" not in page
    assert {t for t, _ in parser.tags} >= {"svg", "rect", "script", "style", "table"}
    # in the side-by-side code, inserted nodes are green, rewired ones yellow (after side)
    g = report.graphs[0]
    colour = {(side, node): cls for side, node, cls in parser.code_cells}
    for c in g.added:
        assert colour[("a", c.node)] == "ins", c.node
    for c in g.rewired:
        assert colour[("a", c.node)] == "rep" and colour[("b", c.node)] == "rep", c.node
    changed = {c.node for c in g.changes}
    assert all(cls == "" for (side, node), cls in colour.items() if node not in changed)


def _png_size(path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


def _chromium(tmp_path, *args: str) -> subprocess.CompletedProcess:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium); HTML render untested")
    cmd = [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--no-first-run",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        *args,
    ]
    return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=120)


def test_html_renders_in_headless_chromium(llama_case, tmp_path):
    page = llama_case[3].to_html(tmp_path / "d.html")
    png = tmp_path / "shot.png"
    _chromium(tmp_path, f"--screenshot={png}", "--window-size=1400,1000", page.resolve().as_uri())
    assert _png_size(png) == (1400, 1000)
    assert png.stat().st_size > 20_000  # a rendered page, not a blank one


def test_html_table_sorts_in_headless_chromium(llama_case, tmp_path):
    """The page's own sortTable, run by the browser: click 'weight SQNR dB' twice (descending)."""
    report: DiffReport = llama_case[3]
    html = report.to_html(tmp_path / "d.html").read_text()
    click = "sortTable(document.querySelector('#layers th:nth-child(5)'));"
    page = tmp_path / "sorted.html"
    page.write_text(html.replace("</body>", f"<script>{click}{click}</script></body>"))
    dom = _chromium(tmp_path, "--dump-dom", page.resolve().as_uri()).stdout
    parser = _Collector()
    parser.feed(dom)
    expected = sorted(report.layers, key=lambda r: r.weight_sqnr_db, reverse=True)
    assert parser.layers == [r.fqn for r in expected]
    assert parser.layers != [r.fqn for r in report.layers]  # the order did change


# --- CLI ---
FACTORY = """
import torch
from torch import nn


def make():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 32))
    return model, (torch.randn(4, 128),)


def bad():
    return 3
"""


@pytest.fixture
def factory_module(tmp_path, monkeypatch):
    (tmp_path / "gd_factory.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "gd_factory"


def test_cli_on_a_factory(factory_module, tmp_path, capsys):
    html, js = tmp_path / "out" / "d.html", tmp_path / "out" / "d.json"
    rc = qatpass_main(
        ["diff", f"{factory_module}:make", "--group-size", "64", "--exclude", r"^2\.",
         "--html", str(html), "--json", str(js)]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0
    assert "0.weight" in out and "left alone: 2.weight 32x64: excluded by filter '^2\\\\.'" in out
    data = json.loads(js.read_text())
    assert data["config"]["scheme"]["group_size"] == 64
    assert [r["fqn"] for r in data["layers"]] == ["0.weight"]
    assert data["config"]["exclude"][-1] == r"^2\."
    assert html.read_text().count("data-layer='0.weight'") == 1


def test_cli_on_a_hf_model_dir(tmp_path, capsys):
    torch.manual_seed(0)
    tiny_llama().save_pretrained(tmp_path / "llama")
    rc = diff_main([str(tmp_path / "llama"), "--exclude", "o_proj", "--seq-len", "8"])
    out = capsys.readouterr().out
    assert rc == 0
    for fqn in LLAMA_QUANTIZED:
        assert fqn in out
    assert "excluded by filter 'o_proj'" in out


@pytest.mark.parametrize(
    "spec, message",
    [
        ("nowhere_module_xyz:make", "cannot import module"),
        ("{mod}:missing", "has no callable 'missing'"),
        ("{mod}:bad", "must return (model, example_inputs)"),
        ("not-a-spec", "neither an existing directory nor 'module:factory'"),
        ("{tmp}", "without config.json"),
    ],
)
def test_cli_bad_specs(factory_module, tmp_path, capsys, spec, message):
    rc = diff_main([spec.format(mod=factory_module, tmp=tmp_path)])
    assert rc == 2
    assert message in capsys.readouterr().err


def test_cli_bad_option(factory_module, capsys):
    assert diff_main([f"{factory_module}:make", "--group-size", "48"]) == 2
    assert "group_size must be -1" in capsys.readouterr().err


# --- QATPASS_DEBUG_DIR ---
def test_debug_dir_gets_the_files(tmp_path, monkeypatch):
    out = tmp_path / "debug" / "nested"
    monkeypatch.setenv("QATPASS_DEBUG_DIR", str(out))
    model = Broken()
    x = torch.randn(2, 32)
    be = qatpass.backend(compiler="eager")
    y = torch.compile(model, backend=be)(x)
    torch.testing.assert_close(y, model(x), rtol=0.1, atol=0.1)
    assert len(be.summaries) == 2
    for s in be.summaries:
        gid = s.graph_id
        before = (out / f"graph_{gid}_before.py").read_text()
        after = (out / f"graph_{gid}_after.py").read_text()
        patch = (out / f"graph_{gid}.diff").read_text()
        assert "fake_quantize_int4" in after and "fake_quantize_int4" not in before
        added = [ln for ln in patch.splitlines() if ln.startswith("+") and not ln.startswith("+++")]
        assert any("fake_quantize_int4" in ln for ln in added)
        assert patch.startswith(f"--- graph_{gid}_before.py\n+++ graph_{gid}_after.py\n")
        summary = json.loads((out / f"graph_{gid}_summary.json").read_text())
        assert summary == json.loads(json.dumps(s.to_dict()))
        assert len(summary["quantized"]) == 1
    assert len(list(out.iterdir())) == 8


def test_debug_dir_io_error_warns_and_training_goes_on(tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("QATPASS_DEBUG_DIR", str(blocker / "sub"))
    model = Small()
    x = torch.randn(2, 64, requires_grad=False)
    with caplog.at_level(logging.WARNING, logger="qatpass"):
        y = torch.compile(model, backend=qatpass.backend(compiler="eager"))(x)
    y.sum().backward()
    assert model.fc.weight.grad is not None
    assert any("could not write debug files" in r.getMessage() for r in caplog.records)


def test_dump_graph_direct(tmp_path):
    plan = QuantPlan(weights={"w": QuantizedParam("w", (8, 32), 1, 32, ("linear",))})
    s = GraphSummary(graph_id=7, mode="train", plan=plan)
    out = dump_graph(tmp_path / "d", s, "a = 1\nb = 2\n", "a = 1\nc = 3\nb = 2\n")
    assert out == tmp_path / "d"
    assert sorted(p.name for p in out.iterdir()) == [
        "graph_7.diff", "graph_7_after.py", "graph_7_before.py", "graph_7_summary.json",
    ]  # fmt: skip
    assert "+c = 3" in (out / "graph_7.diff").read_text()
    assert re.search(r'"fqn": "w"', (out / "graph_7_summary.json").read_text())
