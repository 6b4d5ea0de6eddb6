"""Structural diff of one FX graph before and after the pass: nodes added, removed and rewired.

Nodes are matched by name (FX names are unique and the pass rewrites graphs in place, keeping the
names of the nodes it does not touch). For the train pass:

    before: w = placeholder; y = linear(x, w)        after: w = placeholder
                                                            w_fq = qatpass::fake_quantize_int4(w)
                                                            y = linear(x, w_fq)
    -> added w_fq (tied to w's parameter), rewired y (w -> w_fq)

For the inference lowering, `linear(x, w, b)` is removed, `get_attr` constants (packed weight,
scales) and `qatpass::w4a16_linear` are added and the linear's users are rewired. Every change is
tied to the fully qualified name of the parameter it stems from, when there is one.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.fx as fx

from qatpass.passes.weight_uses import op_name

__all__ = ["NodeSnapshot", "NodeChange", "snapshot", "diff_nodes"]


@dataclass(frozen=True)
class NodeSnapshot:
    """What the diff needs of a node, kept after the graph is rewritten in place."""

    name: str
    op: str  # FX opcode: placeholder, call_function, get_attr, ...
    target: str  # short op name, e.g. "linear", "qatpass::fake_quantize_int4", "get_attr"
    inputs: tuple[str, ...]  # names of the nodes it reads, in argument order
    args: str  # the arguments, printed (node names as %name)
    shape: tuple[int, ...] | None


@dataclass
class NodeChange:
    """One node the pass added, removed or rewired."""

    kind: str  # "added" | "removed" | "rewired"
    node: str
    op: str
    fqn: str | None  # the parameter the change stems from
    detail: str  # printed arguments ("x, w -> x, w_fq" for a rewired node)
    shape: tuple[int, ...] | None = None
    group_size: int | None = None
    dim: int | None = None


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    val = node.meta.get("example_value", node.meta.get("val"))
    if not isinstance(val, torch.Tensor):
        return None
    try:
        return tuple(int(s) for s in val.shape)
    except (TypeError, ValueError, RuntimeError):  # symbolic sizes
        return None


def _target(node: fx.Node) -> str:
    if node.op in ("call_function", "call_method"):
        return op_name(node)
    if node.op == "get_attr":  # a constant; its attribute path is in the args
        return "get_attr"
    return str(node.target)


def _print_arg(a: object) -> str:
    if isinstance(a, fx.Node):
        return f"%{a.name}"
    if isinstance(a, (list, tuple)):
        inner = ", ".join(_print_arg(x) for x in a)
        return f"[{inner}]" if isinstance(a, list) else f"({inner})"
    if isinstance(a, dict):
        return "{" + ", ".join(f"{k}: {_print_arg(v)}" for k, v in a.items()) + "}"
    return repr(a)


def snapshot(gm: fx.GraphModule) -> list[NodeSnapshot]:
    """The nodes of gm, in graph order, as plain data."""
    nodes = []
    for n in gm.graph.nodes:
        args = [_print_arg(a) for a in n.args]
        args += [f"{k}={_print_arg(v)}" for k, v in n.kwargs.items()]
        if n.op == "get_attr":
            args = [str(n.target)]
        nodes.append(
            NodeSnapshot(
                name=n.name,
                op=n.op,
                target=_target(n),
                inputs=tuple(i.name for i in n.all_input_nodes),
                args=", ".join(args),
                shape=_shape(n),
            )
        )
    return nodes


def _reachable_params(
    name: str, nodes: Mapping[str, NodeSnapshot], params: Mapping[str, str], through: set[str]
) -> list[str]:
    """The parameters a node reads: itself when it is a parameter placeholder, else its inputs,
    walking back only through `through` (the other added, or removed, nodes); nearest first."""
    if name in params:
        return [params[name]]
    found: list[str] = []
    seen = {name}
    frontier = [name]
    while frontier:
        nxt = []
        for n in frontier:
            node = nodes.get(n)
            for i in node.inputs if node is not None else ():
                if i in seen:
                    continue
                seen.add(i)
                if i in params:
                    found.append(params[i])
                elif i in through:
                    nxt.append(i)
        frontier = nxt
    return found


def _pick(candidates: Sequence[str], prefer: set[str] | None) -> str | None:
    """The first candidate in `prefer` (the quantized parameters), else None; any when no prefer."""
    for c in candidates:
        if prefer is None or c in prefer:
            return c
    return None


def diff_nodes(
    before: Sequence[NodeSnapshot],
    after: Sequence[NodeSnapshot],
    params_before: Mapping[str, str],
    params_after: Mapping[str, str] | None = None,
    quantized: Iterable[str] | None = None,
) -> list[NodeChange]:
    """Changes from `before` to `after`; params_* map a placeholder's name to its parameter's fqn.

    Added nodes come first (graph order), then rewired nodes (same name, other inputs or target),
    then removed nodes. A change is tied to a parameter, preferring the `quantized` ones: an added
    node to the parameter it reads (through other added nodes), else to the removed node it
    replaces (a surviving node read that one and reads this one now), else to the added node it
    feeds (constants such as packed weights), else to any parameter it reads (e.g. a bias).
    """
    params_after = params_before if params_after is None else params_after
    prefer = None if quantized is None else set(quantized)
    old = {n.name: n for n in before}
    new = {n.name: n for n in after}
    added = [n for n in after if n.name not in old]
    removed = [o for o in before if o.name not in new]
    added_names = {n.name for n in added}
    removed_names = {o.name for o in removed}
    reads_added = {n.name: _reachable_params(n.name, new, params_after, added_names) for n in added}
    reads_removed = {
        o.name: _reachable_params(o.name, old, params_before, removed_names) for o in removed
    }
    fqn_removed = {k: _pick(v, prefer) or _pick(v, None) for k, v in reads_removed.items()}
    fqn_added = {k: _pick(v, prefer) for k, v in reads_added.items()}

    surviving = [(old[n.name], n) for n in after if n.name in old]
    for o, n in surviving:  # replacements
        gone = [fqn_removed[i] for i in o.inputs if i in removed_names and fqn_removed[i]]
        for i in n.inputs:
            if i in added_names and fqn_added[i] is None and gone:
                fqn_added[i] = gone[0]
    users: dict[str, list[str]] = {}
    for n in added:
        for i in n.inputs:
            users.setdefault(i, []).append(n.name)
    changed = True
    while changed:  # constants and helpers take the parameter of the added node they feed
        changed = False
        for n in added:
            if fqn_added[n.name] is None:
                tied = [fqn_added[u] for u in users.get(n.name, []) if fqn_added[u]]
                if tied:
                    fqn_added[n.name] = tied[0]
                    changed = True
    for n in added:
        fqn_added[n.name] = fqn_added[n.name] or _pick(reads_added[n.name], None)

    changes = [
        NodeChange("added", n.name, n.target, fqn_added[n.name], n.args, n.shape) for n in added
    ]
    for o, n in surviving:
        if o.inputs == n.inputs and o.target == n.target and o.args == n.args:
            continue
        fresh = [i for i in n.inputs if i not in o.inputs]
        gone = [i for i in o.inputs if i not in n.inputs]
        candidates = [fqn_added.get(i) or params_after.get(i) for i in fresh]
        candidates += [fqn_removed.get(i) or params_before.get(i) for i in gone]
        candidates = [c for c in candidates if c]
        fqn = _pick(candidates, prefer) or _pick(candidates, None)
        op = n.target if o.target == n.target else f"{o.target} -> {n.target}"
        changes.append(NodeChange("rewired", n.name, op, fqn, f"{o.args}  ->  {n.args}", n.shape))
    changes += [
        NodeChange("removed", o.name, o.target, fqn_removed[o.name], o.args, o.shape)
        for o in removed
    ]
    return changes
