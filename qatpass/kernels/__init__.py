"""W4A16 kernels on the canonical packed format: `kernels.cpu` (native C, aten int4, fallback)
and `kernels.triton` (CUDA). Each takes the canonical buffers of `qatpass.scheme` and owns any
device-specific repack it needs, cached beside the canonical tensors, never passed around."""
