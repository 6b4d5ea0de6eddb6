"""torch.export (.pt2) of a qatpass inference model, with the W4A16 op visible in the graph.

    call = export_call(qmodel, example_inputs)   # HF model as it is -> tensors in, logits out
    ep = torch.export.export(call.module, call.args, call.kwargs, dynamic_shapes=call.dynamic_shapes)
    torch.export.save(ep, path)                  # loads anywhere `import qatpass` registered the op

`export_call` is the step both exporters (`to_pt2`, `to_onnx`) share. The model is wrapped, never
modified: the wrapper calls it with `use_cache=False` when its forward takes that argument (an HF
causal LM then builds no `DynamicCache`) and returns one tensor, `.logits` when the output has it,
else the first tensor output. Every input gets a dynamic batch dim (one `Dim("batch")` shared by
all) and token-like inputs a dynamic sequence dim: `seq` for the encoder/decoder-only inputs,
`decoder_seq` for `decoder_*` inputs (T5's encoder and decoder lengths differ).

torch.export specialises an example dim of size 0 or 1 to that constant (a dynamic Dim on it is an
error, "specialized it to be a constant (1)", checked on torch 2.13), while a program traced at
size >= 2 gets the range [0, inf) and runs at size 1. So an example dim of size 1 that is exported
as dynamic is repeated to size 2 for tracing (for every input sharing that Dim), and the program
runs at batch 1 and sequence 1.

The op is a custom op with a fake (meta) implementation, so `run_decompositions()` keeps it as
one node; a runtime that loads the file only needs the op registered (`load_pt2` does that).
"""

from __future__ import annotations

import inspect
import keyword
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

__all__ = [
    "ExportCall",
    "LogitsOnly",
    "export_call",
    "export_program",
    "load_pt2",
    "qatpass_op_nodes",
    "to_pt2",
]

OP_NAMESPACE = "qatpass"
BATCH, SEQ, DECODER_SEQ = "batch", "seq", "decoder_seq"


def _one_tensor(out: Any) -> tuple[str, torch.Tensor]:
    """(name, tensor) an exporter returns: `out` itself, `out.logits`, else out's first tensor."""
    if isinstance(out, torch.Tensor):
        return "output", out
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return "logits", logits
    if isinstance(out, Mapping):  # an HF ModelOutput: an OrderedDict of the fields that are set
        items = [(str(k), v) for k, v in out.items()]
    elif isinstance(out, (tuple, list)):
        items = [("output", v) for v in out]
    else:
        items = []
    for name, value in items:
        if isinstance(value, torch.Tensor):
            return name, value
    raise TypeError(
        f"the model returned {type(out).__name__} with no tensor in it: nothing to export"
    )


def _forward_params(model: nn.Module) -> list[inspect.Parameter]:
    try:
        return list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):  # a forward without a Python signature
        return []


class LogitsOnly(nn.Module):
    """`model` as tensors in, one tensor out (`.logits`, else the first tensor), no KV cache.

    Calls the model the way it is called (positional or keyword), adding `use_cache=False` when
    its forward names a `use_cache` argument. Holds the model as its submodule `model` and sets
    nothing on it, so the exported state dict keys start with `model.`.
    """

    output_name = "output"  # what the output is; export_call's wrapper reports its last call

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.training = model.training  # the wrapper's own flag only: train() would set model's
        names = {p.name for p in _forward_params(model)}
        self.extra_kwargs = {"use_cache": False} if "use_cache" in names else {}

    def named_output(self, *args: torch.Tensor, **kwargs: torch.Tensor) -> tuple[str, torch.Tensor]:
        """(what the output is: "logits", a field name or "output"; the tensor)."""
        return _one_tensor(self.model(*args, **kwargs, **self.extra_kwargs))

    def forward(self, *args: torch.Tensor, **kwargs: torch.Tensor) -> torch.Tensor:
        return self.named_output(*args, **kwargs)[1]


def _named_logits_only(model: nn.Module, names: Sequence[str]) -> LogitsOnly:
    """A LogitsOnly whose forward's signature names the inputs (torch.export binds the example
    to it, ONNX names its graph inputs after it) and whose `output_name` says what the last call
    returned (kept in a closure: torch.export restores the module's attributes after tracing)."""
    P = inspect.Parameter
    params = [P("self", P.POSITIONAL_OR_KEYWORD)]
    params += [P(name, P.POSITIONAL_OR_KEYWORD) for name in names]
    seen: list[str] = []

    def forward(self, *args: torch.Tensor, **kwargs: torch.Tensor) -> torch.Tensor:
        name, out = self.named_output(*args, **kwargs)
        seen[:] = [name]
        return out

    forward.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    output_name = property(lambda self: seen[-1] if seen else "output")
    cls = type("LogitsOnly", (LogitsOnly,), {"forward": forward, "output_name": output_name})
    return cls(model)


