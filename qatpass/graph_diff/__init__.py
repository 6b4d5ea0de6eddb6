"""The graph-diff debugging tool: which ops the pass rewrote, which it skipped and why, and which
layers lose the most accuracy.

    report = qatpass.diff(model, example_inputs, group_size=32)   # structure + numbers
    print(report.text()); report.to_html("diff.html"); report.to_json("diff.json")

`qatpass diff MODEL_SPEC` is the command line (cli.py); `QATPASS_DEBUG_DIR=dir` makes the backend
dump every graph before/after (`qatpass.debug_dump`, beside the backend).
"""

from qatpass.graph_diff.diff_model import diff
from qatpass.graph_diff.numbers import LayerNumbers, sqnr_db
from qatpass.graph_diff.report import DiffReport, GraphDiff
from qatpass.graph_diff.structure import NodeChange

__all__ = ["diff", "DiffReport", "GraphDiff", "LayerNumbers", "NodeChange", "sqnr_db"]
