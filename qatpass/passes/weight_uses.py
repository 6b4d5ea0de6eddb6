"""Find the parameters that feed the weight operand of a matmul-like op, and their reduction dim.

Works on Dynamo FX graphs (torch-level ops, parameters lifted to placeholders). For every
matmul-like node (linear, matmul/@, mm, addmm, bmm, baddbmm, grouped mm, einsum) each operand is
walked back through view-like ops (transpose, t, permute, .T/.mT, select, indexing, reshape/view,
chunk/split/unbind, dtype casts) to a placeholder, carrying the operand's reduction dim along; the
placeholder's dim is where the groups run. Analysis only: the graph is not changed, and no
symbolic size is ever forced (`_same` compares sizes with `statically_known_true`, which adds no
guard), so the analysis never specialises a dynamic batch or sequence length.

Besides the matmul paths it records the facts the plan's policy reads: whether an embedding op
reads the tensor (`embedding`), whether a matmul's output feeds a `topk` within a few elementwise
steps (a MoE router), and the placeholder's direct users on each matmul path (`path_users`).
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

__all__ = [
    "MatmulUse",
    "ParamInfo",
    "find_weight_uses",
    "op_name",
    "param_fqn",
    "root_modules",
    "root_param_names",
]


@dataclass
class MatmulUse:
    """One path from a parameter to a matmul operand."""

    op: str  # normalized op name, e.g. "linear", "bmm", "grouped_mm"
    node: str  # the matmul node's name
    dim: int  # reduction dim in the parameter's own coordinates
    router: bool = False  # the matmul's output reaches a topk (MoE routing logits)


@dataclass
class ParamInfo:
    """A parameter placeholder of a Dynamo graph and what the analysis found about it."""

    placeholder: fx.Node
    index: int  # position among the graph's placeholders (and example_inputs)
    fqn: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    uses: list[MatmulUse] = field(default_factory=list)
    other_uses: list[str] = field(default_factory=list)  # ops that are not matmul weight paths
    embedding: bool = False  # an embedding op reads this tensor as its table
    path_users: set[fx.Node] = field(default_factory=set)  # first node of each matmul path

    @property
    def dims(self) -> set[int]:
        return {u.dim for u in self.uses}


def op_name(node: fx.Node) -> str:
    """A short, stable name for a node's target: 'linear', 'transpose', 'transformers::grouped_mm_fallback'."""
    t = node.target
    if node.op == "call_method":
        return str(t)
    if isinstance(t, torch._ops.OpOverload):
        ns, name = t._schema.name.split("::")
        return name if ns == "aten" else f"{ns}::{name}"
    if isinstance(t, torch._ops.OpOverloadPacket):
        ns, name = t._qualified_op_name.split("::")
        return name if ns == "aten" else f"{ns}::{name}"
    name = getattr(t, "__name__", str(t))
    return (
        name.removeprefix("_").removesuffix("_") if name in ("__matmul__", "__rmatmul__") else name
    )


_SOURCE_TOKEN = re.compile(
    r"\._modules\['([^']*)'\]|\._parameters\['([^']*)'\]|\.([A-Za-z_]\w*)|\[(\d+)\]"
)


def param_fqn(node: fx.Node) -> str:
    """Fully qualified parameter name from a Dynamo placeholder's source, e.g. 'layers.0.fc.weight'."""
    grapharg = node.meta.get("grapharg")
    source = getattr(grapharg, "source", None)
    name = source.name if source is not None and hasattr(source, "name") else None
    if callable(name):
        name = name()
    if not isinstance(name, str):
        return node.name
    root = re.match(r"^L\['[^']*'\]|^G\['[^']*'\]|^\w+", name)
    rest = name[root.end() :] if root else name
    parts = [next(g for g in m.groups() if g is not None) for m in _SOURCE_TOKEN.finditer(rest)]
    return ".".join(parts) if parts else node.name