class ExportCall(NamedTuple):
    """What to hand to `torch.export.export` / `torch.onnx.export` for one model."""

    module: LogitsOnly
    args: tuple[torch.Tensor, ...]  # the example, positional (empty when given as a dict)
    kwargs: dict[str, torch.Tensor]  # the example, by keyword (empty when given positionally)
    dynamic_shapes: dict[str, dict[int, Any] | None] | None  # by input name; None: all static

    def export(self) -> torch.export.ExportedProgram:
        """`torch.export.export` of the call. A range the model imposes (BERT's sequence <=
        max_position_embeddings) is taken from torch.export's suggested fixes; a dim the model
        fixes to a constant is an error that names it."""
        from torch.export.dynamic_shapes import refine_dynamic_shapes_from_suggested_fixes

        shapes = self.dynamic_shapes
        for _ in range(3):
            try:
                return torch.export.export(
                    self.module, self.args, self.kwargs, dynamic_shapes=shapes
                )
            except torch._dynamo.exc.UserError as e:
                if shapes is None or "Suggested fixes" not in str(e):
                    raise
                refined = refine_dynamic_shapes_from_suggested_fixes(e.msg, shapes)
                static = [
                    f"dim {d} of {name!r}"
                    for name, dims in refined.items()
                    for d, dim in (dims or {}).items()
                    if isinstance(dim, int)
                ]
                if static:
                    raise ValueError(
                        f"the model fixes {', '.join(static)} to a constant, so it cannot be "
                        "exported as dynamic; give dynamic_axes without it. torch.export: "
                        f"{e}"
                    ) from e
                shapes = refined
        return torch.export.export(self.module, self.args, self.kwargs, dynamic_shapes=shapes)


def _named_inputs(model: nn.Module, example_inputs: Any) -> tuple[dict[str, torch.Tensor], bool]:
    """({input name: tensor}, given positionally) for a tensor, a tuple or a dict of tensors."""
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if isinstance(example_inputs, Mapping):
        named = dict(example_inputs)
        for name in named:
            if not (isinstance(name, str) and name.isidentifier() and not keyword.iskeyword(name)):
                raise ValueError(f"example_inputs keys must be argument names, got {name!r}")
        positional = False
    elif isinstance(example_inputs, (tuple, list)):
        positional_kinds = (
            inspect.Parameter.POSITIONAL_ONLY,
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
        )
        names: list[str] = []
        for p in _forward_params(model):
            if p.kind not in positional_kinds or len(names) == len(example_inputs):
                break
            names.append(p.name)
        names += [f"input_{i}" for i in range(len(names), len(example_inputs))]
        named = dict(zip(names, example_inputs, strict=True))
        positional = True
    else:
        raise TypeError(
            "example_inputs must be a tensor, a tuple of tensors or a dict of keyword tensors, "
            f"got {type(example_inputs).__name__}"
        )
    for name, x in named.items():
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"example inputs must be tensors, got {type(x).__name__} for {name!r}")
    return named, positional


def _is_sequence_input(name: str, x: torch.Tensor) -> bool:
    """Token-like inputs [batch, seq, ...]: integer/bool tensors (ids, masks, positions) and
    `*inputs_embeds`; float inputs (features, pixel_values) have only a batch dim."""
    return not (x.is_floating_point() or x.is_complex()) or name.endswith("inputs_embeds")


def _dim_names(name: str, x: torch.Tensor, dynamic_axes: Sequence[int] | None) -> dict[int, str]:
    """{dim: Dim name} for one input: 0 -> batch, 1 -> seq (decoder_seq for `decoder_*`)."""
    if dynamic_axes is None:
        axes: tuple[int, ...] = (0, 1) if _is_sequence_input(name, x) else (0,)
    else:
        axes = tuple(dynamic_axes)
    seq = DECODER_SEQ if name.startswith("decoder_") else SEQ
    return {a: BATCH if a == 0 else seq for a in axes if a < x.dim()}


