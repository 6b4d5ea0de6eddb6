"""Number formatting shared by the text and HTML renderings of a DiffReport."""

from __future__ import annotations

import math

__all__ = ["format_db", "format_err"]


def format_db(v: float | None) -> str:
    if v is None:
        return "-"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return f"{v:.1f}"


def format_err(v: float | None) -> str:
    return "-" if v is None else f"{v:.3g}"
