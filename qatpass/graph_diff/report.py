"""DiffReport: what the pass did to each graph and what it costs each layer; text and JSON views.

`report.text()` is the terminal table, `report.to_json(path)` the whole report as strict JSON
(non-finite numbers as the strings "inf", "-inf", "nan"), `report.to_html(path)` the
self-contained page (graph_diff/html.py).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from qatpass.graph_diff.capture import GraphBreak
from qatpass.graph_diff.formatting import format_db, format_err, scheme_items
from qatpass.graph_diff.numbers import LayerNumbers
from qatpass.graph_diff.structure import NodeChange
from qatpass.report import QuantizedParam, SkippedParam

__all__ = ["GraphDiff", "DiffReport", "format_db", "format_err"]

FORMAT = "qatpass.diff/1"


@dataclass
class GraphDiff:
    """One Dynamo graph: its structural changes, what was quantized and skipped, and its code."""

    graph_id: int
    mode: str
    nodes_before: int
    nodes_after: int
    changes: list[NodeChange]
    quantized: list[QuantizedParam]
    skipped: list[SkippedParam]
    before_code: str
    after_code: str

    def _of(self, kind: str) -> list[NodeChange]:
        return [c for c in self.changes if c.kind == kind]

    @property
    def added(self) -> list[NodeChange]:
        return self._of("added")

    @property
    def removed(self) -> list[NodeChange]:
        return self._of("removed")

    @property
    def rewired(self) -> list[NodeChange]:
        return self._of("rewired")

    def changes_for(self, fqn: str) -> list[NodeChange]:
        return [c for c in self.changes if c.fqn == fqn]

    @property
    def skipped_matmul_weights(self) -> list[SkippedParam]:
        return [s for s in self.skipped if s.matmul_weight]


@dataclass
class DiffReport:
    """The result of `qatpass.diff(model, example_inputs, **options)`."""

    config: dict[str, Any]
    graphs: list[GraphDiff]
    graph_breaks: list[GraphBreak]
    layers: list[LayerNumbers]  # worst first (see LayerNumbers.sort_key)
    real_path: str  # how the "real" output column was computed
    not_captured: list[str] = field(default_factory=list)  # selected, but in no captured graph

    @property
    def graph_break_count(self) -> int:
        return sum(b.count for b in self.graph_breaks)

    @property
    def quantized_names(self) -> list[str]:
        return sorted({q.fqn for g in self.graphs for q in g.quantized})

    def layer(self, fqn: str) -> LayerNumbers:
        for row in self.layers:
            if row.fqn == fqn:
                return row
        raise KeyError(f"no quantized layer named {fqn!r}; have {[r.fqn for r in self.layers]}")

    def skipped(self, matmul_weights_only: bool = True) -> list[SkippedParam]:
        out: dict[str, SkippedParam] = {}
        for g in self.graphs:
            for s in g.skipped:
                if s.matmul_weight or not matmul_weights_only:
                    out.setdefault(s.fqn, s)
        return list(out.values())

    # --- views ---
    def to_dict(self) -> dict[str, Any]:
        return _finite({"format": FORMAT, **asdict(self)})

    def to_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1, allow_nan=False))
        return path

    def to_html(self, path: str | Path) -> Path:
        from qatpass.graph_diff.html import render_html

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(render_html(self), encoding="utf-8")
        return path

    def text(self) -> str:
        return _text(self)

    def __str__(self) -> str:
        return self.text()


def _finite(obj: Any) -> Any:
    """obj with non-finite floats as strings, so the JSON is strict."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _table(header: list[str], rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(r: list[str]) -> str:
        cells = [
            str(c).rjust(w) if i in right else str(c).ljust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ]
        return "  " + "  ".join(cells).rstrip()

    return [line(header), "  " + "  ".join("-" * w for w in widths), *map(line, rows)]


def _shape(shape) -> str:
    return "x".join(str(s) for s in shape) if shape else "-"


def _ops(changes: list[NodeChange]) -> str:
    counts = Counter(c.op for c in changes)
    return ", ".join(f"{op}" + (f" x{n}" if n > 1 else "") for op, n in counts.items()) or "-"


def _graph_text(g: GraphDiff) -> list[str]:
    lines = [
        f"graph {g.graph_id} ({g.mode}): {g.nodes_before} -> {g.nodes_after} nodes, "
        f"{len(g.added)} added, {len(g.rewired)} rewired, {len(g.removed)} removed"
    ]
    if g.quantized:
        rows = []
        for q in g.quantized:
            mine = g.changes_for(q.fqn)
            rows.append(
                [
                    q.fqn,
                    _shape(q.shape),
                    str(q.dim),
                    str(q.group_size),
                    "+" + _ops([c for c in mine if c.kind == "added"]),
                    _ops([c for c in mine if c.kind == "rewired"]),
                    _ops([c for c in mine if c.kind == "removed"]),
                ]
            )
        lines += _table(
            ["quantized", "shape", "dim", "group", "added", "rewired", "removed"], rows, {2, 3}
        )
    tied = {q.fqn for q in g.quantized}
    other = [c for c in g.changes if c.fqn not in tied]
    for c in other:
        sign = {"added": "+", "removed": "-", "rewired": "~"}[c.kind]
        lines.append(f"  {sign} {c.node} ({c.op})" + (f" [{c.fqn}]" if c.fqn else ""))
    for s in g.skipped_matmul_weights:
        lines.append(f"  left alone: {s.fqn} {_shape(s.shape)}: {s.reason}")
    not_matmul = Counter(
        s.reason.removeprefix("not a matmul weight").strip(" ()") or "unused"
        for s in g.skipped
        if not s.matmul_weight
    )
    if not_matmul:
        parts = ", ".join(f"{n} {why}" for why, n in sorted(not_matmul.items()))
        lines.append(f"  not matmul weights (left alone): {parts}")
    return lines


def _layers_text(report: DiffReport) -> list[str]:
    if not report.layers:
        return ["  (no quantized parameters)"]
    rows = [
        [
            r.fqn,
            r.kind,
            _shape(r.shape),
            str(r.group_size),
            format_db(r.weight_sqnr_db),
            format_err(r.weight_max_abs_err),
            format_db(r.output_sqnr_fake_db),
            format_db(r.output_sqnr_real_db),
            format_err(r.output_fake_vs_real_max_abs),
            format_err(r.fake_vs_real_max_abs),
        ]
        for r in report.layers
    ]
    header = [
        "layer",
        "kind",
        "shape",
        "group",
        "W SQNR dB",
        "W max err",
        "out SQNR fake",
        "out SQNR real",
        "out |fake-real|",
        "W |fake-real|",
    ]
    return _table(header, rows, set(range(3, 10)))


def _text(report: DiffReport) -> str:
    c = report.config
    s = c["scheme"]
    lines = [
        f"qatpass diff: mode {c['mode']}, " + ", ".join(scheme_items(s)),
        f"{len(report.graphs)} graph(s), {report.graph_break_count} graph break(s), "
        f"{len(report.quantized_names)} quantized parameter(s), "
        f"{len(report.skipped())} matmul weight(s) left alone",
    ]
    for b in report.graph_breaks:
        lines.append(f"  graph break x{b.count}: {b.reason}")
    for fqn in report.not_captured:
        lines.append(f"  not in any captured graph (runs uncompiled, NOT quantized): {fqn}")
    for g in report.graphs:
        lines += ["", *_graph_text(g)]
    lines += [
        "",
        f"per-layer numbers, worst first (out SQNR: F.linear on the example inputs vs fake quant "
        f"and vs real = {report.real_path})",
        *_layers_text(report),
    ]
    return "\n".join(lines)
