"""Inference lowering: W4A16 ops, packed modules, `convert` / `refresh`, the graph lowering.

- `ops`: `qatpass::w4a16_linear`, `qatpass::w4a16_grouped_linear` (CUDA: Triton; CPU: aten int4)
- `cpu_int4`: the CPU repack (aten `_weight_int4pack_mm_for_cpu`) and the dequant fallback
- `modules`: `W4A16Linear`, `W4A16Experts`
- `convert`: `convert`, `refresh`, `packed_weights`, `install_packed`
- `graph_lowering`: `lower_graph` (the qat4 backend's inference mode), `refresh_compiled`
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
