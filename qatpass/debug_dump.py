"""`QATPASS_DEBUG_DIR=dir`: the backend dumps every graph it rewrites, before and after.

For graph id N it writes, in dir (created when missing; a `rank<R>` subfolder under
torch.distributed so ranks do not overwrite each other):

    graph_N_before.py    graph_N_after.py    graph_N.diff (unified)    graph_N_summary.json

Debugging output must never stop training: an I/O error is logged as a warning on the `qatpass`
logger and the backend carries on.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
from pathlib import Path

import torch

from qatpass.report import GraphSummary

__all__ = ["dump_graph", "unified_diff"]

log = logging.getLogger("qatpass")


def unified_diff(before_code: str, after_code: str, graph_id: int) -> str:
    """The unified diff of a graph's code before and after the pass."""
    return "".join(
        difflib.unified_diff(
            before_code.splitlines(keepends=True),
            after_code.splitlines(keepends=True),
            fromfile=f"graph_{graph_id}_before.py",
            tofile=f"graph_{graph_id}_after.py",
        )
    )


def _rank_dir(debug_dir: Path) -> Path:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return debug_dir / f"rank{dist.get_rank()}"
    return debug_dir


def dump_graph(
    debug_dir: str | os.PathLike, summary: GraphSummary, before_code: str, after_code: str
) -> Path | None:
    """Write the four files of one graph; returns the folder, or None when writing failed."""
    gid = summary.graph_id
    try:
        out = _rank_dir(Path(debug_dir))
        out.mkdir(parents=True, exist_ok=True)
        files = {
            f"graph_{gid}_before.py": before_code,
            f"graph_{gid}_after.py": after_code,
            f"graph_{gid}.diff": unified_diff(before_code, after_code, gid),
            f"graph_{gid}_summary.json": json.dumps(summary.to_dict(), indent=1),
        }
        for name, text in files.items():
            (out / name).write_text(text, encoding="utf-8")
    except (OSError, TypeError, ValueError) as e:
        log.warning("qat4: could not write debug files of graph %d to %s: %s", gid, debug_dir, e)
        return None
    log.info("qat4: wrote debug files of graph %d to %s", gid, out)
    return out
