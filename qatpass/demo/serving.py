"""The INT4 model a trained model is served as: `qatpass.convert` (packed weights, W4A16).

The same selection and scheme as the qat4 training backend (`QatConfig`), so a QAT model is served
with exactly the weights its fake-quant training forward used.
"""

from __future__ import annotations

from torch import nn

from qatpass.config import QatConfig
from qatpass.lowering.convert import convert

__all__ = ["SERVING", "to_int4"]

SERVING = "qatpass.convert (packed INT4, W4A16)"


def to_int4(model: nn.Module, config: QatConfig | None = None) -> nn.Module:
    """A packed INT4 copy of `model` (left untouched), in eval mode."""
    return convert(model, config=config or QatConfig()).eval()
