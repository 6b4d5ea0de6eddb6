"""The quantization plan: which weights are quantized, along which dim, and why the rest are not.

One policy function, `decide`, turns what is known about one tensor (`WeightFacts`) into a
`PlannedWeight` or a `SkippedWeight`. The facts come from the graph analysis
(`facts_from_graph`, which sees every matmul weight whatever module holds it) or, for
`convert(model)` without tracing, from a walk of the modules (`facts_from_modules`); both feed
the same `decide`, and every consumer reads the resulting `QuantPlan`: the fake-quant rewrite,
the W4A16 lowering, `convert`/`refresh`, the exporters and the diff tool. A plan is small and
serializable (`to_dict`/`from_dict`), and travels with the backend (`QatBackend.plan`) and into
the compressed-tensors checkpoint.

Defaults are structural, then the filters of `QatConfig`:
- a tensor an embedding op reads is an embedding and stays high precision, also when tied to
  the output head; the output head itself (`get_output_embeddings()` of an HF model, or a name
  the default `exclude` matches) stays high precision too, as vLLM/SGLang checkpoints expect;
- a matmul whose output feeds a `topk` is a MoE router and stays high precision;
- `include` (when given) overrides these structural defaults for the names it matches;
  `exclude` leaves alone what it matches.
Skips for any other reason (shape not divisible by the group, a non-float dtype, two reduction
dims) are not the policy's choice: `SkippedWeight.by_policy` is False for them, and a default
run logs them at WARNING.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor

from qatpass.config import QatConfig
from qatpass.passes.weight_uses import ParamInfo, find_weight_uses, root_modules
from qatpass.scheme import Int4Scheme, QuantScheme, check_quantizable, scheme_from_dict

__all__ = [
    "EXPERT_PARAM_NAMES",
    "GraphWeight",
    "PlannedWeight",
    "QuantPlan",
    "SkippedWeight",
    "WeightFacts",
    "decide",
    "facts_from_modules",
    "head_names",
    "is_conv1d",
    "is_experts_module",
    "plan_from_facts",
    "plan_for",
    "plan_graph",
]

log = logging.getLogger("qatpass")

PLAN_VERSION = 1
EXPERT_PARAM_NAMES = ("gate_up_proj", "up_proj", "down_proj")
_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class WeightFacts:
    """What the analysis knows about one tensor, the only input of the policy."""

    fqn: str  # its first name (as named_parameters yields it)
    shape: tuple[int, ...]
    dtype: torch.dtype
    dims: frozenset[int] = frozenset()  # reduction dims of its matmul uses (own coordinates)
    ops: tuple[str, ...] = ()  # the matmul-like ops it feeds
    other_uses: tuple[str, ...] = ()  # ops reading it that are not matmul weight paths
    aliases: tuple[str, ...] = ()  # every other name of the same tensor (tied weights)
    embedding: bool = False  # an embedding op reads it
    head: bool = False  # it is the model's output head (get_output_embeddings)
    router: bool = False  # every matmul it feeds is a MoE router (output reaches topk)

    @property
    def names(self) -> tuple[str, ...]:
        return (self.fqn, *self.aliases)


@dataclass(frozen=True)
class PlannedWeight:
    """A weight the plan quantizes: its name, shape, reduction dim and resolved group size."""

    fqn: str
    shape: tuple[int, ...]
    dim: int  # reduction dim, in the parameter's own coordinates
    group_size: int  # the resolved group (K itself when per channel)
    ops: tuple[str, ...] = ()  # the matmul-like ops it feeds
    aliases: tuple[str, ...] = ()


@dataclass(frozen=True)
class SkippedWeight:
    """A tensor the plan leaves in high precision, with the reason."""

    fqn: str
    shape: tuple[int, ...]
    reason: str
    matmul_weight: bool  # it feeds a matmul weight operand
    by_policy: bool = True  # left alone by the policy or the filters (not for shape/dtype)


def _matches(patterns: Sequence[str], names: Iterable[str]) -> str | None:
    for pattern in patterns:
        for name in names:
            if re.search(pattern, name):
                return pattern
    return None


def decide(facts: WeightFacts, config: QatConfig) -> PlannedWeight | SkippedWeight:
    """The policy: whether the tensor described by `facts` is quantized under `config`."""
    shape = tuple(facts.shape)

    def skip(reason: str, by_policy: bool = True) -> SkippedWeight:
        return SkippedWeight(facts.fqn, shape, reason, bool(facts.ops), by_policy)

    if not facts.ops:
        used = f" (used by {', '.join(facts.other_uses)})" if facts.other_uses else ""
        return skip("not a matmul weight" + used)
    included = bool(config.include) and _matches(config.include, facts.names) is not None
    if config.include and not included:
        return skip(f"not matched by include {list(config.include)}")
    if not included:
        tied = f" (tied: {', '.join(facts.aliases)})" if facts.aliases else ""
        if facts.embedding:
            return skip("an embedding (an embedding op reads it): stays high precision" + tied)
        if facts.head:
            return skip("the output head: stays high precision" + tied)
        if facts.router:
            return skip("a MoE router (its output feeds topk): stays high precision")
    pattern = _matches(config.exclude, facts.names)
    if pattern is not None:
        return skip(f"excluded by filter {pattern!r}")
    if len(facts.dims) > 1:
        return skip(f"used with different reduction dims {sorted(facts.dims)}", False)
    if facts.dtype not in _FLOATS:
        return skip(f"dtype {facts.dtype} is not a float type", False)
    dim = next(iter(facts.dims))
    reason = check_quantizable(shape, dim, config.scheme)
    if reason is not None:
        return skip(reason, False)
    group = config.scheme.group_size_for(shape[dim])
    return PlannedWeight(facts.fqn, shape, dim, group, tuple(sorted(facts.ops)), facts.aliases)


@dataclass
class QuantPlan:
    """Which weights are quantized (by name), under which scheme; a reason for every other one."""

    scheme: QuantScheme = field(default_factory=Int4Scheme)
    weights: dict[str, PlannedWeight] = field(default_factory=dict)
    skipped: dict[str, SkippedWeight] = field(default_factory=dict)

    @property
    def quantized_names(self) -> list[str]:
        return sorted(self.weights)

    def __contains__(self, fqn: object) -> bool:
        return fqn in self.weights

    def __len__(self) -> int:
        return len(self.weights)

    def lookup(self, name: str) -> PlannedWeight | None:
        """The planned weight called `name`, by its first name or any alias."""
        if name in self.weights:
            return self.weights[name]
        return next((w for w in self.weights.values() if name in w.aliases), None)

    def add(self, entry: PlannedWeight | SkippedWeight) -> None:
        """Record a decision; a tensor quantized in one graph stays quantized (same dim)."""
        if isinstance(entry, PlannedWeight):
            old = self.weights.get(entry.fqn)
            if old is not None and old.dim != entry.dim:
                log.warning(
                    "qat4: %s is reduced along dim %d in one graph and %d in another; the plan "
                    "keeps dim %d",
                    entry.fqn,
                    old.dim,
                    entry.dim,
                    old.dim,
                )
                return
            if old is not None:
                entry = PlannedWeight(
                    entry.fqn, entry.shape, entry.dim, entry.group_size,
                    tuple(sorted({*old.ops, *entry.ops})), entry.aliases,
                )  # fmt: skip
            self.weights[entry.fqn] = entry
            self.skipped.pop(entry.fqn, None)
        elif entry.fqn not in self.weights:
            old = self.skipped.get(entry.fqn)
            if old is None or (entry.matmul_weight and not old.matmul_weight):
                self.skipped[entry.fqn] = entry

    def merge(self, other: QuantPlan) -> QuantPlan:
        if other.scheme != self.scheme:
            raise ValueError(f"cannot merge plans of schemes {self.scheme} and {other.scheme}")
        for entry in [*other.skipped.values(), *other.weights.values()]:
            self.add(entry)
        return self

    def not_by_policy(self) -> list[SkippedWeight]:
        """Matmul weights skipped for a reason other than the policy (shape, dtype, dims)."""
        return [s for s in self.skipped.values() if s.matmul_weight and not s.by_policy]

    def to_dict(self) -> dict[str, Any]:
        def row(entry) -> dict[str, Any]:
            d = asdict(entry)
            d["shape"] = list(entry.shape)
            if "ops" in d:
                d["ops"], d["aliases"] = list(entry.ops), list(entry.aliases)
            return d

        return {
            "version": PLAN_VERSION,
            "scheme": self.scheme.to_dict(),
            "weights": [row(w) for w in self.weights.values()],
            "skipped": [row(s) for s in self.skipped.values()],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QuantPlan:
        """Inverse of `to_dict`; refuses anything malformed with a clear message."""
        if not isinstance(d, dict) or d.get("version") != PLAN_VERSION:
            raise ValueError(f"not a qatpass plan of version {PLAN_VERSION}: {str(d)[:80]!r}")
        try:
            plan = cls(scheme=scheme_from_dict(d["scheme"]))
            for w in d.get("weights", []):
                shape = tuple(int(s) for s in w["shape"])
                dim = int(w["dim"])
                if not 0 <= dim < len(shape):
                    raise ValueError(f"{w['fqn']}: dim {dim} out of range for shape {shape}")
                plan.weights[str(w["fqn"])] = PlannedWeight(
                    str(w["fqn"]), shape, dim, int(w["group_size"]),
                    tuple(map(str, w.get("ops", ()))), tuple(map(str, w.get("aliases", ()))),
                )  # fmt: skip
            for s in d.get("skipped", []):
                plan.skipped[str(s["fqn"])] = SkippedWeight(
                    str(s["fqn"]), tuple(int(x) for x in s["shape"]), str(s["reason"]),
                    bool(s["matmul_weight"]), bool(s.get("by_policy", True)),
                )  # fmt: skip
        except (KeyError, TypeError) as e:
            raise ValueError(f"malformed qatpass plan: {e!r}") from e
        return plan


def plan_from_facts(facts: Iterable[WeightFacts], config: QatConfig) -> QuantPlan:
    plan = QuantPlan(scheme=config.scheme)
    for f in facts:
        plan.add(decide(f, config))
    return plan


# --- facts from modules (no tracing): what `convert(model)` sees on its own ---------------------


def is_experts_module(module: nn.Module) -> bool:
    """An HF transformers MoE experts container: 3D expert parameters owned by one module."""
    params = dict(module.named_parameters(recurse=False))
    return any(name in params and params[name].dim() == 3 for name in EXPERT_PARAM_NAMES)


def is_conv1d(module: nn.Module) -> bool:
    """HF transformers' GPT-2 style Conv1D: weight [K, N], forward addmm(bias, x, weight)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