# --- matmul-like ops: which operand indices may be a weight, and which of its dims is reduced ---
_MATMUL_OPERANDS: dict[str, dict[int, int]] = {
    "linear": {1: -1},
    "matmul": {0: -1, 1: -2},
    "mm": {0: -1, 1: -2},
    "bmm": {0: -1, 1: -2},
    "addmm": {1: -1, 2: -2},
    "baddbmm": {1: -1, 2: -2},
    "addbmm": {1: -1, 2: -2},
    "_grouped_mm": {1: -2},
    "grouped_mm": {1: -2},
    "transformers::grouped_mm_fallback": {1: -2},
}


def _val(node: fx.Node):
    return node.meta.get("example_value", node.meta.get("val"))


def _rank(node: fx.Node) -> int | None:
    v = _val(node)
    return v.dim() if isinstance(v, torch.Tensor) else None


def _shape(node: fx.Node) -> tuple | None:
    """The node's sizes as they are (ints or SymInts): never `int()` a symbolic size (a guard)."""
    v = _val(node)
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def _same(a, b) -> bool:
    """a == b for sizes that may be symbolic, without adding a guard (False when unknown)."""
    return bool(statically_known_true(a == b))


def _arg(node: fx.Node, index: int, name: str, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _norm(dim: int, rank: int) -> int:
    return dim % rank


def _einsum_operands(node: fx.Node) -> dict[int, int]:
    """Operand index -> reduced dim for einsum nodes with exactly one contracted index per operand."""
    eq = node.args[0]
    ops = node.args[1:]
    if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
        ops = ops[0]
    if not isinstance(eq, str) or "..." in eq or "->" not in eq or len(ops) != 2:
        return {}
    lhs, out = eq.replace(" ", "").split("->")
    terms = lhs.split(",")
    result = {}
    for i, term in enumerate(terms):
        other = terms[1 - i]
        contracted = [c for c in term if c not in out and c in other]
        if len(contracted) == 1 and term.count(contracted[0]) == 1:
            result[i + 1] = term.index(contracted[0])  # +1: operand i is node.args[i + 1]
    return result


def _matmul_operands(node: fx.Node) -> dict[int, int]:
    """For a matmul-like node: position in node.args -> reduced dim of that operand."""
    if node.op not in ("call_function", "call_method"):
        return {}
    name = op_name(node)
    if name == "einsum":
        return _einsum_operands(node)
    # x.matmul(w) has self at args[0]: the same positions as the function form
    return _MATMUL_OPERANDS.get(name, {})


def _reshape_map(in_shape: Sequence[int], out_shape: Sequence[int], d: int) -> int | None:
    """Input dim that out dim d comes from unchanged (same size, same trailing product), if any."""
    tail = math.prod(out_shape[d + 1 :])
    for j, size in enumerate(in_shape):
        if _same(size, out_shape[d]) and _same(math.prod(in_shape[j + 1 :]), tail):
            if _same(math.prod(in_shape[:j]), math.prod(out_shape[:d])):
                return j
    return None


def _getitem_map(idx, in_rank: int, d: int) -> int | None:
    """Input dim of output dim d for tensor indexing x[idx] (basic indexing + one tensor index)."""
    entries = list(idx) if isinstance(idx, tuple) else [idx]
    consuming = sum(1 for e in entries if e is not None and e is not Ellipsis)
    if sum(1 for e in entries if e is Ellipsis) > 1:
        return None
    expanded: list = []
    for e in entries:
        if e is Ellipsis:
            expanded.extend([slice(None)] * (in_rank - consuming))
        else:
            expanded.append(e)
    if sum(1 for e in expanded if isinstance(e, fx.Node)) > 1:
        return None
    out: list[int | None] = []
    pos = 0
    for e in expanded:
        if e is None:
            out.append(None)
        elif isinstance(e, int) and not isinstance(e, bool):
            pos += 1
        elif isinstance(e, slice):
            out.append(pos)
            pos += 1
        elif isinstance(e, fx.Node):
            v = _val(e)
            if not isinstance(v, torch.Tensor) or v.dtype == torch.bool:
                return None
            out.extend([None] * v.dim())
            pos += 1
        else:
            return None
    out.extend(range(pos, in_rank))
    return out[d] if 0 <= d < len(out) else None


_IDENTITY_OPS = {
    "contiguous", "to", "float", "half", "bfloat16", "double", "type", "type_as", "clone",
    "detach", "_to_copy", "narrow", "index_select", "chunk", "split", "split_with_sizes",
    "tensor_split", "requires_grad_", "clamp", "view_as", "reshape_as",
}  # fmt: skip
_SPLIT_OPS = {"chunk", "split", "split_with_sizes", "tensor_split", "unbind"}


def _step_back(node: fx.Node, d: int) -> tuple[fx.Node, int] | None:
    """One step up a view-like chain: (input node, input dim) that node's dim d comes from."""
    if node.op not in ("call_function", "call_method"):
        return None
    name = op_name(node)
    src = node.args[0] if node.args else None
    if name == "getitem" and isinstance(src, fx.Node) and not isinstance(_val(src), torch.Tensor):
        # element of a chunk/split/unbind result
        if src.op in ("call_function", "call_method") and op_name(src) in _SPLIT_OPS:
            if op_name(src) == "unbind":
                u = _norm(_arg(src, 1, "dim", 0), _rank(src.args[0]) or 1)
                return src.args[0], d if d < u else d + 1
            return src.args[0], d
        return None
    if not isinstance(src, fx.Node):
        return None
    in_rank = _rank(src)
    if in_rank is None:
        return None
    if name in _IDENTITY_OPS:
        return src, d
    if name == "getitem":
        j = _getitem_map(node.args[1], in_rank, d)
        return (src, j) if j is not None else None
    if name == "getattr":
        attr = node.args[1]
        if attr == "T":
            return src, in_rank - 1 - d
        if attr == "mT":
            return src, {in_rank - 1: in_rank - 2, in_rank - 2: in_rank - 1}.get(d, d)
        if attr == "data":
            return src, d
        return None
    if name in ("t", "transpose", "swapaxes", "swapdims"):
        if name == "t":
            a, b = (0, 1) if in_rank == 2 else (0, 0)
        else:
            a, b = _norm(_arg(node, 1, "dim0"), in_rank), _norm(_arg(node, 2, "dim1"), in_rank)
        return src, {a: b, b: a}.get(d, d)
    if name == "permute":
        dims = node.args[1:] if len(node.args) > 2 else _arg(node, 1, "dims")
        if isinstance(dims, int):
            dims = [dims]
        return src, _norm(list(dims)[d], in_rank)
    if name == "select":
        s = _norm(_arg(node, 1, "dim"), in_rank)
        return src, d if d < s else d + 1
    if name == "unsqueeze":
        u = _norm(_arg(node, 1, "dim"), in_rank + 1)
        return None if d == u else (src, d if d < u else d - 1)
    if name in ("reshape", "view", "flatten", "unflatten", "squeeze", "expand"):
        in_shape, out_shape = _shape(src), _shape(node)
        if in_shape is None or out_shape is None:
            return None
        if name == "expand" and len(in_shape) == len(out_shape):
            return src, d
        j = _reshape_map(in_shape, out_shape, d)
        return (src, j) if j is not None else None
    return None


def _trace_to_placeholder(node: fx.Node, d: int) -> tuple[fx.Node, int, fx.Node] | None:
    """(placeholder, its dim, the placeholder's direct user on the path) or None."""
    seen = 0
    user = node
    while node.op != "placeholder":
        step = _step_back(node, d)
        seen += 1
        if step is None or seen > 64:
            return None
        user = node
        node, d = step
    return node, d, user


_EMBEDDING_OPS = {"embedding", "embedding_bag", "_embedding_bag"}
# ops a router's logits may pass through on their way to topk
_ROUTER_PASS = {
    "softmax", "log_softmax", "sigmoid", "float", "to", "type_as", "_to_copy", "view", "reshape",
    "add", "iadd", "__add__", "mul", "__mul__", "contiguous", "_softmax", "getitem", "unsqueeze",
}  # fmt: skip


def _feeds_topk(node: fx.Node, depth: int = 6) -> bool:
    """Whether node's value reaches a topk through at most `depth` elementwise/view steps."""
    frontier, seen = [node], set()
    for _ in range(depth):
        nxt = []
        for n in frontier:
            for u in n.users:
                if u in seen or u.op not in ("call_function", "call_method"):
                    continue
                seen.add(u)
                name = op_name(u)
                if name == "topk":
                    return True
                if name in _ROUTER_PASS:
                    nxt.append(u)
        frontier = nxt
    return False


def _embedding_table(node: fx.Node) -> fx.Node | None:
    """The table operand of an embedding node (F.embedding(input, weight) / aten (weight, ids))."""
    if node.op != "call_function" or op_name(node) not in _EMBEDDING_OPS:
        return None
    t = node.target
    index = 0 if isinstance(t, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)) else 1
    if len(node.args) > index and isinstance(node.args[index], fx.Node):
        return node.args[index]
    w = node.kwargs.get("weight")
    return w if isinstance(w, fx.Node) else None


