"""`diff(model, example_inputs, **options)`: what the qat4 pass does to a model, as a DiffReport.

    report = qatpass.diff(model, (input_ids,), group_size=32, exclude=[r"o_proj"])
    print(report.text()); report.to_html("diff.html"); report.to_json("diff.json")

Captures the Dynamo graphs (capture.py), diffs each one's nodes (structure.py), measures every
quantized parameter (numbers.py) and lists the parameters the eager selection would quantize but
no captured graph holds (they run outside torch.compile, e.g. after a graph break).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from torch import nn

from qatpass.config import QatConfig
from qatpass.graph_diff.capture import CapturedGraph, capture_graphs
from qatpass.graph_diff.numbers import layer_numbers
from qatpass.graph_diff.report import DiffReport, GraphDiff
from qatpass.graph_diff.structure import diff_nodes
from qatpass.lowering.convert import module_plan

__all__ = ["diff"]


def _graph_diff(cg: CapturedGraph) -> GraphDiff:
    quantized = {q.fqn: q for q in cg.summary.quantized}
    changes = []
    for c in diff_nodes(cg.before, cg.after, cg.params_before, cg.params_after, quantized):
        q = quantized.get(c.fqn)
        if q is not None and c.kind == "added":
            c = replace(c, shape=tuple(q.shape), group_size=q.group_size, dim=q.dim)
        changes.append(c)
    return GraphDiff(
        graph_id=cg.summary.graph_id,
        mode=cg.summary.mode,
        nodes_before=len(cg.before),
        nodes_after=len(cg.after),
        changes=changes,
        quantized=list(cg.summary.quantized),
        skipped=list(cg.summary.skipped),
        before_code=cg.before_code,
        after_code=cg.after_code,
    )


def diff(
    model: nn.Module, example_inputs: Any, config: QatConfig | None = None, **options: Any
) -> DiffReport:
    """Run the pass on model's graphs for example_inputs and report structure and numbers.

    example_inputs: a tensor, a tuple of positional arguments or a dict of keyword arguments.
    Options are those of `torch.compile(..., backend="qat4", options={...})` (group_size, include,
    exclude, mode, ...), or give a QatConfig. The model is not modified; Dynamo is reset.
    """
    if config is not None and options:
        raise ValueError("give either a QatConfig or options, not both")
    config = config or QatConfig.from_options(options)
    capture = capture_graphs(model, example_inputs, config)
    graphs = [_graph_diff(cg) for cg in capture.graphs]
    quantized = [q for g in graphs for q in g.quantized]
    layers, real_path = layer_numbers(model, quantized, config.scheme, example_inputs)
    in_graphs = {p.fqn for g in graphs for p in [*g.quantized, *g.skipped]}
    eager_plan, _ = module_plan(model, config)
    return DiffReport(
        config={
            "scheme": config.scheme.to_dict(),
            "include": list(config.include),
            "exclude": list(config.exclude),
            "mode": config.mode,
        },
        graphs=graphs,
        graph_breaks=capture.breaks,
        layers=layers,
        real_path=real_path,
        not_captured=[f for f in eager_plan.quantized_names if f not in in_graphs],
    )