def head_names(model: nn.Module) -> set[str]:
    """Names of the output head's weight (an HF model's `get_output_embeddings()`)."""
    get = getattr(model, "get_output_embeddings", None)
    try:
        head = get() if callable(get) else None
    except (AttributeError, NotImplementedError, TypeError):
        head = None
    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return set()
    return {n for n, p in model.named_parameters(remove_duplicate=False) if p is weight}


def aliases_by_id(model: nn.Module) -> dict[int, list[str]]:
    """id(parameter) -> all of its names, first name first."""
    names: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(n)
    return names


def _module_matmul_weights(model: nn.Module) -> Iterator[tuple[str, int, str]]:
    """(fqn, reduction dim, op) of the weights module types say are matmul weights."""
    for mname, module in model.named_modules():
        prefix = f"{mname}." if mname else ""
        if isinstance(module, nn.Linear):
            yield prefix + "weight", 1, "linear"
        elif is_conv1d(module):
            yield prefix + "weight", 0, "addmm"
        elif is_experts_module(module):
            transposed = bool(getattr(module, "is_transposed", False))
            for attr, p in module.named_parameters(recurse=False):
                if attr in EXPERT_PARAM_NAMES and p.dim() == 3:
                    yield prefix + attr, 1 if transposed else 2, "experts"


