"""Serving: the W4A16 ops, packed modules, `convert` / `refresh`.

- `ops`: `qatpass::w4a16_linear`, `qatpass::w4a16_grouped_linear` on the canonical format
  (CUDA: `qatpass.kernels.triton`; CPU: `qatpass.kernels.cpu`)
- `modules`: `W4A16Linear` (nn.Linear, Conv1D), `W4A16Experts` (HF MoE experts)
- `convert`: `convert`, `refresh`, `packed_weights`, `install_packed`
The graph rewrite of the backend's inference mode is `qatpass.passes.lower_w4a16`.
"""

from qatpass.lowering import ops as _ops  # noqa: F401  (registers torch.ops.qatpass.w4a16_*)
from qatpass.lowering.convert import (
    PackedModuleWeight,
    convert,
    install_packed,
    packed_weights,
    refresh,
)
from qatpass.lowering.modules import W4A16Experts, W4A16Linear

__all__ = [
    "PackedModuleWeight",
    "W4A16Experts",
    "W4A16Linear",
    "convert",
    "install_packed",
    "packed_weights",
    "refresh",
]