def _is_param(node: fx.Node, example: object) -> bool:
    if isinstance(example, torch.nn.Parameter):
        return True
    grapharg = node.meta.get("grapharg")
    source = getattr(grapharg, "source", None)
    name = getattr(source, "name", "")
    return isinstance(name, str) and "._parameters[" in name


def root_modules() -> list[torch.nn.Module]:
    """The modules being torch.compile'd up the call stack (the user's models), outermost last."""
    from torch._dynamo.eval_frame import OptimizedModule

    roots: list[torch.nn.Module] = []
    frame = inspect.currentframe()
    while frame is not None:
        owner = frame.f_locals.get("self")
        if isinstance(owner, OptimizedModule) and all(owner._orig_mod is not r for r in roots):
            roots.append(owner._orig_mod)
        frame = frame.f_back
    return roots


def root_param_names(roots: Sequence[torch.nn.Module] | None = None) -> dict[int, str]:
    """id(parameter) -> fully qualified name, for the models being compiled up the call stack.

    After a graph break inside a submodule, Dynamo's sources name parameters relative to that
    submodule ("experts.down_proj"); the torch.compile'd root module on the stack gives full names.
    """
    names: dict[int, str] = {}
    for root in root_modules() if roots is None else roots:
        for fqn, p in root.named_parameters(remove_duplicate=True):
            names.setdefault(id(p), fqn)
    return names


