"""ONNX export of a qatpass inference model: W4A16 linears become `com.microsoft::MatMulNBits`.

    qatpass::w4a16_linear(x, qweight int32 [N, K/8], scales [N, K/G], zeros int8 [N, K/G]?, bias?)
      -> MatMulNBits(x, B uint8 [N, K/G, G/2], scales [N*K/G], zero_points uint8?)  (+ Add bias)
         attributes K, N, bits=4, block_size=G

B is our packed bytes reshaped (the same nibble order, low nibble = even k); scales are cast to the
activation dtype (exact: they are bf16-representable); zero points are stored as unsigned nibbles
(zero + 8) packed two blocks a byte, and omitted when symmetric (MatMulNBits' default zero point 8
is our +8 code offset). Everything else is standard ONNX from `torch.onnx.export(dynamo=True)`.

The model is exported once with `torch.export` through `export_call` (the program `to_pt2` writes:
an HF model as it is returns its logits, inputs get dynamic batch/sequence dims), then translated;
the ONNX dims are named after those Dims (`batch`, `seq`, `decoder_seq`).

The translation emits MatMulNBits on the op's own inputs; the packed buffers only hold values once
the exporter adds the initializers, so they are converted to MatMulNBits' layout afterwards.
"""

from __future__ import annotations

import inspect
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from qatpass.export.torch_export import ExportCall, export_call

__all__ = ["to_onnx", "register_matmul_nbits_schema", "MS_DOMAIN"]

MS_DOMAIN = "com.microsoft"
_OP_TYPE = "MatMulNBits"


def register_matmul_nbits_schema() -> None:
    """Register `com.microsoft::MatMulNBits` with onnx (it ships no schema for it). Idempotent."""
    import onnx

    if onnx.defs.has(_OP_TYPE, MS_DOMAIN):
        return
    P = onnx.defs.OpSchema.FormalParameter
    opt = onnx.defs.OpSchema.FormalParameterOption.Optional
    attr = onnx.defs.OpSchema.Attribute
    ints = onnx.defs.OpSchema.AttrType.INT
    schema = onnx.defs.OpSchema(
        _OP_TYPE,
        MS_DOMAIN,
        1,
        doc="W4 matmul with block-wise quantized B (onnxruntime contrib op)",
        inputs=[
            P("A", "T1"),
            P("B", "T2"),
            P("scales", "T1"),
            P("zero_points", "T3", param_option=opt),
            P("g_idx", "T4", param_option=opt),
            P("bias", "T1", param_option=opt),
        ],
        outputs=[P("Y", "T1")],
        type_constraints=[
            ("T1", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "activations"),
            ("T2", ["tensor(uint8)", "tensor(int32)"], "packed weights"),
            (
                "T3",
                [
                    "tensor(uint8)",
                    "tensor(int32)",
                    "tensor(float16)",
                    "tensor(float)",
                    "tensor(bfloat16)",
                    "tensor(int8)",
                ],
                "zero points",
            ),
            ("T4", ["tensor(int32)"], "group index"),
        ],
        attributes=[
            attr("K", ints, "reduction dim"),
            attr("N", ints, "output features"),
            attr("bits", ints, "bits per weight"),
            attr("block_size", ints, "group size"),
            attr("accuracy_level", ints, "minimum accuracy of A (0: unset)", required=False),
        ],
    )
    onnx.defs.register_schema(schema)