def facts_from_modules(model: nn.Module) -> tuple[list[WeightFacts], list[str]]:
    """Facts for the weights module types reveal, and the names of >= 2-d float parameters
    that no known module type explains (only tracing can tell whether they are matmul weights)."""
    aliases = aliases_by_id(model)
    params = dict(model.named_parameters(remove_duplicate=False))
    embeddings = {
        id(m.weight)
        for m in model.modules()
        if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and isinstance(m.weight, torch.Tensor)
    }
    heads = head_names(model)
    found: dict[int, dict[str, Any]] = {}
    for fqn, dim, op in _module_matmul_weights(model):
        p = params.get(fqn)
        if p is None:
            continue
        entry = found.setdefault(id(p), {"p": p, "dims": set(), "ops": set()})
        entry["dims"].add(dim)
        entry["ops"].add(op)
    facts = []
    for pid, entry in found.items():
        names = aliases[pid]
        p = entry["p"]
        facts.append(
            WeightFacts(
                fqn=names[0],
                shape=tuple(p.shape),
                dtype=p.dtype,
                dims=frozenset(entry["dims"]),
                ops=tuple(sorted(entry["ops"])),
                aliases=tuple(names[1:]),
                embedding=pid in embeddings,
                head=any(n in heads for n in names),
            )
        )
    known = set(found) | embeddings
    unexplained = [
        names[0]
        for pid, names in aliases.items()
        if pid not in known
        and params[names[0]].dim() >= 2
        and params[names[0]].dtype in _FLOATS
        and not isinstance(_owner(model, names[0]), (nn.modules.conv._ConvNd, nn.LayerNorm))
    ]
    return facts, unexplained


