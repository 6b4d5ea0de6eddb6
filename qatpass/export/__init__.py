"""Export a quantized model for serving: one module per format.

- `save_compressed_tensors` / `load_compressed_tensors` / `packed_state_dict`: compressed-tensors
  `pack-quantized` (vLLM, SGLang), from a training model or a converted one;
- `to_onnx`: ONNX with `com.microsoft::MatMulNBits` (onnxruntime);
- `to_pt2` / `load_pt2`: torch.export programs with the qatpass op visible.
"""

from qatpass.export.compressed_tensors import (
    load_compressed_tensors,
    packed_state_dict,
    read_checkpoint,
    save_compressed_tensors,
)
from qatpass.export.onnx import register_matmul_nbits_schema, to_onnx
from qatpass.export.torch_export import load_pt2, to_pt2

__all__ = [
    "load_compressed_tensors",
    "load_pt2",
    "packed_state_dict",
    "read_checkpoint",
    "register_matmul_nbits_schema",
    "save_compressed_tensors",
    "to_onnx",
    "to_pt2",
]
