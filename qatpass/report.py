"""What the pass did to each graph: quantized parameters, skipped ones with reasons.

`qatpass.summary()` returns every GraphSummary recorded in this process (the string backend
"qat4" has no object to ask); a `qatpass.backend(...)` object also keeps its own. Each summary is
logged to the `qatpass` logger when it is recorded.
"""

from __future__ import annotations

import itertools
import logging
import threading
from dataclasses import asdict, dataclass, field

from qatpass.passes.plan import PlannedWeight, QuantPlan, SkippedWeight

__all__ = ["QuantizedParam", "SkippedParam", "GraphSummary", "summary", "reset_summary"]

log = logging.getLogger("qatpass")

_records: list[GraphSummary] = []
_lock = threading.Lock()
_graph_ids = itertools.count()


# a graph's quantized and skipped entries are the plan's own records
QuantizedParam = PlannedWeight
SkippedParam = SkippedWeight


@dataclass
class GraphSummary:
    """One graph's part of the plan: what the pass quantized in it and what it left alone."""

    graph_id: int
    mode: str
    plan: QuantPlan = field(default_factory=QuantPlan)

    @property
    def quantized(self) -> list[PlannedWeight]:
        return list(self.plan.weights.values())

    @property
    def skipped(self) -> list[SkippedWeight]:
        return list(self.plan.skipped.values())

    @property
    def quantized_names(self) -> list[str]:
        return [q.fqn for q in self.quantized]

    def to_dict(self) -> dict:
        return {
            "graph_id": self.graph_id,
            "mode": self.mode,
            "quantized": [asdict(q) for q in self.quantized],
            "skipped": [asdict(s) for s in self.skipped],
        }

    def log(self) -> None:
        log.info(
            "qat4 graph %d (%s): quantized %d parameter(s), skipped %d matmul weight(s)",
            self.graph_id,
            self.mode,
            len(self.quantized),
            sum(s.matmul_weight for s in self.skipped),
        )
        for q in self.quantized:
            log.debug("  quantized %s %s dim=%d ops=%s", q.fqn, q.shape, q.dim, q.ops)
        for s in self.skipped:
            if s.matmul_weight:
                log.info("  skipped %s %s: %s", s.fqn, s.shape, s.reason)


def next_graph_id() -> int:
    return next(_graph_ids)


def record(s: GraphSummary) -> None:
    with _lock:
        _records.append(s)
    s.log()


def summary() -> list[GraphSummary]:
    """All graph summaries recorded in this process, oldest first."""
    with _lock:
        return list(_records)


def reset_summary() -> None:
    with _lock:
        _records.clear()