def _grow_size_one(
    named: dict[str, torch.Tensor], dims: dict[str, dict[int, str]]
) -> dict[str, torch.Tensor]:
    """Check that inputs sharing a Dim agree on its size; repeat a size-1 Dim to size 2 (torch.export
    would specialise it to the constant 1)."""
    sizes: dict[str, dict[str, int]] = {}
    for name, by_dim in dims.items():
        for d, dim_name in by_dim.items():
            sizes.setdefault(dim_name, {})[name] = int(named[name].shape[d])
    for dim_name, by_input in sizes.items():
        if len(set(by_input.values())) > 1:
            seen = ", ".join(f"{n} {s}" for n, s in by_input.items())
            raise ValueError(f"example inputs disagree on the {dim_name} size: {seen}")
        if 0 in by_input.values():
            raise ValueError(f"example inputs have {dim_name} size 0 ({', '.join(by_input)})")
    grow = {dim_name for dim_name, by_input in sizes.items() if 1 in by_input.values()}
    out = dict(named)
    for name, by_dim in dims.items():
        for d, dim_name in by_dim.items():
            if dim_name in grow:
                out[name] = torch.cat([out[name], out[name]], dim=d)
    return out


def export_call(
    model: nn.Module, example_inputs: Any, dynamic_axes: Sequence[int] | None = None
) -> ExportCall:
    """Wrap `model` as `LogitsOnly` and give each example input its dynamic dims.

    example_inputs: a tensor, a tuple of positional tensors or a dict of keyword tensors (HF
    style: `input_ids`, `attention_mask`, `decoder_input_ids`, ...). `dynamic_axes` None: dim 0
    (batch) of every input and dim 1 (sequence) of token-like inputs (see `_is_sequence_input`);
    else the dims (0 batch, 1 sequence) made dynamic on every input, () for static shapes.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if dynamic_axes is not None and any(a not in (0, 1) for a in dynamic_axes):
        raise ValueError(
            f"dynamic_axes may hold 0 (batch) and 1 (sequence), got {tuple(dynamic_axes)}"
        )
    named, positional = _named_inputs(model, example_inputs)
    dims = {name: _dim_names(name, x, dynamic_axes) for name, x in named.items()}
    named = _grow_size_one(named, dims)
    export_dims = {
        n: torch.export.Dim(n) for n in sorted({n for d in dims.values() for n in d.values()})
    }
    dynamic_shapes = None
    if export_dims:
        dynamic_shapes = {
            name: {a: export_dims[n] for a, n in by_dim.items()} or None
            for name, by_dim in dims.items()
        }
    module = _named_logits_only(model, list(named))
    if positional:
        return ExportCall(module, tuple(named.values()), {}, dynamic_shapes)
    return ExportCall(module, (), named, dynamic_shapes)


def export_program(
    model: nn.Module, example_inputs: Any, dynamic_axes: Sequence[int] | None = None
) -> torch.export.ExportedProgram:
    """`torch.export.export` of `export_call(model, example_inputs, dynamic_axes)`."""
    return export_call(model, example_inputs, dynamic_axes).export()


def qatpass_op_nodes(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    """The graph's calls to qatpass ops (any `torch.ops.qatpass.*` overload)."""
    return [
        n
        for n in gm.graph.nodes
        if n.op == "call_function"
        and isinstance(n.target, torch._ops.OpOverload)
        and n.target.namespace == OP_NAMESPACE
    ]


def to_pt2(
    qmodel: nn.Module,
    example_inputs: Any,
    path: str | os.PathLike,
    *,
    dynamic_axes: Sequence[int] | None = None,
    decompose: bool = False,
) -> Path:
    """`torch.export` `qmodel` (an HF model as it is, or any module) and save it to `path` (.pt2).

    The program returns one tensor (logits for an HF model) and takes the inputs as the example
    gives them (positionally, or by keyword for a dict), with dynamic batch and sequence dims (see
    `export_call`). `decompose=True` saves `ep.run_decompositions()` (core ATen plus the qatpass
    op). Raises when the graph holds no qatpass op (the model was not converted). Returns the path.
    """
    if not isinstance(qmodel, nn.Module):
        raise TypeError(f"qmodel must be a torch.nn.Module, got {type(qmodel).__name__}")
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory; give a .pt2 file path")
    ep = export_program(qmodel, example_inputs, dynamic_axes)
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