def _owner(model: nn.Module, fqn: str) -> nn.Module | None:
    owner = fqn.rpartition(".")[0]
    try:
        return model.get_submodule(owner)
    except AttributeError:
        return None


# --- facts from a Dynamo graph: what the backend sees ------------------------------------------


@dataclass
class GraphWeight:
    """A planned weight of one graph: the plan's entry and the graph analysis behind it."""

    info: ParamInfo
    planned: PlannedWeight

    @property
    def fqn(self) -> str:
        return self.planned.fqn

    @property
    def dim(self) -> int:
        return self.planned.dim


def _check_finite(info: ParamInfo, example: object) -> None:
    if isinstance(example, torch.Tensor) and not isinstance(example, FakeTensor):
        if example.device.type != "meta" and not bool(torch.isfinite(example.detach()).all()):
            bad = int((~torch.isfinite(example.detach())).sum())
            raise ValueError(
                f"qat4: parameter {info.fqn} {tuple(info.shape)} has {bad} non-finite value(s) "
                "(NaN/Inf); refusing to fake-quantize it (the whole group would turn NaN)"
            )


def plan_graph(
    gm: fx.GraphModule,
    example_inputs: Sequence[object] | None,
    config: QatConfig,
    roots: Sequence[nn.Module] | None = None,
) -> tuple[list[GraphWeight], QuantPlan]:
    """The plan for one Dynamo graph: its planned weights (with their analysis) and the plan.

    `roots` are the models being compiled (default: found up the call stack); they give every
    tensor's full name, its aliases (tied weights) and the output head.
    """
    roots = root_modules() if roots is None else list(roots)
    names: dict[int, str] = {}
    aliases: dict[str, tuple[str, ...]] = {}
    heads: set[str] = set()
    for root in roots:
        for pid, all_names in aliases_by_id(root).items():
            names.setdefault(pid, all_names[0])
            aliases.setdefault(all_names[0], tuple(all_names[1:]))
        heads |= head_names(root)
    examples = list(example_inputs) if example_inputs is not None else []
    plan = QuantPlan(scheme=config.scheme)
    targets: list[GraphWeight] = []
    for info in find_weight_uses(gm, example_inputs, names=names):
        other = aliases.get(info.fqn, ())
        facts = WeightFacts(
            fqn=info.fqn,
            shape=tuple(info.shape),
            dtype=info.dtype,
            dims=frozenset(info.dims),
            ops=tuple(sorted({u.op for u in info.uses})),
            other_uses=tuple(info.other_uses),
            aliases=other,
            embedding=info.embedding,
            head=bool(heads & {info.fqn, *other}),
            router=bool(info.uses) and all(u.router for u in info.uses),
        )
        entry = decide(facts, config)
        if isinstance(entry, PlannedWeight) and info.index < len(examples):
            _check_finite(info, examples[info.index])
        plan.add(entry)
        if isinstance(entry, PlannedWeight):
            targets.append(GraphWeight(info, entry))
    return targets, plan


# --- the plan of a model, found by tracing it once -------------------------------------------


class _Planner:
    """A torch.compile backend that only plans: graphs run as captured, nothing is rewritten."""

    def __init__(self, model: nn.Module, config: QatConfig) -> None:
        self.model = model
        self.config = config
        self.plan = QuantPlan(scheme=config.scheme)

    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence[Any]):
        self.plan.merge(plan_graph(gm, example_inputs, self.config, roots=[self.model])[1])
        return gm.forward


def plan_for(
    model: nn.Module, example_inputs: Any, config: QatConfig | None = None, **options: Any
) -> QuantPlan:
    """The plan the qat4 backend makes for `model` on `example_inputs`, found by tracing once.

    example_inputs: a tensor, a tuple of positional arguments or a dict of keyword arguments.
    Options are the backend's (group_size, include, exclude, ...), or give a QatConfig. The
    model is not modified (it runs once, without gradients); Dynamo is reset before and after.
    """
    from qatpass.tracing import run_with_backend

    if config is not None and options:
        raise ValueError("give either a QatConfig or options, not both")
    config = config or QatConfig.from_options(options)
    planner = _Planner(model, config)
    run_with_backend(model, example_inputs, planner)
    return planner.plan