def _w4a16_translation(x, qweight, scales, zeros=None, bias=None, *_scheme, **_named):
    """onnxscript translation of `qatpass::w4a16_linear` (shapes give K, N and the group size)."""
    from onnxscript import opset18 as op
    from onnxscript.values import Opset

    msft = Opset(MS_DOMAIN, 1)
    n, k8 = (int(d) for d in qweight.shape)
    k, blocks = k8 * 8, int(scales.shape[-1])
    inputs = [x, qweight, scales] + ([zeros] if zeros is not None else [])
    y = msft.MatMulNBits(*inputs, K=k, N=n, bits=4, block_size=k // blocks)
    return y if bias is None else op.Add(y, bias)


def _w4a16_grouped_translation(
    x, qweight, scales, expert_ids, zeros=None, bias=None, *_rest, **_named
):
    """`qatpass::w4a16_grouped_linear` (MoE experts) in standard ONNX around one MatMulNBits.

    Every row is multiplied by all E experts' weights at once (one MatMulNBits with N' = E*N),
    then each row keeps its own expert's slice: exact, E times the FLOPs of routing per row.
    """
    from onnxscript import ir
    from onnxscript import opset18 as op
    from onnxscript.values import Opset

    msft = Opset(MS_DOMAIN, 1)
    e, n, k8 = (int(d) for d in qweight.shape)
    k, blocks = k8 * 8, int(scales.shape[-1])
    inputs = [x, qweight, scales] + ([zeros] if zeros is not None else [])
    y = msft.MatMulNBits(*inputs, K=k, N=e * n, bits=4, block_size=k // blocks)  # [T, E*N]
    y = op.Reshape(y, op.Constant(value_ints=[-1, e, n]))
    ids = op.Cast(expert_ids, to=ir.DataType.INT64)
    index = op.Expand(
        op.Reshape(ids, op.Constant(value_ints=[-1, 1, 1])), op.Constant(value_ints=[1, 1, n])
    )
    y = op.Reshape(op.GatherElements(y, index, axis=1), op.Constant(value_ints=[-1, n]))
    return y if bias is None else op.Add(y, op.Gather(bias, ids, axis=0))


def _translations() -> dict[Any, Callable]:
    """Translations of the W4A16 ops `qatpass.lowering` registers."""
    import qatpass.lowering  # noqa: F401  (registers the ops)

    ns = torch.ops.qatpass
    if not hasattr(ns, "w4a16_linear"):
        raise RuntimeError("torch.ops.qatpass.w4a16_linear is not registered (qatpass.lowering)")
    table = {ns.w4a16_linear.default: _w4a16_translation}
    if hasattr(ns, "w4a16_grouped_linear"):
        table[ns.w4a16_grouped_linear.default] = _w4a16_grouped_translation
    return table


def _numpy_dtype(dtype) -> Any:
    import ml_dtypes
    import onnx_ir as ir

    return {
        ir.DataType.FLOAT: np.float32,
        ir.DataType.FLOAT16: np.float16,
        ir.DataType.BFLOAT16: ml_dtypes.bfloat16,
    }[dtype]


def _to_numpy(value) -> np.ndarray:
    t = value.const_value
    if t is None:
        raise ValueError(
            f"MatMulNBits input {value.name!r} is not a constant initializer; the packed weights "
            "must be buffers of the module, not computed"
        )
    return t.numpy()


def _fix_node(node, done: dict[str, Any], ir) -> None:
    """Rewrite one MatMulNBits node's initializers from qatpass layout to onnxruntime's."""
    k = node.attributes["K"].as_int()
    n = node.attributes["N"].as_int()
    g = node.attributes["block_size"].as_int()
    # MatMulNBits wants a power-of-two block_size >= 16; a per-channel group of any other K is
    # the same weight as smaller blocks that repeat its scale (and zero point)
    block = g & -g
    if block < 16:
        raise ValueError(
            f"MatMulNBits needs block_size a power of two >= 16; group size {g} (K={k}) cannot "
            "be exported to ONNX"
        )
    rep = g // block
    if rep > 1:
        node.attributes["block_size"] = ir.AttrInt64("block_size", block)
    g, blocks = block, k // block
    a, b, scales = node.inputs[0], node.inputs[1], node.inputs[2]
    act = a.dtype
    if b.name not in done:
        qweight = _to_numpy(b)
        if qweight.dtype == np.int32 and qweight.ndim == 3:  # experts [E, N, K/8]: E*N rows
            qweight = qweight.reshape(-1, qweight.shape[-1])
        if qweight.dtype != np.int32 or qweight.shape != (n, k // 8):
            raise ValueError(
                f"{b.name}: expected int32 [{n}, {k // 8}], got {qweight.dtype} {qweight.shape}"
            )
        blob = np.ascontiguousarray(qweight).view(np.uint8).reshape(n, blocks, g // 2)
        b.const_value = ir.tensor(blob, name=b.name)
        b.dtype, b.shape = ir.DataType.UINT8, ir.Shape(blob.shape)
        done[b.name] = b
    if scales.name not in done:
        src = scales.const_value
        if src is None:
            raise ValueError(f"MatMulNBits scales {scales.name!r} are not a constant initializer")
        st = np.asarray(src.numpy()).astype(np.float32)  # exact: bf16/fp16 widen losslessly
        st = np.repeat(st.reshape(-1, st.shape[-1]), rep, axis=1)
        if st.shape != (n, blocks):
            raise ValueError(
                f"{scales.name}: expected scales [{n}, {blocks}], got {list(st.shape)}"
            )
        flat = np.ascontiguousarray(st.reshape(-1).astype(_numpy_dtype(act)))
        scales.const_value = ir.tensor(flat, name=scales.name)
        scales.dtype, scales.shape = act, ir.Shape([n * blocks])
        done[scales.name] = scales
    if len(node.inputs) > 3 and node.inputs[3] is not None and node.inputs[3].name not in done:
        zp = node.inputs[3]
        zeros = _to_numpy(zp).astype(np.int16) + 8
        zeros = np.repeat(zeros.reshape(-1, zeros.shape[-1]), rep, axis=1)
        if zeros.shape != (n, blocks):
            raise ValueError(f"{zp.name}: expected zero points [{n}, {blocks}], got {zeros.shape}")
        if blocks % 2:
            zeros = np.concatenate([zeros, np.full((n, 1), 8, np.int16)], axis=1)
        packed = (zeros[:, 0::2] | (zeros[:, 1::2] << 4)).astype(np.uint8)
        zp.const_value = ir.tensor(packed, name=zp.name)
        zp.dtype, zp.shape = ir.DataType.UINT8, ir.Shape(packed.shape)
        done[zp.name] = zp


def _rewrite(model) -> int:
    import onnx_ir as ir

    done: dict[str, Any] = {}
    count = 0
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.op_type == _OP_TYPE and node.domain == MS_DOMAIN:
            _fix_node(node, done, ir)
            count += 1
    return count


def _symbol_names(program: torch.export.ExportedProgram, call: ExportCall) -> dict[str, str]:
    """{torch.export symbol ("s72"): our Dim name ("batch")} for the inputs' dynamic dims."""
    placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    names = list(inspect.signature(call.module.forward).parameters)
    out: dict[str, str] = {}
    for placeholder, name in zip(program.graph_signature.user_inputs, names, strict=True):
        shape = placeholders[placeholder].meta["val"].shape
        for d, dim in ((call.dynamic_shapes or {}).get(name) or {}).items():
            if isinstance(shape[d], torch.SymInt):
                out[str(shape[d])] = dim.__name__
    return out


def _rename_dims(model, names: dict[str, str]) -> None:
    """Name the graph's symbolic dims after our Dims (batch, seq, decoder_seq), in expressions too."""
    import onnx_ir as ir

    if not names:
        return
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, names)) + r")\b")

    def rename(value) -> None:
        if value is None or value.shape is None:
            return
        dims = [
            ir.SymbolicDim(pattern.sub(lambda m: names[m.group(1)], str(d.value)))
            if isinstance(d, ir.SymbolicDim) and d.value is not None
            else d
            for d in value.shape.dims
        ]
        value.shape = ir.Shape(dims)

    for value in [*model.graph.inputs, *model.graph.outputs]:
        rename(value)
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        for value in node.outputs:
            rename(value)


def _refuse_fp4(qmodel: nn.Module) -> None:
    """FP4 weights have no ONNX path onnxruntime runs: refuse them, naming why."""
    from qatpass.lowering.convert import packed_tensors, packed_weights

    schemes = {e.packed.scheme for e in packed_weights(qmodel)}
    schemes |= {t.packed.scheme for _, _, t in packed_tensors(qmodel)}
    fp4 = sorted(s.name for s in schemes if s.kernel_family != "int4")
    if fp4:
        raise ValueError(
            f"to_onnx: the model holds {'/'.join(fp4)} weights, and onnxruntime (1.32, CPU) "
            "runs no FP4 ONNX graph: it has no kernel for Cast or DequantizeLinear from the "
            "standard FLOAT4E2M1 type (opset 23+) and MatMulNBits is integer only. Export FP4 "
            "models as compressed-tensors (save_compressed_tensors) or torch.export (to_pt2)."
        )


def to_onnx(
    qmodel: nn.Module,
    example_inputs: Any,
    path: str | os.PathLike,
    *,
    dynamic_axes: Sequence[int] | None = None,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    opset_version: int = 18,
    extra_translations: dict[Callable, Callable] | None = None,
) -> Path:
    """Export a qatpass inference model to ONNX with MatMulNBits for its W4A16 linears.

    `qmodel` may be an HF model as it is (default config, `use_cache=True`): the graph returns
    one tensor, the logits (see `qatpass.export.torch_export.export_call`). `example_inputs`: a
    tensor, a tuple of positional tensors or a dict of keyword tensors; the ONNX inputs are named
    after the forward's arguments (or the dict's keys), the output after what it is (`logits`,
    `last_hidden_state`, ...; `output` for a plain tensor) unless `output_names`.
    `dynamic_axes`: None gives every input a dynamic batch dim and token-like inputs a dynamic
    sequence dim (`decoder_*` inputs their own); a tuple of dims (0, 1) applies to every input,
    () exports static shapes. Returns the path written. Raises when the model has no W4A16 op,
    and for FP4 (NVFP4, MXFP4) weights, which onnxruntime cannot run (see `_refuse_fp4`).
    """
    import onnx

    if not isinstance(qmodel, nn.Module):
        raise TypeError(f"qmodel must be a torch.nn.Module, got {type(qmodel).__name__}")
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory; give a .onnx file path")
    _refuse_fp4(qmodel)
    call = export_call(qmodel, example_inputs, dynamic_axes)
    register_matmul_nbits_schema()
    table = _translations() | dict(extra_translations or {})
    with torch.no_grad():
        exported = call.export()  # the program to_pt2 writes: one torch.export path for both
        program = torch.onnx.export(
            exported,
            dynamo=True,
            input_names=list(input_names) if input_names else None,
            output_names=list(output_names) if output_names else None,
            opset_version=opset_version,
            custom_translation_table=table,
            optimize=True,
            verify=False,
        )
    if _rewrite(program.model) == 0:
        raise ValueError(
            "the exported graph has no W4A16 linear; convert the model first (qatpass.convert)"
        )
    _rename_dims(program.model, _symbol_names(exported, call))
    if not output_names:
        program.model.graph.outputs[0].name = call.module.output_name
    path.parent.mkdir(parents=True, exist_ok=True)
    program.save(str(path))
    onnx.checker.check_model(str(path))
    return path
