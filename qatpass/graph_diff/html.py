"""The DiffReport as one self-contained HTML page (no network, no external JS or CSS).

Sections: summary and graph breaks; an inline-SVG bar chart of per-layer SQNR; the per-layer table
(click a header to sort; a few lines of inline JS); parameters left alone with their reasons; per
graph, the node changes and the before/after code side by side, inserted lines green, replaced
lines yellow, removed lines red (long unchanged runs folded, a button unfolds them).
"""

from __future__ import annotations

import difflib
import math
import re
from html import escape
from typing import TYPE_CHECKING

from qatpass.graph_diff.formatting import format_db, format_err, scheme_items

if TYPE_CHECKING:  # the report renders itself through this module: no import back at run time
    from qatpass.graph_diff.report import DiffReport, GraphDiff

__all__ = ["render_html"]

CONTEXT = 3  # unchanged lines kept around each change while folded
_ASSIGN = re.compile(r"^\s+(\w+)(?:\s*:\s*\"[^\"]*\")?\s*=")  # `name: "f32[..]" = ...` in FX code

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:20px;color:#222}
h1{font-size:20px}h2{font-size:17px;margin-top:28px}h3{font-size:15px}
table{border-collapse:collapse;margin:8px 0}
th,td{border:1px solid #ccc;padding:3px 7px;text-align:left;vertical-align:top}
th{background:#f0f0f0}
table.sortable th{cursor:pointer;user-select:none}
table.sortable th:after{content:" \\2195";color:#999}
td.args{word-break:break-all;max-width:480px}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.bad{color:#b00;font-weight:bold}.ok{color:#070}
.small{font-size:12px}
.mono{font-family:ui-monospace,monospace;font-size:12px}
table.code{width:100%;table-layout:fixed;font:12px/1.35 ui-monospace,monospace}
table.code td{border:none;border-right:1px solid #ddd;padding:0 6px;white-space:pre-wrap;
  word-break:break-all}
table.code td.ln{width:38px;color:#999;text-align:right;user-select:none}
table.code th{position:sticky;top:0}
td.ins{background:#d8f5d0}td.rep{background:#ffe58a}td.del{background:#ffd6d6}
tr.fold td{background:#eef3fb;color:#557;text-align:center}
table.code.folded tr.ctx{display:none}
table.code:not(.folded) tr.fold{display:none}
.legend span{display:inline-block;padding:0 8px;margin-right:6px;border:1px solid #ccc}
details{margin:10px 0}summary{cursor:pointer;font-weight:600}
"""

_JS = """
function sortTable(th){
  const table=th.closest('table'), body=table.tBodies[0], col=th.cellIndex;
  const asc=!(table.dataset.col==col && table.dataset.asc=='1');
  table.dataset.col=col; table.dataset.asc=asc?'1':'0';
  const key=r=>{const v=r.cells[col].dataset.v ?? r.cells[col].textContent;
    const n=parseFloat(v); return isNaN(n)?v:n;};
  const rows=Array.from(body.rows);
  rows.sort((a,b)=>{const x=key(a),y=key(b);
    const c=(typeof x=='number'&&typeof y=='number')?x-y:String(x).localeCompare(String(y));
    return asc?c:-c;});
  rows.forEach(r=>body.appendChild(r));
}
function toggleFold(btn){
  const t=document.getElementById(btn.dataset.table); t.classList.toggle('folded');
  btn.textContent=t.classList.contains('folded')?'show all lines':'fold unchanged lines';
}
"""


def _num(v: float | None) -> str:
    """A sortable value for data-v: inf sorts last, missing first."""
    if v is None:
        return "-1e308"
    if math.isinf(v):
        return "1e308" if v > 0 else "-1e307"
    return repr(float(v))


def _shape(shape) -> str:
    return "x".join(str(s) for s in shape) if shape else "-"


def _summary(r: DiffReport) -> str:
    s = r.config["scheme"]
    items = [
        f"mode <b>{escape(r.config['mode'])}</b>",
        *(escape(item) for item in scheme_items(s)),
        f"<b>{len(r.graphs)}</b> graph(s)",
        f"<b>{r.graph_break_count}</b> graph break(s)",
        f"<b>{len(r.quantized_names)}</b> quantized parameter(s)",
        f"<b>{len(r.skipped())}</b> matmul weight(s) left alone",
    ]
    out = ["<p>" + " &middot; ".join(items) + "</p>"]
    include = escape("  ".join(r.config["include"]) or "(all)")
    exclude = escape("  ".join(r.config["exclude"]) or "(none)")
    out.append(f"<p class='mono'>include {include} &middot; exclude {exclude}</p>")
    if r.graph_breaks:
        out.append("<h2>Graph breaks</h2><ul>")
        for b in r.graph_breaks:
            out.append(
                f"<li><details><summary>x{b.count}: {escape(b.reason)}</summary>"
                f"<pre class='mono'>{escape(b.detail)}</pre></details></li>"
            )
        out.append("</ul>")
    if r.not_captured:
        out.append("<h2 class='bad'>Selected but in no captured graph (NOT quantized)</h2><ul>")
        out += [f"<li class='mono'>{escape(f)}</li>" for f in r.not_captured]
        out.append("</ul>")
    return "\n".join(out)


def _chart(r: DiffReport) -> str:
    """Horizontal bars per layer: weight SQNR and output SQNR (fake quant), worst layer on top."""
    if not r.layers:
        return "<p>No quantized layers.</p>"
    label_w, bar_w, row_h = 380, 560, 22
    values = [
        v
        for row in r.layers
        for v in (row.weight_sqnr_db, row.output_sqnr_fake_db)
        if v is not None and math.isfinite(v)
    ]
    top = max([*values, 1.0]) * 1.1
    height = row_h * len(r.layers) + 40
    parts = [
        f"<svg width='{label_w + bar_w + 80}' "
        f"height='{height}' role='img' aria-label='per-layer SQNR'>",
        "<style>text{font:11px ui-monospace,monospace}</style>",
    ]
    for i, row in enumerate(r.layers):
        y = 10 + i * row_h
        parts.append(
            f"<text x='{label_w - 6}' y='{y + 13}' text-anchor='end'>{escape(row.fqn)}</text>"
        )
        for j, (v, color) in enumerate(
            ((row.weight_sqnr_db, "#9aa5b1"), (row.output_sqnr_fake_db, "#3b7dd8"))
        ):
            if v is None:
                continue
            w = bar_w if math.isinf(v) and v > 0 else max(0.0, min(v, top)) / top * bar_w
            yy = y + 2 + j * 9
            parts.append(
                f"<rect x='{label_w}' y='{yy}' width='{w:.1f}' height='8' fill='{color}'>"
                f"<title>{escape(row.fqn)}: {format_db(v)} dB</title></rect>"
                f"<text x='{label_w + w + 4:.1f}' y='{yy + 8}'>{format_db(v)}</text>"
            )
    ly = height - 14
    parts.append(
        f"<rect x='{label_w}' y='{ly - 8}' width='10' height='8' fill='#9aa5b1'/>"
        f"<text x='{label_w + 14}' y='{ly}'>weight SQNR dB</text>"
        f"<rect x='{label_w + 140}' y='{ly - 8}' width='10' height='8' fill='#3b7dd8'/>"
        f"<text x='{label_w + 154}' y='{ly}'>output SQNR dB (fake quant, example inputs)</text>"
    )
    parts.append("</svg>")
    return "\n".join(parts)


def _layer_table(r: DiffReport) -> str:
    header = [
        "layer",
        "kind",
        "shape",
        "group",
        "weight SQNR dB",
        "weight max |err|",
        "output SQNR dB (fake)",
        "output SQNR dB (real)",
        "output max |fake-real|",
        "weight max |fake-real|",
        "calls",
        "real path",
    ]
    head = "".join(f"<th onclick='sortTable(this)'>{escape(h)}</th>" for h in header)
    rows = []
    for row in r.layers:
        mismatch = "bad" if row.fake_vs_real_max_abs != 0 else "ok"
        cells = [
            f"<td class='mono'>{escape(row.fqn)}</td>",
            f"<td>{row.kind}</td>",
            f"<td data-v='{len(row.shape) and row.shape[0]}'>{_shape(row.shape)}</td>",
            f"<td class='num'>{row.group_size}</td>",
            f"<td class='num' data-v='{_num(row.weight_sqnr_db)}'>"
            f"{format_db(row.weight_sqnr_db)}</td>",
            f"<td class='num' data-v='{_num(row.weight_max_abs_err)}'>"
            f"{format_err(row.weight_max_abs_err)}</td>",
            f"<td class='num' data-v='{_num(row.output_sqnr_fake_db)}'>"
            f"{format_db(row.output_sqnr_fake_db)}</td>",
            f"<td class='num' data-v='{_num(row.output_sqnr_real_db)}'>"
            f"{format_db(row.output_sqnr_real_db)}</td>",
            f"<td class='num' data-v='{_num(row.output_fake_vs_real_max_abs)}'>"
            f"{format_err(row.output_fake_vs_real_max_abs)}</td>",
            f"<td class='num {mismatch}' data-v='{_num(row.fake_vs_real_max_abs)}'>"
            f"{format_err(row.fake_vs_real_max_abs)}</td>",
            f"<td class='num'>{row.calls}</td>",
            f"<td class='small'>{escape(row.real_kernel or '-')}</td>",
        ]
        rows.append(f"<tr data-layer='{escape(row.fqn)}'>{''.join(cells)}</tr>")
    return (
        f"<p>Worst first. Output columns: F.linear on the inputs each layer saw in one run on the "
        f"example inputs, in high precision vs fake quant and vs real = "
        f"<span class='mono'>{escape(r.real_path)}</span>. "
        f"MoE experts: the experts module's output with that parameter fake-quantized. "
        f"Weight max |fake-real| must be 0. Click a header to sort.</p>"
        f"<table class='sortable' id='layers'><thead><tr>{head}</tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table>"
    )


def _skipped_table(r: DiffReport) -> str:
    rows = "".join(
        f"<tr><td class='mono'>{escape(s.fqn)}</td><td>{_shape(s.shape)}</td>"
        f"<td>{'yes' if s.matmul_weight else 'no'}</td><td>{escape(s.reason)}</td></tr>"
        for s in r.skipped(matmul_weights_only=False)
    )
    if not rows:
        return "<p>None.</p>"
    return (
        "<table class='sortable'><thead><tr><th onclick='sortTable(this)'>parameter</th>"
        "<th onclick='sortTable(this)'>shape</th><th onclick='sortTable(this)'>matmul weight</th>"
        f"<th onclick='sortTable(this)'>reason</th></tr></thead><tbody>{rows}</tbody></table>"
    )


def _changes_table(g: GraphDiff) -> str:
    if not g.changes:
        return "<p>No node changed.</p>"
    rows = []
    for c in g.changes:
        cls = {"added": "ins", "rewired": "rep", "removed": "del"}[c.kind]
        rows.append(
            f"<tr><td class='{cls}'>{c.kind}</td><td class='mono args'>{escape(c.node)}</td>"
            f"<td class='mono'>{escape(c.op)}</td><td class='mono'>{escape(c.fqn or '-')}</td>"
            f"<td>{_shape(c.shape)}</td><td class='num'>{c.group_size or '-'}</td>"
            f"<td class='num'>{'-' if c.dim is None else c.dim}</td>"
            f"<td class='mono args'>{escape(c.detail)}</td></tr>"
        )
    head = "".join(
        f"<th onclick='sortTable(this)'>{h}</th>"
        for h in ("change", "node", "op", "parameter", "shape", "group", "dim", "arguments")
    )
    return (
        f"<table class='sortable'><thead><tr>{head}</tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table>"
    )


def _code_rows(before: list[str], after: list[str], g: GraphDiff) -> list[str]:
    """Side-by-side rows aligned by difflib; a line that defines a changed node is coloured by
    that change (added, rewired, removed), other changed lines by the line diff."""
    node_kind = {("a", c.node): c.kind for c in g.changes if c.kind != "removed"}
    node_kind |= {("b", c.node): c.kind for c in g.changes if c.kind != "added"}
    colour = {"added": "ins", "rewired": "rep", "removed": "del"}
    rows: list[str] = []

    def cell(side: str, n: int | None, text: str | None, fallback: str) -> str:
        num = "" if n is None else str(n + 1)
        found = _ASSIGN.match(text or "")
        node = found.group(1) if found else None
        kind = node_kind.get((side, node))
        cls = colour[kind] if kind else ("" if text is None else fallback)
        attr = f" data-node='{escape(node)}'" if node else ""
        return f"<td class='ln'>{num}</td><td class='{side} {cls}'{attr}>{escape(text or '')}</td>"

    def row(cls: str, i: int | None, j: int | None, fb: str = "", fa: str = "") -> str:
        b = before[i] if i is not None else None
        a = after[j] if j is not None else None
        return f"<tr class='{cls}'>{cell('b', i, b, fb)}{cell('a', j, a, fa)}</tr>"

    matcher = difflib.SequenceMatcher(None, before, after, autojunk=False)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "equal":
            n = i2 - i1
            for k in range(n):
                hidden = CONTEXT <= k < n - CONTEXT
                if hidden and k == CONTEXT:
                    rows.append(
                        f"<tr class='fold'><td colspan='4'>&#8943; {n - 2 * CONTEXT} unchanged "
                        "line(s) folded</td></tr>"
                    )
                rows.append(row("ctx" if hidden else "eq", i1 + k, j1 + k))
        elif tag == "insert":
            rows += [row("chg", None, j, fa="ins") for j in range(j1, j2)]
        elif tag == "delete":
            rows += [row("chg", i, None, fb="del") for i in range(i1, i2)]
        else:  # replace: pair the lines up, the longer side continues alone
            for k in range(max(i2 - i1, j2 - j1)):
                i = i1 + k if i1 + k < i2 else None
                j = j1 + k if j1 + k < j2 else None
                rows.append(row("chg", i, j, fb="rep", fa="rep"))
    return rows


def _code(g: GraphDiff) -> str:
    tid = f"code-{g.graph_id}"
    rows = _code_rows(g.before_code.splitlines(), g.after_code.splitlines(), g)
    return (
        "<p class='legend'><span style='background:#d8f5d0'>inserted</span>"
        "<span style='background:#ffe58a'>replaced</span>"
        "<span style='background:#ffd6d6'>removed</span>"
        f"<button data-table='{tid}' onclick='toggleFold(this)'>show all lines</button></p>"
        f"<table class='code folded' id='{tid}'><colgroup><col style='width:38px'><col>"
        "<col style='width:38px'><col></colgroup><thead><tr><th></th><th>before the pass</th>"
        "<th></th><th>after the pass</th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table>"
    )


def _graph(g: GraphDiff, open_: bool) -> str:
    title = (
        f"graph {g.graph_id} ({escape(g.mode)}): {g.nodes_before} &rarr; {g.nodes_after} nodes, "
        f"{len(g.added)} added, {len(g.rewired)} rewired, {len(g.removed)} removed, "
        f"{len(g.quantized)} quantized, {len(g.skipped_matmul_weights)} matmul weight(s) left alone"
    )
    return (
        f"<details{' open' if open_ else ''}><summary>{title}</summary>"
        f"<details><summary>Node changes ({len(g.changes)})</summary>{_changes_table(g)}</details>"
        f"<h3>Code</h3>{_code(g)}</details>"
    )


def render_html(report: DiffReport) -> str:
    """The whole page as a string."""
    graphs = "\n".join(_graph(g, i == 0) for i, g in enumerate(report.graphs))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>qatpass diff</title>
<style>{_CSS}</style>
<script>{_JS}</script>
</head><body>
<h1>qatpass diff</h1>
{_summary(report)}
<h2>Per-layer SQNR</h2>
{_chart(report)}
<h2>Per-layer numbers</h2>
{_layer_table(report)}
<h2>Parameters left alone</h2>
{_skipped_table(report)}
<h2>Graphs</h2>
{graphs}
</body></html>
"""
