"""torch.export (.pt2) of a qatpass inference model, with the W4A16 op visible in the graph.

    ep = torch.export.export(qmodel, args)      # qatpass::w4a16_linear nodes, packed buffers
    torch.export.save(ep, path)                 # loads anywhere `import qatpass` registered the op

The op is a custom op with a fake (meta) implementation, so `run_decompositions()` keeps it as
one node; a runtime that loads the file only needs the op registered (`load_pt2` does that).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["to_pt2", "load_pt2", "dynamic_shapes", "qatpass_op_nodes"]

OP_NAMESPACE = "qatpass"


def dynamic_shapes(example_inputs: Sequence[Any], dynamic_axes: Sequence[int]) -> tuple | None:
    """torch.export dynamic_shapes making dims `dynamic_axes` (0 batch, 1 sequence) dynamic."""
    axes = tuple(dynamic_axes)
    if any(a not in (0, 1) for a in axes):
        raise ValueError(f"dynamic_axes may hold 0 (batch) and 1 (sequence), got {axes}")
    if not axes:
        return None
    dims = {0: torch.export.Dim("batch"), 1: torch.export.Dim("seq")}
    out = []
    for x in example_inputs:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"example inputs must be tensors, got {type(x).__name__}")
        for a in axes:
            if a < x.dim() and x.shape[a] < 2:
                raise ValueError(
                    f"example input dim {a} has size {x.shape[a]}; torch.export specializes sizes "
                    "0 and 1, so give size >= 2 for a dynamic axis (or drop it from dynamic_axes)"
                )
        out.append({a: dims[a] for a in axes if a < x.dim()})
    return tuple(out)


def qatpass_op_nodes(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    """The graph's calls to qatpass ops (any `torch.ops.qatpass.*` overload)."""
    return [
        n
        for n in gm.graph.nodes
        if n.op == "call_function"
        and isinstance(n.target, torch._ops.OpOverload)
        and n.target.namespace == OP_NAMESPACE
    ]


def _args(example_inputs: Any) -> tuple:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if not isinstance(example_inputs, (tuple, list)):
        raise TypeError(
            f"example inputs must be a tensor or a tuple of tensors, got {type(example_inputs).__name__}"
        )
    return tuple(example_inputs)


def to_pt2(
    qmodel: nn.Module,
    args: Any,
    path: str | os.PathLike,
    *,
    dynamic_axes: Sequence[int] = (0, 1),
    decompose: bool = False,
) -> Path:
    """`torch.export` `qmodel` on `args` and save the program to `path` (a .pt2 file).

    `decompose=True` saves `ep.run_decompositions()` (core ATen plus the qatpass op). Raises when
    the graph holds no qatpass op (the model was not converted). Returns the path.
    """
    if not isinstance(qmodel, nn.Module):
        raise TypeError(f"qmodel must be a torch.nn.Module, got {type(qmodel).__name__}")
    args = _args(args)
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory; give a .pt2 file path")
    ep = torch.export.export(qmodel, args, dynamic_shapes=dynamic_shapes(args, dynamic_axes))
    if decompose:
        ep = ep.run_decompositions()
    if not qatpass_op_nodes(ep.graph_module):
        raise ValueError("the exported graph has no qatpass op; convert the model first")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(ep, str(path))
    return path


def load_pt2(path: str | os.PathLike) -> torch.export.ExportedProgram:
    """Load a .pt2 written by `to_pt2` (registers the qatpass ops first). Trusted files only.

    `torch.export.load` unpickles parts of the file, and unpickling runs code: a crafted .pt2 can
    execute anything as the loading user, and its graph can call any registered op with any
    arguments. Load only .pt2 files you (or someone you trust) wrote. To take weights from an
    untrusted source use a compressed-tensors checkpoint (`load_compressed_tensors`): it reads
    safetensors (no pickle) and validates every tensor and config.json field before use.
    """
    import qatpass.lowering  # noqa: F401  (registers torch.ops.qatpass.w4a16_linear)

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    return torch.export.load(str(path))