def find_weight_uses(
    gm: fx.GraphModule,
    example_inputs: Sequence[object] | None = None,
    is_param: Callable[[fx.Node, object], bool] = _is_param,
    names: dict[int, str] | None = None,
) -> list[ParamInfo]:
    """Every parameter placeholder of gm, with the matmul weight paths that reach it.

    `names` maps id(parameter) to its full name (see `root_param_names`); the Dynamo source name
    is used for parameters it does not know.
    """
    names = root_param_names() if names is None else names
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    examples = list(example_inputs) if example_inputs is not None else [None] * len(placeholders)
    infos: dict[fx.Node, ParamInfo] = {}
    for i, ph in enumerate(placeholders):
        example = examples[i] if i < len(examples) else None
        if not is_param(ph, example):
            continue
        value = example if isinstance(example, torch.Tensor) else _val(ph)
        if not isinstance(value, torch.Tensor):
            continue
        fqn = names.get(id(example)) or param_fqn(ph)
        infos[ph] = ParamInfo(ph, i, fqn, tuple(value.shape), value.dtype)

    for node in gm.graph.nodes:
        for pos, red_dim in _matmul_operands(node).items():
            if pos >= len(node.args) or not isinstance(node.args[pos], fx.Node):
                continue
            operand = node.args[pos]
            rank = _rank(operand)
            if rank is None or rank < 2:
                continue
            found = _trace_to_placeholder(operand, _norm(red_dim, rank))
            if found is None or found[0] not in infos:
                continue
            ph, d, user = found
            infos[ph].uses.append(MatmulUse(op_name(node), node.name, d, _feeds_topk(node)))
            infos[ph].path_users.add(user)
        table = _embedding_table(node)
        if table is not None:
            found = _trace_to_placeholder(table, 0)
            if found is not None and found[0] in infos:
                infos[found[0]].embedding = True

    for info in infos.values():
        if not info.uses:
            info.other_uses = sorted({op_name(u) for u in info.placeholder.users})
    return list(infos.values())
