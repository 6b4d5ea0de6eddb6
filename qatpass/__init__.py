"""qatpass: INT4 / FP4 quantization-aware training and 4-bit weight inference as a torch.compile pass.

cmodel = torch.compile(model, backend="qat4")      # fake-quant QAT, model code untouched
qmodel = qatpass.convert(model)                    # packed INT4 weights for serving
"""

from qatpass import export  # noqa: F401  (qatpass.export.* after `import qatpass`)
from qatpass import fake_quant as _fake_quant  # noqa: F401  (registers the op)
from qatpass.backend import QatBackend, backend, qat4
from qatpass.config import DEFAULT_EXCLUDE, QatConfig
from qatpass.fake_quant import fake_quantize
from qatpass.graph_diff import DiffReport, diff
from qatpass.lowering import (
    W4A16Experts,
    W4A16Linear,
    convert,
    install_packed,
    packed_weights,
    refresh,
)
from qatpass.passes.lower_w4a16 import refresh_compiled
from qatpass.passes.plan import QuantPlan, plan_for
from qatpass.report import GraphSummary, reset_summary, summary
from qatpass.scheme import (
    Int4Scheme,
    PackedWeight,
    QuantScheme,
    dequantize,
    pack_int4,
    quantize,
    unpack_int4,
)
from qatpass.scheme_fp4 import Fp4Scheme
from qatpass.selection import select_weights

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_EXCLUDE",
    "DiffReport",
    "Fp4Scheme",
    "GraphSummary",
    "Int4Scheme",
    "PackedWeight",
    "QatBackend",
    "QatConfig",
    "QuantPlan",
    "QuantScheme",
    "W4A16Experts",
    "W4A16Linear",
    "backend",
    "convert",
    "dequantize",
    "diff",
    "fake_quantize",
    "install_packed",
    "pack_int4",
    "plan_for",
    "packed_weights",
    "qat4",
    "quantize",
    "refresh",
    "refresh_compiled",
    "reset_summary",
    "select_weights",
    "summary",
    "unpack_int4",
]
