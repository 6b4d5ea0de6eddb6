"""Number formatting shared by the text and HTML renderings of a DiffReport."""

from __future__ import annotations

import math

__all__ = ["format_db", "format_err", "scheme_items"]


def format_db(v: float | None) -> str:
    if v is None:
        return "-"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return f"{v:.1f}"


def format_err(v: float | None) -> str:
    return "-" if v is None else f"{v:.3g}"


def scheme_items(s: dict) -> list[str]:
    """A scheme dict (`to_dict()`) as short phrases for the summaries."""
    if "format" in s:  # FP4
        return [f"scheme {s['format']}"]
    return [
        f"group_size {s['group_size']}",
        "symmetric" if s["symmetric"] else "asymmetric",
        f"qrange {tuple(s['qrange'])}",
        f"scales {s['scale_dtype']}",
    ]
